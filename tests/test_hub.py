"""Hub-layout save/load: round trips, strictness, corrupt files, offline errors, tokenizer/predictor pairing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REFERENCE, released_config
from safetensors.torch import load_file, save_file

from kronos_model import CheckpointError, Kronos, KronosPredictor, KronosTokenizer

TINY = REFERENCE / "tiny_fits_context"


def test_loaded_models_are_in_eval_mode():
    assert not KronosTokenizer.from_pretrained(TINY / "tokenizer").training
    assert not Kronos.from_pretrained(TINY / "model").training


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = Kronos(**{**released_config("Kronos-mini"), "n_layers": 1})
    tokenizer = KronosTokenizer(**{**released_config("Kronos-Tokenizer-2k"), "n_enc_layers": 2, "n_dec_layers": 2})
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "model" / "config.json").read_text()) == model.config
    # keys sorted like the hub mixin writes them
    text = (tmp_path / "model" / "config.json").read_text()
    assert list(json.loads(text)) == sorted(model.config)

    loaded_model = Kronos.from_pretrained(tmp_path / "model")
    loaded_tokenizer = KronosTokenizer.from_pretrained(tmp_path / "tokenizer")
    x = torch.randn(2, 30, 6)
    stamp = torch.randint(0, 7, (2, 30, 5)).float()
    model.eval()
    tokenizer.eval()
    with torch.no_grad():
        ids = tokenizer.encode(x, half=True)
        for a, b in zip(ids, loaded_tokenizer.encode(x, half=True), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(tokenizer.decode(ids, half=True), loaded_tokenizer.decode(ids, half=True))
        assert torch.equal(model.decode_s1(*ids, stamp)[0], loaded_model.decode_s1(*ids, stamp)[0])
    assert set(load_file(str(tmp_path / "model" / "model.safetensors"))) == set(model.state_dict())


def test_reference_checkpoint_round_trips_byte_for_byte_in_tensors(tmp_path):
    model = Kronos.from_pretrained(TINY / "model")
    model.save_pretrained(tmp_path)
    original = load_file(str(TINY / "model" / "model.safetensors"))
    ours = load_file(str(tmp_path / "model.safetensors"))
    assert set(original) == set(ours)
    assert all(torch.equal(original[k], ours[k]) for k in original)


def copy_checkpoint(tmp_path, part="model"):
    target = tmp_path / part
    shutil.copytree(TINY / part, target)
    return target


def test_truncated_weights_fail_clearly(tmp_path):
    target = copy_checkpoint(tmp_path)
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Kronos.from_pretrained(target)


def test_garbage_weights_fail_clearly(tmp_path):
    target = copy_checkpoint(tmp_path)
    (target / "model.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        Kronos.from_pretrained(target)


def test_missing_weight_is_an_error_not_random_init(tmp_path):
    target = copy_checkpoint(tmp_path)
    tensors = load_file(str(target / "model.safetensors"))
    del tensors["head.proj_s1.weight"]
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 tensors"):
        Kronos.from_pretrained(target)


def test_files_without_derived_buffers_still_load(tmp_path):
    target = copy_checkpoint(tmp_path)
    tensors = load_file(str(target / "model.safetensors"))
    trimmed = {k: v for k, v in tensors.items() if not k.endswith("inv_freq")}
    save_file(trimmed, str(target / "model.safetensors"))
    loaded = Kronos.from_pretrained(target)
    assert torch.equal(loaded.state_dict()["transformer.0.self_attn.rotary.inv_freq"],
                       tensors["transformer.0.self_attn.rotary.inv_freq"])


def test_config_that_does_not_fit_the_weights(tmp_path):
    target = copy_checkpoint(tmp_path)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "ff_dim": 256}))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        Kronos.from_pretrained(target)


def test_config_with_missing_keys_or_bad_values(tmp_path):
    target = copy_checkpoint(tmp_path)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_layers"}))
    with pytest.raises(CheckpointError, match=r"missing keys \['n_layers'\]"):
        Kronos.from_pretrained(target)
    (target / "config.json").write_text(json.dumps({**config, "s2_bits": 9}))
    with pytest.raises(CheckpointError, match="must equal s2_bits"):
        Kronos.from_pretrained(target)
    (target / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        Kronos.from_pretrained(target)


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        Kronos.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="neither an existing directory nor a hub id"):
        Kronos.from_pretrained(tmp_path / "does-not-exist")


LOAD_SMALL = (
    "import sys\n"
    "from kronos_model import CheckpointError, Kronos\n"
    "try:\n"
    "    Kronos.from_pretrained('NeoQuasar/Kronos-small', cache_dir=sys.argv[1])\n"
    "except CheckpointError as exc:\n"
    "    print(exc)\n"
    "    sys.exit(3)\n"
)


@pytest.mark.parametrize(
    "env",
    [
        {"HF_HUB_OFFLINE": "1"},  # offline mode
        {"HF_ENDPOINT": "http://127.0.0.1:9"},  # no network: nothing listens there
    ],
    ids=["HF_HUB_OFFLINE", "unreachable-hub"],
)
def test_uncached_hub_id_offline_says_how_to_get_the_weights(tmp_path, env):
    result = subprocess.run([sys.executable, "-c", LOAD_SMALL, str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_DOWNLOAD_TIMEOUT": "2", "HF_HUB_ETAG_TIMEOUT": "2", **env},
                            timeout=120)
    assert result.returncode == 3, result.stderr
    assert "hf download NeoQuasar/Kronos-small" in result.stdout
    assert "pass its path" in result.stdout


def test_uncached_hub_id_with_local_files_only(tmp_path):
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        KronosTokenizer.from_pretrained("NeoQuasar/Kronos-Tokenizer-base", cache_dir=tmp_path, local_files_only=True)


def test_hub_id_loads_from_a_populated_cache(tmp_path):
    """A hub id resolves through huggingface_hub's cache layout (as after a download elsewhere)."""
    repo = tmp_path / "models--NeoQuasar--Kronos-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(TINY / "model", snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = Kronos.from_pretrained("NeoQuasar/Kronos-tiny", cache_dir=tmp_path, local_files_only=True)
    assert model.config["d_model"] == 64
    model = Kronos.from_pretrained("NeoQuasar/Kronos-tiny", revision=commit, cache_dir=tmp_path,
                                   local_files_only=True)
    assert not model.training


def test_mismatched_pair_fails_clearly():
    tokenizer = KronosTokenizer(**{**released_config("Kronos-Tokenizer-base"), "s1_bits": 8, "s2_bits": 8})
    model = Kronos.from_pretrained(TINY / "model")
    with pytest.raises(ValueError, match="tokenizer and predictor do not match"):
        KronosPredictor(model, tokenizer, device="cpu")
