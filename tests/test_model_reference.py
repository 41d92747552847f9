"""Our implementation reproduces what the original Kronos code computed on the reference checkpoints."""

from __future__ import annotations

import numpy as np
import torch

from kronos_model import KronosPredictor, candle_features
from kronos_model.generation import generate

ATOL = RTOL = 1e-4  # tolerances from tests/fixtures/README.md


def close(actual: torch.Tensor | np.ndarray, expected: np.ndarray) -> None:
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else actual
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=RTOL)


def scalar(actual: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.item(), float(expected), rtol=1e-5)


def test_normalisation_and_stamps(reference_case):
    case, a = reference_case, reference_case.arrays
    tokenizer, model = case.load()
    predictor = KronosPredictor(model, tokenizer, device="cpu", max_context=case.meta["max_context"])
    prepared = predictor._prepare(case.history, case.history.timestamps, case.future.timestamps,
                                  case.meta["pred_len"], "")
    np.testing.assert_array_equal(candle_features(case.history).astype(np.float32), a["x_raw"])
    np.testing.assert_array_equal(prepared.normed, a["x_norm"])


def test_tokenizer_encode_decode_forward(reference_case):
    tokenizer, _ = reference_case.load()
    a = reference_case.arrays
    x = torch.from_numpy(a["x_norm"])[None]
    with torch.no_grad():
        s1, s2 = tokenizer.encode(x, half=True)
        np.testing.assert_array_equal(s1[0].numpy(), a["tok_s1"])
        np.testing.assert_array_equal(s2[0].numpy(), a["tok_s2"])
        close(tokenizer.decode([s1, s2], half=True)[0], a["tok_decode"])
        (z_pre, z_full), bsq_loss, quantized, _ = tokenizer(x)
    close(z_pre[0], a["tok_fwd_pre"])
    close(z_full[0], a["tok_fwd_all"])
    close(quantized[0], a["tok_fwd_quantized"])
    scalar(bsq_loss, a["tok_fwd_bsq_loss"])


def test_composite_ids_put_s1_in_the_low_bits(reference_case):
    tokenizer, _ = reference_case.load()
    a = reference_case.arrays
    with torch.no_grad():
        composite = tokenizer.encode(torch.from_numpy(a["x_norm"])[None], half=False)[0].numpy()
        np.testing.assert_array_equal(composite, a["tok_s1"] + (a["tok_s2"] << 10))
        close(tokenizer.decode(torch.from_numpy(composite)[None], half=False)[0], a["tok_decode"])


def test_predictor_trunk_and_s2_head_in_eval_mode(reference_case):
    _, model = reference_case.load()
    a, length = reference_case.arrays, reference_case.meta["lookback"]
    s1, s2 = torch.from_numpy(a["tok_s1"])[None], torch.from_numpy(a["tok_s2"])[None]
    stamp = torch.from_numpy(a["stamp"][:length])[None]
    assert not model.training
    with torch.no_grad():
        s1_logits, context = model.decode_s1(s1, s2, stamp)
        close(s1_logits[0], a["dec_s1_logits"])
        close(context[0], a["dec_context"])
        close(model.decode_s2(context, s1)[0], a["dec_s2_logits_given_s1"])


def test_predictor_train_mode_forward_and_loss(reference_case):
    _, model = reference_case.load()
    a, length = reference_case.arrays, reference_case.meta["lookback"]
    s1, s2 = torch.from_numpy(a["tok_s1"])[None], torch.from_numpy(a["tok_s2"])[None]
    stamp = torch.from_numpy(a["stamp"][: length - 1])[None]
    model.train()  # all dropouts are 0 in the reference checkpoints; the dependency layer turns causal
    with torch.no_grad():
        s1_logits, s2_logits = model(s1[:, :-1], s2[:, :-1], stamp, use_teacher_forcing=True,
                                     s1_targets=s1[:, 1:])
        loss, ce_s1, ce_s2 = model.head.compute_loss(s1_logits, s2_logits, s1[:, 1:], s2[:, 1:])
    close(s1_logits[0], a["train_s1_logits"])
    close(s2_logits[0], a["train_s2_logits"])
    scalar(loss, a["train_loss"])
    scalar(ce_s1, a["train_ce_s1"])
    scalar(ce_s2, a["train_ce_s2"])


def test_greedy_generation_ids(reference_case):
    """The KV-cached generator picks exactly the original's greedy tokens (incl. the sliding window case)."""
    tokenizer, model = reference_case.load()
    a, meta = reference_case.arrays, reference_case.meta
    lookback = meta["lookback"]
    stamp = torch.from_numpy(a["stamp"])[None]
    out = generate(tokenizer, model, torch.from_numpy(a["x_norm"])[None], stamp[:, :lookback],
                   stamp[:, lookback:], meta["max_context"], meta["pred_len"], sample_count=1, top_k=1)
    np.testing.assert_array_equal(out.s1[0, 0].numpy(), a["greedy_s1"])
    np.testing.assert_array_equal(out.s2[0, 0].numpy(), a["greedy_s2"])


def test_greedy_predict_matches_original_output(reference_case):
    tokenizer, model = reference_case.load()
    meta, case = reference_case.meta, reference_case
    predictor = KronosPredictor(model, tokenizer, device="cpu", max_context=meta["max_context"])
    frame = predictor.predict(case.history, case.history.timestamps, case.future.timestamps, meta["pred_len"],
                              top_k=1, sample_count=1)
    assert list(frame.columns) == ["open", "high", "low", "close", "volume", "amount"]
    assert list(frame.index) == list(case.future.timestamps)
    close(frame.to_numpy(), case.arrays["greedy_pred"])
    # the sliding-window case is the one whose horizon overruns the context
    fits = meta["lookback"] + meta["pred_len"] <= meta["max_context"]
    assert fits == (reference_case.dir.name == "tiny_fits_context")
