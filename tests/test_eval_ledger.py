"""The forecast ledger on a store holding real ETHUSDT candles and real KronosPredictor forecasts."""

from __future__ import annotations

import json
import math
from datetime import timedelta

import duckdb
import numpy as np
import pytest

from daemon.ledger import format_table, parse_window, rolling_scores, score_ledger
from tests.eval_helpers import build_forecast_store, kronosd, latest_candle

ORIGINS, PENDING, HORIZON = 60, 3, 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_forecast_store(tmp_path_factory.mktemp("ledger") / "kronos.duckdb", origins=ORIGINS,
                                pending=PENDING, horizon=HORIZON)


@pytest.fixture
def con(store):
    connection = duckdb.connect(str(store), read_only=True)
    connection.execute("SET TimeZone = 'UTC'")
    yield connection
    connection.close()


def test_scores_match_a_join_done_by_hand(con):
    forecasts = con.execute("SELECT model_version, epoch_ms(target_time), close_p50, close_p10, close_p90, last_close "
                            "FROM forecasts WHERE model_version = 'tiny-v1'").fetchall()
    closes = dict(con.execute("SELECT epoch_ms(open_time), close FROM candles").fetchall())
    realised = [(p50, p10, p90, last, closes[t]) for _, t, p50, p10, p90, last in forecasts if t in closes]
    p50, p10, p90, last, actual = map(np.array, zip(*realised, strict=True))
    scores = {s.model_version: s for s in score_ledger(con)}
    assert set(scores) == {"tiny-v1", "tiny-v2"}
    v1 = scores["tiny-v1"]
    assert v1.scored_steps == len(realised)
    assert v1.pending_steps == len(forecasts) - len(realised) == sum(range(1, HORIZON + 1))
    assert v1.origins == ORIGINS + PENDING - 1  # the newest origin has no closed target yet
    assert v1.mae == pytest.approx(np.abs(p50 - actual).mean())
    assert v1.mae_random_walk == pytest.approx(np.abs(last - actual).mean())
    assert v1.coverage_80 == pytest.approx(((actual >= p10) & (actual <= p90)).mean())
    assert 0 <= v1.dm_pvalue_mae <= 1 and 0 <= v1.brier_prob_up <= 1
    assert v1.symbol == "ETHUSDT" and v1.interval == "1h" and v1.window == "all"


def test_rolling_window_counts_origins_up_to_the_latest_candle(con, store):
    day = rolling_scores(con, window=timedelta(hours=24))
    assert {s.window for s in day} == {"1d"}
    # origins whose open time lies within 24 h of the newest candle, minus the one with nothing realised
    assert all(s.origins == 24 for s in day)
    now = latest_candle(store)
    assert rolling_scores(con, window=timedelta(hours=24), now=now + timedelta(days=30)) == []
    only = score_ledger(con, model_version="tiny-v2", symbol="ETHUSDT", interval="1h")
    assert [s.model_version for s in only] == ["tiny-v2"]
    assert score_ledger(con, symbol="BTCUSDT") == []


def test_scores_are_json_ready_and_print_as_a_table(con):
    scores = score_ledger(con)
    payload = json.loads(json.dumps([s.to_dict() for s in scores]))
    assert payload[0]["beats_random_walk"] in (True, False)
    assert all(v is None or not isinstance(v, float) or math.isfinite(v) for v in payload[0].values())
    assert "tiny-v1" in format_table(scores)


def test_windows_parse():
    assert parse_window("all") is None
    assert parse_window("7d") == timedelta(days=7) and parse_window("90m") == timedelta(minutes=90)
    with pytest.raises(ValueError, match="duration"):
        parse_window("soon")


def test_ledger_command(store):
    result = kronosd("ledger", "--db", str(store), "--json", "--window", "all", "--window", "12h")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {(r["model_version"], r["window"]) for r in rows} == {
        ("tiny-v1", "all"), ("tiny-v2", "all"), ("tiny-v1", "12h"), ("tiny-v2", "12h")}
    table = kronosd("ledger", "--db", str(store), "--symbol", "ethusdt")
    assert table.returncode == 0 and "MAE/RW" in table.stdout and "7d" in table.stdout
    bad = kronosd("ledger", "--db", str(store), "--window", "soon")
    assert bad.returncode == 2 and "duration" in bad.stderr


