"""KronosPredictor: the original API, sample paths, reproducibility, input errors, and KV-cache exactness."""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch
from conftest import REFERENCE, ReferenceCase, released_config

from benchmarks.forecast_speed import full_recompute_generate
from kronos_model import Kronos, KronosPredictor, KronosTokenizer
from kronos_model.generation import PREFILL_SERIES_CPU, generate, sample_tokens

CASE = ReferenceCase("tiny_fits_context")


@pytest.fixture(scope="module")
def predictor() -> KronosPredictor:
    tokenizer, model = CASE.load()
    return KronosPredictor(model, tokenizer, device="cpu", max_context=128)


def args(history=None, future=None, pred_len=12):
    history = CASE.history if history is None else history
    future = CASE.future if future is None else future
    return history, history.timestamps, future.timestamps[:pred_len], pred_len


# -- KV cache == full recompute -------------------------------------------------------------------------------

def small_pair(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = KronosTokenizer(**{**released_config("Kronos-Tokenizer-base"), "d_model": 32, "ff_dim": 64,
                                   "n_enc_layers": 2, "n_dec_layers": 2})
    model = Kronos(**{**released_config("Kronos-mini"), "d_model": 32, "ff_dim": 64, "n_layers": 2})
    with torch.no_grad():  # sharpen the random heads so greedy choices sit far from ties
        model.head.proj_s1.weight.mul_(20)
        model.head.proj_s2.weight.mul_(20)
    return tokenizer.eval(), model.eval()


@pytest.mark.parametrize(
    ("lookback", "pred_len", "max_context"),
    [
        (40, 10, 64),  # fits: cached steps only
        (40, 30, 64),  # fills the context, then slides
        (80, 12, 64),  # look-back longer than the context: slides from the first step
        (64, 64, 64),  # horizon equal to the context
    ],
)
def test_cached_generation_equals_full_recompute(lookback, pred_len, max_context):
    tokenizer, model = small_pair()
    torch.manual_seed(3)
    batch, paths = 2, 3
    x = torch.randn(batch, lookback, 6).clamp(-5, 5)
    stamps = torch.randint(0, 7, (batch, lookback + pred_len, 5)).float()
    common = (tokenizer, model, x, stamps[:, :lookback], stamps[:, lookback:], max_context, pred_len, paths)
    ref_s1, ref_s2, ref_values = full_recompute_generate(*common, top_k=1)
    ours = generate(*common, top_k=1)
    assert torch.equal(ours.s1, ref_s1)
    assert torch.equal(ours.s2, ref_s2)
    torch.testing.assert_close(ours.values, ref_values, atol=1e-4, rtol=1e-4)


def test_cached_sampling_equals_full_recompute_with_the_same_seed():
    """Same RNG stream, same draws: sampled paths are identical too, not only greedy ones."""
    tokenizer, model = small_pair(1)
    x = torch.randn(1, 50, 6)
    stamps = torch.zeros(1, 70, 5)
    common = (tokenizer, model, x, stamps[:, :50], stamps[:, 50:], 60, 20, 4)
    ref = full_recompute_generate(*common, top_p=0.9, generator=torch.Generator().manual_seed(5))
    ours = generate(*common, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours.s1, ref[0]) and torch.equal(ours.s2, ref[1])


# -- sampling -------------------------------------------------------------------------------------------------

def test_top_k_and_top_p_both_apply():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_tokens(logits, top_k=3, top_p=1.0, generator=gen).tolist()) == {0, 1, 2}
    # top_p 0.7 keeps {0, 1} (0.5 < 0.7, 0.8 crosses); the original ignored top_p whenever top_k > 0
    assert set(sample_tokens(logits, top_k=3, top_p=0.7, generator=gen).tolist()) == {0, 1}
    assert set(sample_tokens(logits, top_p=0.4, generator=gen).tolist()) == {0}
    assert sample_tokens(logits, temperature=0).unique().tolist() == [0]


# -- forecasting API ------------------------------------------------------------------------------------------

def test_forecast_returns_paths_quantiles_and_prob_up(predictor):
    result = predictor.forecast(*args(), sample_count=16, seed=11)
    assert result.paths.shape == (16, 12, 6)
    assert list(result.timestamps) == list(CASE.future.timestamps)
    p10, p50, p90 = (result.quantiles[q] for q in (0.1, 0.5, 0.9))
    assert (p10 <= p50).all() and (p50 <= p90).all()
    assert (p10 < p90).any()  # sampling spreads the paths
    close = result.paths[:, :, 3]
    np.testing.assert_allclose(result.prob_up, (close > CASE.history.close.iloc[-1]).mean(axis=0))
    assert result.last_close == CASE.history.close.iloc[-1]
    frame = result.to_frame()
    assert {"close_p10", "close_p50", "close_p90", "close_mean", "prob_up"} <= set(frame.columns)
    # predict's output is the mean of the paths
    mean = predictor.predict(*args(), sample_count=16, seed=11)
    np.testing.assert_allclose(mean.to_numpy(), result.mean, rtol=1e-6)


