"""The released configs build exactly the released architectures; bad configs fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONFIGS, REFERENCE, released_config
from safetensors.torch import load_file

from kronos_model import Kronos, KronosTokenizer

ZOO = json.loads((CONFIGS / "model-zoo.json").read_text())


@pytest.mark.parametrize("name", sorted(ZOO["parameters"]))
def test_released_configs_give_the_published_parameter_counts(name):
    cls = KronosTokenizer if "Tokenizer" in name else Kronos
    model = cls(**released_config(name))
    assert sum(p.numel() for p in model.parameters()) == ZOO["parameters"][name]
    assert model.config == released_config(name)


def test_state_dict_keys_and_buffers_match_the_original_files():
    """Same key set, shapes and dtypes as the checkpoints the original code wrote (buffers included)."""
    for directory, cls in ((REFERENCE / "tiny_fits_context" / "tokenizer", KronosTokenizer),
                           (REFERENCE / "tiny_fits_context" / "model", Kronos)):
        original = load_file(str(directory / "model.safetensors"))
        ours = cls(**json.loads((directory / "config.json").read_text())).state_dict()
        assert set(ours) == set(original)
        for key, tensor in original.items():
            assert ours[key].shape == tensor.shape, key
            assert ours[key].dtype == tensor.dtype, key
            if key.endswith(("inv_freq", "basis")):
                assert torch.equal(ours[key], tensor), key


def test_released_predictor_has_the_expected_buffers():
    keys = Kronos(**released_config("Kronos-small")).state_dict()
    assert keys["transformer.0.self_attn.rotary.inv_freq"].shape == (32,)
    assert keys["dep_layer.cross_attn.rotary.inv_freq"].shape == (64,)  # 4 heads of 128
    tok = KronosTokenizer(**released_config("Kronos-Tokenizer-base")).state_dict()
    assert tok["tokenizer.bsq.basis"].tolist() == [2**i for i in range(19, -1, -1)]
    assert tok["tokenizer.bsq.group_basis"].tolist() == [8, 4, 2, 1]


@pytest.mark.parametrize(
    ("cls", "name", "change", "message"),
    [
        (Kronos, "Kronos-mini", {"s2_bits": 8}, "s1_bits .* must equal s2_bits"),
        (KronosTokenizer, "Kronos-Tokenizer-base", {"s1_bits": 12}, "s1_bits .* must equal s2_bits"),
        (Kronos, "Kronos-mini", {"n_heads": 3}, "divisible by n_heads"),
        (KronosTokenizer, "Kronos-Tokenizer-2k", {"d_model": 250}, "divisible by n_heads"),
        (Kronos, "Kronos-mini", {"d_model": 30, "n_heads": 3}, "dependency layer"),
    ],
)
def test_configs_the_original_mishandles_are_rejected(cls, name, change, message):
    with pytest.raises(ValueError, match=message):
        cls(**{**released_config(name), **change})


def test_padding_mask_hides_padded_keys():
    """The original crashes on a padding mask; ours ignores padded positions."""
    torch.manual_seed(0)
    model = Kronos(**{**released_config("Kronos-mini"), "n_layers": 2}).eval()
    s1 = torch.randint(0, 1024, (1, 12))
    s2 = torch.randint(0, 1024, (1, 12))
    pad = torch.zeros(1, 12, dtype=torch.bool)
    pad[:, :4] = True  # left padding
    with torch.no_grad():
        padded, _ = model.decode_s1(s1, s2, padding_mask=pad)
        other = s1.clone()
        other[:, :4] = (other[:, :4] + 7) % 1024  # change only the padded tokens
        changed, _ = model.decode_s1(other, s2, padding_mask=pad)
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[:, 4:], changed[:, 4:])
