"""systemd/kronosd.service: verify prints nothing, the security exposure stays low."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "kronosd.service"
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


@pytest.fixture
def unit(tmp_path) -> Path:
    # ExecStart must name a binary that exists here, so point it at this environment's kronosd
    kronosd = Path(sys.executable).parent / "kronosd"
    text = UNIT.read_text().replace("/opt/kronosd/bin/kronosd", str(kronosd))
    path = tmp_path / "kronosd.service"
    path.write_text(text)
    return path


def test_unit_verifies_cleanly(unit):
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_unit_exposure_is_at_most_3(unit):
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                            text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:]
    assert float(match.group(1)) <= 3.0


def test_unit_is_notify_with_watchdog_reload_and_a_static_user():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "ExecReload=/bin/kill -HUP $MAINPID",
                 "User=kronosd", "StateDirectory=kronosd"):
        assert line in text
    assert "DynamicUser=yes" not in text and "PrivateDevices=yes" not in text  # readers and the GPU stay possible
