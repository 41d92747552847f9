"""Training windows: look-back-only normalisation, no window across gaps or symbols, chronological splits."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from kronos_model.data import WindowDataset, WindowSpec, read_candles, segments, split_by_time

BTC = "daemon/assets/data/BTCUSDT_1h.parquet"
ETH = "daemon/assets/data/ETHUSDT_1h.parquet"


@pytest.fixture(scope="module")
def btc() -> pl.DataFrame:
    return read_candles(BTC)


def test_changing_the_target_part_does_not_change_the_model_input(btc):
    spec = WindowSpec(lookback=48, predict=12)
    parts = segments(btc.head(500))
    dataset = WindowDataset(parts, spec)
    x_before, _ = dataset[100]
    k, start = dataset.index[100]
    parts[k].values[start + spec.lookback : start + spec.length] *= 3.0  # a wildly different future
    x_after, _ = dataset[100]
    np.testing.assert_array_equal(x_before[: spec.lookback].numpy(), x_after[: spec.lookback].numpy())
    assert not np.array_equal(x_before[spec.lookback :].numpy(), x_after[spec.lookback :].numpy())
    # the look-back is z-scored with its own statistics
    np.testing.assert_allclose(x_before[: spec.lookback].mean(0).numpy(), 0, atol=1e-5)


def test_windows_never_span_a_gap_or_two_symbols():
    btc = read_candles(BTC).head(400)
    eth = read_candles(ETH).head(400)
    # cut a real-looking outage of 5 hours into BTC
    btc = btc.filter((pl.col("timestamps") < datetime(2023, 1, 5)) | (pl.col("timestamps") >= datetime(2023, 1, 5, 5)))
    frame = pl.concat([btc, eth])
    spec = WindowSpec(lookback=20, predict=4)
    dataset = WindowDataset(segments(frame), spec)
    assert len(dataset) > 0
    for k, start in dataset.index:
        part = dataset.parts[k]
        times = part.times[start : start + spec.length]
        assert np.all(np.diff(times) == np.timedelta64(1, "h"))
    symbols = {dataset.parts[k].symbol for k, _ in dataset.index}
    assert symbols == {"BTCUSDT", "ETHUSDT"}
    # the BTC window count is what two gap-free runs allow
    btc_runs = [len(p.times) for p in dataset.parts if p.symbol == "BTCUSDT"]
    assert len(btc_runs) == 2
    assert sum(1 for k, _ in dataset.index if dataset.parts[k].symbol == "BTCUSDT") == \
        sum(n - spec.length + 1 for n in btc_runs)


def test_splits_are_chronological_with_an_embargo(btc):
    spec = WindowSpec(lookback=96, predict=24)
    splits = split_by_time(btc, spec, 0.8, 0.1, embargo=30, require_test=True)
    _, train_last = splits.train.time_range()
    val_first, val_last = splits.val.time_range()
    test_first, _ = splits.test.time_range()
    assert train_last < val_first and val_last < test_first
    assert val_first - train_last > np.timedelta64(30, "h")
    assert test_first - val_last > np.timedelta64(30, "h")


def test_split_dates_hold_out_the_same_final_period_of_series_that_start_at_different_times(btc):
    eth = read_candles(ETH)  # 2022-09 -> 2024-09, BTC 2023-01 -> 2025-12
    frame = pl.concat([btc.filter(pl.col("timestamps") < datetime(2024, 9, 1)), eth])
    spec = WindowSpec(lookback=48, predict=12)
    ends = (np.datetime64("2024-03-01", "ms"), np.datetime64("2024-06-01", "ms"))
    splits = split_by_time(frame, spec, embargo=12, require_test=True, ends=ends)
    assert splits.boundaries["train_end"].startswith("2024-03-01T00:00")
    assert splits.boundaries["test_begin"].startswith("2024-06-01T12:00")
    for name, dataset in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        for symbol in ("BTCUSDT", "ETHUSDT"):
            firsts = [dataset.parts[k].times[s] for k, s in dataset.index if dataset.parts[k].symbol == symbol]
            lasts = [dataset.parts[k].times[s + spec.length - 1] for k, s in dataset.index
                     if dataset.parts[k].symbol == symbol]
            assert firsts, f"{symbol} has {name} windows"
            if name == "train":
                assert max(lasts) < ends[0]
            elif name == "val":
                assert min(firsts) >= ends[0] + np.timedelta64(12, "h") and max(lasts) < ends[1]
            else:
                assert min(firsts) >= ends[1] + np.timedelta64(12, "h")
    with pytest.raises(ValueError, match="must end before"):
        split_by_time(frame, spec, ends=(ends[1], ends[0]))
    with pytest.raises(ValueError, match=r"test split has no complete window.*from 2024-09-20"):
        split_by_time(frame, spec, embargo=12, require_test=True,
                      ends=(ends[0], np.datetime64("2024-09-20", "ms")))


def test_split_dates_in_the_config_go_together_and_in_order():
    from kronos_model.finetune.config import load_config

    config = load_config(None, ["data_path=x.parquet", "train_end=2025-01-01", "val_end=2025-06-01T00:00Z"])
    assert config.split_ends == (np.datetime64("2025-01-01", "ms"), np.datetime64("2025-06-01", "ms"))
    with pytest.raises(ValueError, match="train_end and val_end go together"):
        load_config(None, ["data_path=x.parquet", "train_end=2025-01-01"])
    with pytest.raises(ValueError, match="must be before val_end"):
        load_config(None, ["data_path=x.parquet", "train_end=2025-07-01", "val_end=2025-06-01"])
    with pytest.raises(ValueError, match="not a UTC date/time"):
        load_config(None, ["data_path=x.parquet", "train_end=soon", "val_end=2025-06-01"])


def test_embargo_shorter_than_the_horizon_is_rejected(btc):
    with pytest.raises(ValueError, match="embargo"):
        split_by_time(btc, WindowSpec(96, 24), embargo=10)


def test_an_empty_split_says_how_much_more_data_is_needed(btc):
    with pytest.raises(ValueError, match=r"val split has no complete window.*takes about \d+ gap-free candles"):
        split_by_time(btc.head(600), WindowSpec(96, 24), 0.8, 0.1)


def test_missing_amount_is_derived_and_counted(tmp_path):
    frame = read_candles(BTC).head(50).with_columns(
        pl.when(pl.int_range(pl.len()) < 5).then(None).otherwise(pl.col("amount")).alias("amount"))
    assert frame["amount"].null_count() == 5
    path = tmp_path / "X_1h.parquet"
    frame.drop("amount_derived", "symbol").write_parquet(path)
    loaded = read_candles(path)
    assert loaded["amount_derived"].sum() == 5
    expected = (loaded["volume"] * (loaded["open"] + loaded["high"] + loaded["low"] + loaded["close"]) / 4)[:5]
    np.testing.assert_allclose(loaded["amount"][:5].to_numpy(), expected.to_numpy())
    assert loaded["symbol"][0] == "X"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("2024-01-01 00:00,1,2,0.5,1.5\n2024-01-01 01:00,1,2,0.5,NaN\n", "non-finite"),
        ("2024-01-01 00:00,1,2,0.5,1.5\n2024-01-01 00:00,1,2,0.5,1.5\n", "share a timestamp"),
        ("2024-01-01 01:00,1,2,0.5,1.5\n2024-01-01 00:00,1,2,0.5,1.5\n", "not in ascending order"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, rows, message):
    path = tmp_path / "bad.csv"
    path.write_text("timestamps,open,high,low,close\n" + rows)
    with pytest.raises(ValueError, match=message):
        read_candles(path)


def test_wrong_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("when,price\n" + f"{datetime(2024, 1, 1) + timedelta(hours=1)},1\n")
    with pytest.raises(ValueError, match="open_time"):
        read_candles(path)