def test_raw_and_calibrated_side_by_side_on_the_steps_published_calibrated(store, tmp_path):
    """The newer half of tiny-v1's origins 'published calibrated' with a band 20 % of price wider and P(up) a
    coin flip: the ledger scores both on exactly those steps, and the rest of the row stays the raw scores."""
    import shutil

    copy = tmp_path / "calibrated.duckdb"
    shutil.copy(store, copy)
    con = duckdb.connect(str(copy))
    try:
        cut = con.execute("SELECT quantile_disc(origin_time, 0.5) FROM forecasts WHERE model_version = 'tiny-v1'"
                          ).fetchall()[0][0]
        con.execute("UPDATE forecasts SET close_p10_cal = close_p10 - 0.1 * last_close, close_p50_cal = close_p50, "
                    "close_p90_cal = close_p90 + 0.1 * last_close, prob_up_cal = 0.5 "
                    "WHERE model_version = 'tiny-v1' AND origin_time >= ?", [cut])
        rows = con.execute(
            "SELECT f.close_p10, f.close_p90, f.close_p10_cal, f.close_p90_cal, f.prob_up, f.last_close, c.close "
            "FROM forecasts f JOIN candles c ON c.symbol = f.symbol AND c.interval = f.interval "
            "AND c.open_time = f.target_time WHERE f.model_version = 'tiny-v1' AND f.close_p10_cal IS NOT NULL"
        ).fetchall()
        p10, p90, p10_cal, p90_cal, prob, last, actual = map(np.array, zip(*rows, strict=True))
        scores = {s.model_version: s for s in score_ledger(con)}
    finally:
        con.close()
    v1, v2 = scores["tiny-v1"], scores["tiny-v2"]
    up = (actual > last).astype(float)
    assert v1.calibrated_steps == len(rows) > 0
    assert v1.coverage_80_raw_same_steps == pytest.approx(((actual >= p10) & (actual <= p90)).mean())
    assert v1.coverage_80_calibrated == pytest.approx(((actual >= p10_cal) & (actual <= p90_cal)).mean())
    assert v1.coverage_80_calibrated >= v1.coverage_80_raw_same_steps  # a wider band covers at least as much
    assert v1.brier_prob_up_raw_same_steps == pytest.approx(((prob - up) ** 2).mean())
    assert v1.brier_prob_up_calibrated == pytest.approx(0.25)  # a coin flip scores 0.25 whatever happened
    assert v1.scored_steps > v1.calibrated_steps  # the raw scores still cover every realised step
    assert v2.calibrated_steps == 0 and math.isnan(v2.coverage_80_calibrated)
    assert v2.to_dict()["brier_prob_up_calibrated"] is None
    table = format_table([v1, v2]).splitlines()
    side = [line for line in table if "calibrated" in line]
    assert len(side) == 1 and f"{v1.calibrated_steps:>7}" in side[0]
    assert f"{v1.coverage_80_calibrated:.1%}" in side[0] and "0.250" in side[0]


def test_ledger_crps_on_the_dense_grid_matches_the_sample_path_crps(tmp_path):
    """Forecasts with 4000 Gaussian-return paths and outcomes drawn from the same law: the ledger's CRPS, scored
    on the 19-level grid the daemon stores (5 %...95 %), is within 2 % of the CRPS of the paths themselves
    (the grid leaves the tails beyond 2.5 %/97.5 % out: about 1 % on a Gaussian)."""
    import pandas as pd
    import polars as pl

    from daemon.forecaster import forecast_rows
    from kronos_model.evaluation.metrics import crps_from_samples
    from kronos_model.predictor import Forecast
    from storage.candles import candles_from_rows
    from storage.forecasts import insert_forecasts
    from storage.store import CandleStore

    hour, horizon, origins, paths = 3_600_000, 6, 40, 4000
    rng = np.random.default_rng(11)
    t0 = 1_717_200_000_000
    closes = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, origins + horizon + 1)))
    store = CandleStore(tmp_path / "grid.duckdb", memory_limit="512MB", threads=1)
    sample_crps = []
    try:
        store.upsert(candles_from_rows([
            {"symbol": "BTCUSDT", "interval": "1h", "open_time": t0 + i * hour, "close_time": t0 + (i + 1) * hour - 1,
             "open": c, "high": c, "low": c, "close": c, "volume": 1.0, "is_closed": True, "source": "rest"}
            for i, c in enumerate(closes)]))
        rows = []
        for k in range(origins):
            last = closes[k]
            scale = 0.01 * np.sqrt(np.arange(1, horizon + 1))
            close_paths = last * np.exp(rng.normal(0, 1, (paths, horizon)) * scale)
            path_array = np.repeat(close_paths[:, :, None], 6, axis=2)
            times = pd.DatetimeIndex(pd.to_datetime(t0 + (k + np.arange(1, horizon + 1)) * hour, unit="ms"))
            forecast = Forecast(times, path_array, float(last))
            origin = t0 + k * hour
            rows.append(forecast_rows(forecast, "BTCUSDT", "1h", origin, "gauss", origin + hour))
            sample_crps.append(crps_from_samples(close_paths.T, closes[k + 1 : k + 1 + horizon]))
        insert_forecasts(store.con, pl.concat(rows))
        (score,) = score_ledger(store.con)
    finally:
        store.close()
    expected = float(np.mean(sample_crps))
    assert score.crps_steps == origins * horizon
    assert abs(score.crps / expected - 1) < 0.02, (score.crps, expected)
    assert score.crps_random_walk > score.crps  # a calibrated spread beats the point forecast
    assert math.isclose(score.relative_crps, score.crps / score.crps_random_walk)
