"""Anchoring: forecast paths moved onto the observed last candle by the tokenizer's reconstruction offset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kronos_model.checkpoint import load_pair
from kronos_model.data import read_candles
from kronos_model.predictor import FEATURE_COLUMNS, KronosPredictor, reconstruction_offset
from tests.eval_helpers import ETH, TINY

LOOKBACK, HORIZON = 48, 6


@pytest.fixture(scope="module")
def windows():
    """Twelve real ETHUSDT look-backs a day apart, with their timestamps and the next HORIZON hours."""
    frame = read_candles(ETH).tail(24 * 12 + LOOKBACK).to_pandas()
    ends = range(LOOKBACK, len(frame) - HORIZON + 1, 24)
    frames = [frame.iloc[e - LOOKBACK : e][list(FEATURE_COLUMNS)].reset_index(drop=True) for e in ends]
    x_times = [frame["timestamps"].iloc[e - LOOKBACK : e] for e in ends]
    y_times = [frame["timestamps"].iloc[e : e + HORIZON] for e in ends]
    return frames, x_times, y_times


def test_anchoring_shifts_the_prices_by_the_reconstruction_offset_and_nothing_else(windows):
    frames, x_times, y_times = windows
    tokenizer, model = load_pair(TINY)
    predictor = KronosPredictor(model, tokenizer, device="cpu")
    plain = predictor.forecast_batch(frames, x_times, y_times, HORIZON, sample_count=8, seed=3)
    anchored = predictor.forecast_batch(frames, x_times, y_times, HORIZON, sample_count=8, seed=3, anchor=True)
    prepared = [predictor._prepare(f, x, y, HORIZON, "") for f, x, y in zip(frames, x_times, y_times, strict=True)]
    normed = torch.from_numpy(np.stack([p.normed for p in prepared]))
    offset = reconstruction_offset(predictor.tokenizer, normed, predictor.max_context, HORIZON)
    # the offset is observed minus the tokenizer's reconstruction of the last look-back candle
    s1, s2 = predictor.tokenizer.encode(normed, half=True)
    with torch.inference_mode():
        reconstructed = predictor.tokenizer.decode([s1, s2], half=True)[:, -1].numpy()
    np.testing.assert_allclose(offset, normed[:, -1].numpy() - reconstructed, atol=1e-5)
    assert np.abs(offset[:, :4]).mean() > 0.05  # a random tokenizer reconstructs badly: a real shift to test
    for series, a, b, shift in zip(prepared, plain, anchored, offset, strict=True):
        expected = shift[:4] * (series.std[:4] + 1e-5)
        np.testing.assert_allclose(b.paths[:, :, :4] - a.paths[:, :, :4], np.broadcast_to(expected, (8, HORIZON, 4)),
                                   rtol=1e-4, atol=1e-6 * series.mean[:4].max())
        np.testing.assert_array_equal(b.paths[:, :, 4:], a.paths[:, :, 4:])  # volume and amount untouched


def test_anchoring_removes_the_step_one_jump_of_the_median(windows):
    frames, x_times, y_times = windows
    tokenizer, model = load_pair(TINY)
    predictor = KronosPredictor(model, tokenizer, device="cpu")
    jumps = {}
    for anchor in (False, True):
        forecasts = predictor.forecast_batch(frames, x_times, y_times, HORIZON, sample_count=16, seed=0,
                                             anchor=anchor)
        jumps[anchor] = np.mean([abs(np.median(f.close_paths[:, 0]) / f.last_close - 1) for f in forecasts])
    assert jumps[True] < jumps[False] / 5, jumps
    single = predictor.forecast(frames[0], x_times[0], y_times[0], HORIZON, sample_count=16, seed=0, anchor=True)
    assert single.paths.shape == (16, HORIZON, 6)
