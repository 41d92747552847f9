"""Token sampling (kronos_model/generation.py `sample_rows`): the nucleus distribution exactly, row by row.

The sampler inverts each row's cumulative distribution at one uniform draw and looks for the nucleus among a
few candidates first; these tests pin the distribution against a reference computed by brute force, and that a
row's token never depends on which other rows (narrow or wide nuclei) share the call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kronos_model.generation import CANDIDATES, sample_per_series, sample_rows


def reference_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Temperature, then top_k, then top_p on a full sort: what the original's filters mean, row by row."""
    probs = np.zeros(logits.shape, dtype=np.float64)
    for r, row in enumerate(logits.double().numpy() / temperature):
        order = np.argsort(-row, kind="stable")
        allowed = order[:top_k] if top_k > 0 else order
        weights = np.exp(row[allowed] - row[allowed].max())
        weights /= weights.sum()
        before = np.cumsum(weights) - weights
        kept = before <= top_p
        probs[r, allowed[kept]] = weights[kept] / weights[kept].sum()
    return probs


VOCAB = 512


@pytest.mark.parametrize(("scale", "top_k", "top_p"), [(4.0, 0, 0.9), (2.0, 0, 0.9), (0.3, 0, 0.9), (1.0, 50, 0.8),
                                                       (2.0, 5, 1.0), (1.0, 0, 1.0), (3.0, 300, 0.95)])
def test_frequencies_match_the_nucleus_distribution(scale, top_k, top_p):
    """Narrow nuclei (found among the first candidates), wide ones (sorted in full), top_k with and without top_p:
    30k draws of each row land within 4.5 standard errors of the reference probabilities."""
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB) * scale
    draws = 30_000
    sampled = sample_rows(logits.repeat_interleave(draws, 0), 1.3, top_k, top_p,
                          torch.rand(3 * draws, generator=torch.Generator().manual_seed(1)))
    reference = reference_distribution(logits, 1.3, top_k, top_p)
    for r in range(3):
        counts = np.bincount(sampled[r * draws:(r + 1) * draws].numpy(), minlength=VOCAB) / draws
        assert (counts[reference[r] == 0] == 0).all(), "a token outside the nucleus was drawn"
        error = np.sqrt(reference[r] * (1 - reference[r]) / draws) + 1e-9
        assert (np.abs(counts - reference[r]) <= 4.5 * error + 1e-4).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.05, 20.0), st.integers(0, 2**31 - 1)), min_size=2, max_size=12),
       st.sampled_from([0, 1, 3, 40, 300]), st.sampled_from([0.3, 0.9, 1.0]), st.integers(0, 2**31 - 1))
def test_a_row_draws_the_same_token_whatever_shares_the_call(rows, top_k, top_p, seed):
    """Rows of any spread (nuclei of 1 token to most of the vocabulary, so every rung of the candidate ladder)
    sampled together give each row the token it gets alone."""
    logits = torch.stack([torch.randn(VOCAB, generator=torch.Generator().manual_seed(s)) * scale
                          for scale, s in rows])
    uniforms = torch.rand(len(rows), generator=torch.Generator().manual_seed(seed))
    together = sample_rows(logits, 1.0, top_k, top_p, uniforms)
    alone = torch.cat([sample_rows(logits[i:i + 1], 1.0, top_k, top_p, uniforms[i:i + 1]) for i in range(len(rows))])
    assert torch.equal(together, alone)


def test_the_candidate_ladder_is_exercised():
    """The frequency cases reach every rung: a nucleus inside the first candidates, between, and wider than the last."""
    sizes = []
    for scale in (4.0, 2.0, 0.3):
        probs = torch.softmax(torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * scale, -1)
        ordered = probs.sort(descending=True).values
        sizes.append(int(((ordered.cumsum(0) - ordered) <= 0.9).sum()))
    assert sizes[0] < CANDIDATES[0] < sizes[1] < CANDIDATES[-1] < sizes[2]


def test_per_series_draws_come_from_each_series_generator():
    logits = torch.randn(12, 1024)
    batched = sample_per_series(logits, 4, 1.0, 0, 0.9, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    for b, seed in enumerate((1, 2, 3)):
        alone = sample_per_series(logits[4 * b:4 * b + 4], 4, 1.0, 0, 0.9, [torch.Generator().manual_seed(seed)])
        assert torch.equal(batched[4 * b:4 * b + 4], alone)
    with pytest.raises(ValueError, match="generators"):
        sample_per_series(logits, 4, 1.0, 0, 0.9, [torch.Generator()] * 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_an_error_not_a_token(bad):
    logits = torch.randn(4, 1024)
    logits[2, 7] = bad
    with pytest.raises(ValueError, match="not finite"):
        sample_rows(logits, 1.0, 0, 0.9, torch.rand(4))
