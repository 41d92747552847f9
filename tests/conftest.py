from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "kronos-reference"
CONFIGS = FIXTURES / "kronos-configs"
REFERENCE_CASES = sorted(p.name for p in REFERENCE.iterdir() if p.is_dir())


class ReferenceCase:
    """One recorded run of the original Kronos code (see tests/fixtures/README.md)."""

    def __init__(self, name: str):
        self.dir = REFERENCE / name
        self.meta = json.loads((self.dir / "case.json").read_text())
        with np.load(self.dir / "case.npz") as arrays:
            self.arrays = {k: arrays[k] for k in arrays.files}
        self.history = pd.read_csv(self.dir / "history.csv", parse_dates=["timestamps"])
        self.future = pd.read_csv(self.dir / "future.csv", parse_dates=["timestamps"])

    def load(self):
        from kronos_model import Kronos, KronosTokenizer

        return (KronosTokenizer.from_pretrained(self.dir / "tokenizer"),
                Kronos.from_pretrained(self.dir / "model"))


@pytest.fixture(params=REFERENCE_CASES)
def reference_case(request) -> ReferenceCase:
    return ReferenceCase(request.param)


def released_config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.config.json").read_text())


@pytest.fixture
def broker(tmp_path):
    """A private Mosquitto on a free port (tests/daemon_helpers.Broker), stopped after the test."""
    from daemon_helpers import Broker

    broker = Broker(tmp_path)
    yield broker
    broker.stop()