def test_seed_makes_sampling_reproducible(predictor):
    a = predictor.forecast(*args(), sample_count=8, seed=3).paths
    b = predictor.forecast(*args(), sample_count=8, seed=3).paths
    c = predictor.forecast(*args(), sample_count=8, seed=4).paths
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_inference_runs_in_eval_mode_even_after_train(predictor):
    expected = predictor.predict(*args(), top_k=1)
    predictor.model.train()
    predictor.tokenizer.train()
    again = predictor.predict(*args(), top_k=1)
    pd.testing.assert_frame_equal(expected, again)


def test_polars_in_polars_out(predictor):
    history = pl.from_pandas(CASE.history)
    out = predictor.predict(history, history["timestamps"], pl.from_pandas(CASE.future)["timestamps"], 12, top_k=1)
    assert isinstance(out, pl.DataFrame)
    assert out.columns == ["timestamps", "open", "high", "low", "close", "volume", "amount"]
    np.testing.assert_allclose(out.drop("timestamps").to_numpy(), CASE.arrays["greedy_pred"], rtol=1e-4)


def test_datetimeindex_timestamps_are_accepted(predictor):
    history, _, future_ts, n = args()
    out = predictor.predict(history, pd.DatetimeIndex(history.timestamps), pd.DatetimeIndex(future_ts), n, top_k=1)
    np.testing.assert_allclose(out.to_numpy(), CASE.arrays["greedy_pred"], rtol=1e-4)


def test_optional_volume_and_amount(predictor):
    history = CASE.history.drop(columns=["amount"])
    out = predictor.predict(history, history.timestamps, CASE.future.timestamps, 12, top_k=1)
    assert out.shape == (12, 6)
    prices_only = CASE.history[["open", "high", "low", "close"]]
    out = predictor.predict(prices_only, CASE.history.timestamps, CASE.future.timestamps, 12, top_k=1)
    assert np.isfinite(out.to_numpy()).all()


def test_predict_batch_matches_single_predictions(predictor):
    other = CASE.history.copy()
    other[["open", "high", "low", "close"]] *= 1.1
    outs = predictor.predict_batch([CASE.history, other], [CASE.history.timestamps] * 2,
                                   [CASE.future.timestamps] * 2, 12, top_k=1)
    np.testing.assert_allclose(outs[0].to_numpy(), CASE.arrays["greedy_pred"], rtol=1e-4)
    single = predictor.predict(other, other.timestamps, CASE.future.timestamps, 12, top_k=1)
    np.testing.assert_allclose(outs[1].to_numpy(), single.to_numpy(), rtol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h, xt, yt, n: (h.assign(close=h.close.where(h.index != 5)), xt, yt, n), "non-finite.*row 5.*close"),
        (lambda h, xt, yt, n: (h.drop(columns=["high"]), xt, yt, n), r"lacks columns \['high'\]"),
        (lambda h, xt, yt, n: (h, xt[:-1], yt, n), "x_timestamp has 95 entries but the frame has 96"),
        (lambda h, xt, yt, n: (h, xt, yt[:-2], n), "y_timestamp has 10 entries but pred_len is 12"),
        (lambda h, xt, yt, n: (h, xt, yt, 129), "between 1 and max_context"),
        (lambda h, xt, yt, n: (h, xt, yt, 0), "between 1 and max_context"),
        (lambda h, xt, yt, n: (h.assign(open="x"), xt, yt, n), "not numeric"),
        (lambda h, xt, yt, n: (h.iloc[:0], xt[:0], yt, n), "empty"),
    ],
    ids=["nan", "missing-column", "x-length", "y-length", "pred-len-too-long", "pred-len-zero", "text",
         "empty"],
)
def test_bad_input_gets_a_clear_error(predictor, change, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(*change(*args()))


# -- batched forecasts == one by one ----------------------------------------------------------------------

def priced_like(history: pd.DataFrame, level: float, volume_scale: float) -> pd.DataFrame:
    """The case's candles at another price level and volume: other normalisation statistics."""
    other = history.copy()
    other[["open", "high", "low", "close"]] *= level
    other[["volume", "amount"]] *= volume_scale
    return other


@pytest.mark.parametrize(("T", "top_p", "top_k"), [(1.0, 0.9, 0), (1.4, 0.6, 0), (0.7, 1.0, 0), (1.0, 0.8, 20)],
                         ids=["T1-p0.9", "T1.4-p0.6", "T0.7-p1", "top_k20-p0.8"])
def test_each_series_of_a_batch_is_forecast_as_it_is_alone(predictor, T, top_p, top_k):
    """Per-series seeds: a series' paths do not depend on what else is in the batch, at any price level."""
    history = CASE.history
    frames = [priced_like(history, level, volume)
              for level, volume in [(1.0, 1.0), (0.003, 50.0), (41_000.0, 0.01), (1.1, 1.0)]]
    seeds = [7, 123456, 7, 2**40]
    future = CASE.future.timestamps[:12]
    batched = predictor.forecast_batch(frames, [history.timestamps] * 4, [future] * 4, 12, T=T, top_k=top_k,
                                       top_p=top_p, sample_count=5, seed=seeds)
    for frame, seed, inside in zip(frames, seeds, batched, strict=True):
        alone = predictor.forecast(frame, history.timestamps, future, 12, T=T, top_k=top_k, top_p=top_p,
                                   sample_count=5, seed=seed)
        np.testing.assert_allclose(inside.paths, alone.paths, rtol=1e-6)
        assert inside.last_close == alone.last_close
    # the same series with the same seed draws the same paths at another price level; a new seed draws new ones
    assert np.allclose(batched[2].paths[..., :4] / 41_000.0, batched[0].paths[..., :4], rtol=1e-4)
    assert not np.allclose(batched[3].paths, batched[0].paths * 1.1, rtol=1e-3)


def test_a_batch_of_mixed_lookbacks_is_grouped_and_matches_one_by_one(predictor):
    history = CASE.history
    frames = [history, priced_like(history.iloc[16:], 3.0, 2.0), priced_like(history.iloc[40:], 0.5, 1.0),
              priced_like(history.iloc[16:], 0.9, 1.0)]
    stamps = [frame.timestamps for frame in frames]
    future = CASE.future.timestamps[:12]
    batched = predictor.forecast_batch(frames, stamps, [future] * 4, 12, T=1.0, top_p=0.85, sample_count=4,
                                       seed=[1, 2, 3, 4])
    for i, (frame, inside) in enumerate(zip(frames, batched, strict=True)):
        alone = predictor.forecast(frame, frame.timestamps, future, 12, top_p=0.85, sample_count=4, seed=i + 1)
        np.testing.assert_allclose(inside.paths, alone.paths, rtol=1e-6)
    assert len({len(f) for f in frames}) == 3


def test_per_series_generators_draw_the_same_token_ids_as_alone():
    """At the generator: sampled s1/s2 ids equal, decoded values equal, with a sliding window too, and with
    more series than one look-back pass takes on a CPU (their caches are stitched together)."""
    tokenizer, model = small_pair(2)
    torch.manual_seed(4)
    batch, lookback, pred_len, max_context, paths = 6, 50, 20, 60, 4
    assert batch > PREFILL_SERIES_CPU
    x = torch.randn(batch, lookback, 6).clamp(-5, 5) * torch.tensor([0.5, 1.0, 2.0, 1.5, 0.3, 1.0])[:, None, None]
    stamps = torch.randint(0, 7, (batch, lookback + pred_len, 5)).float()
    seeds = [5, 6, 5, 9, 10, 11]

    def run(rows: slice, seeds_used: list[int]):
        return generate(tokenizer, model, x[rows], stamps[rows, :lookback], stamps[rows, lookback:], max_context,
                        pred_len, paths, 1.0, 0, 0.9, generator=[torch.Generator().manual_seed(s) for s in seeds_used])

    together = run(slice(None), seeds)
    for b in range(batch):
        alone = run(slice(b, b + 1), [seeds[b]])
        assert torch.equal(together.s1[b], alone.s1[0]) and torch.equal(together.s2[b], alone.s2[0])
        torch.testing.assert_close(together.values[b], alone.values[0], atol=1e-5, rtol=1e-5)
    assert not torch.equal(together.s1[0], together.s1[1])  # different seeds (and inputs) do draw differently


def test_one_seed_per_series_is_checked(predictor):
    with pytest.raises(ValueError, match="one per series"):
        predictor.forecast_batch([CASE.history] * 2, [CASE.history.timestamps] * 2, [CASE.future.timestamps] * 2,
                                 12, seed=[1, 2, 3])


def test_reference_fixture_dir_exists():
    assert (REFERENCE / "tiny_sliding_window" / "case.npz").exists()


def test_a_model_cast_to_bf16_forecasts_close_to_fp32():
    tokenizer, model = CASE.load()
    bf16 = KronosPredictor(model.to(torch.bfloat16), tokenizer.to(torch.bfloat16), device="cpu", max_context=128)
    result = bf16.forecast(*args(), top_k=1, sample_count=1)
    prices = CASE.arrays["greedy_pred"][:, :4]
    assert np.abs(result.mean[:, :4] / prices - 1).max() < 0.01
