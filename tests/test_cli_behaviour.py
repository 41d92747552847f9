"""The command line behaves like its Unix peers: --version, stdout output, broken pipes, one-line errors,
strict config, consistent options and times, and the model pairing rule — as real subprocesses."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import polars as pl
import pytest
from market_helpers import BUNDLED, REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TINY = REPO / "daemon" / "assets" / "checkpoints" / "tiny-random"


def kronosd(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], cwd=cwd, env=env or ENV,
                          capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    """A state directory whose database holds the bundled ETHUSDT 1h candles."""
    state = tmp_path_factory.mktemp("state")
    result = kronosd("import", str(BUNDLED / "ETHUSDT_1h.parquet"), "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    return state


def test_version_matches_the_installed_package():
    result = kronosd("--version")
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"kronosd {version('kronosd')}"


def test_export_to_stdout_as_csv_and_parquet(state_dir, tmp_path):
    window = ["--symbol", "ETHUSDT", "--interval", "1h", "--start", "2024-01-01", "--end", "2024-01-02"]
    csv = kronosd("export", *window, "--state-dir", str(state_dir), "--out", "-")
    assert csv.returncode == 0, csv.stderr
    frame = pl.read_csv(io.BytesIO(csv.stdout))
    assert frame.height == 24 and frame["open_time"][0] == 1704067200000
    assert b"wrote 24 candles to stdout" in csv.stderr
    assert not (tmp_path / "-").exists()
    parquet = kronosd("export", *window, "--state-dir", str(state_dir), "--format", "parquet", "--out", "-")
    assert parquet.returncode == 0, parquet.stderr
    assert pl.read_parquet(io.BytesIO(parquet.stdout)).equals(frame.cast(pl.read_parquet(io.BytesIO(
        parquet.stdout)).schema))


def test_export_to_dev_stdout_keeps_the_device_link(state_dir):
    before = os.lstat("/dev/stdout")
    result = kronosd("export", "--symbol", "ETHUSDT", "--interval", "1h", "--start", "2024-01-01", "--end",
                     "2024-01-01T03:00", "--state-dir", str(state_dir), "--out", "/dev/stdout")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[0].startswith("open_time,open,high")
    assert os.lstat("/dev/stdout").st_mode == before.st_mode  # still the symlink, not a regular file


def test_export_through_a_symlink_replaces_its_target(state_dir, tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    result = kronosd("export", "--symbol", "ETHUSDT", "--interval", "1h", "--start", "2024-01-01", "--end",
                     "2024-01-01T02:00", "--format", "json", "--state-dir", str(state_dir), "--out", str(link))
    assert result.returncode == 0, result.stderr
    assert link.is_symlink()
    assert [row["open_time"] for row in json.loads(target.read_text())] == [1704067200000, 1704070800000]


def test_os_errors_are_one_line(state_dir, tmp_path):
    result = kronosd("export", "--symbol", "ETHUSDT", "--interval", "1h", "--state-dir", str(state_dir),
                     "--out", str(tmp_path))  # a directory where a file should be
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    assert result.stderr.decode().startswith("kronosd export: error:") and "directory" in result.stderr.decode()


def test_broken_pipe_is_quiet_and_the_out_file_is_written(tmp_path):
    out = tmp_path / "steps.csv"
    process = subprocess.Popen([sys.executable, "-m", "daemon.cli", "forecast", "--horizon", "4", "--samples",
                                "2", "--lookback", "64", "--json", "--out", str(out)],
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before anything is printed, as with `| head -0`
    stderr = process.stderr.read()
    assert process.wait(timeout=180) == 141
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr
    assert out.read_text().splitlines()[0].startswith("timestamps,open_mean")


def test_forecast_json_times_are_iso_utc_with_z():
    result = kronosd("forecast", "--end", "2025-06-01T00:00", "--horizon", "2", "--samples", "2", "--lookback",
                     "64", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["history_end"] == "2025-06-01T00:00:00Z"
    assert [step["timestamps"] for step in payload["steps"]] == ["2025-06-01T01:00:00Z", "2025-06-01T02:00:00Z"]


def test_stats_json_has_z_times_and_whole_missing_candles(state_dir):
    result = kronosd("stats", "--symbol", "ETHUSDT", "--interval", "1h", "--json", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["first_utc"] == "2022-09-23T07:00:00Z"  # the bundled sample's first candle
    # the real outage of 2023-03-24 13:00 UTC: one whole candle, not 1.0
    assert report["gaps"][0] == {"from": 1679662800000, "until": 1679666400000, "from_utc": "2023-03-24T13:00:00Z",
                                 "until_utc": "2023-03-24T14:00:00Z", "missing_candles": 1}
    assert all(isinstance(gap["missing_candles"], int) for gap in report["gaps"])


def test_db_and_state_dir_name_the_same_database(state_dir):
    by_dir = kronosd("stats", "--symbol", "ETHUSDT", "--interval", "1h", "--json", "--state-dir", str(state_dir))
    by_file = kronosd("stats", "--symbol", "ETHUSDT", "--interval", "1h", "--json", "--db",
                      str(state_dir / "kronos.duckdb"))
    assert by_dir.stdout == by_file.stdout
    both = kronosd("stats", "--symbol", "ETHUSDT", "--interval", "1h", "--state-dir", str(state_dir), "--db", "x")
    assert both.returncode == 2 and b"not allowed with argument" in both.stderr


def test_a_misspelled_top_level_section_is_an_error(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("mqqt:\n  host: broker\n")
    for command in (("config", "check", str(config)), ("run", "--config", str(config))):
        result = kronosd(*command, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert b"mqqt: unknown key (known here: exchange, storage" in result.stderr


def test_config_init_writes_the_documented_defaults(tmp_path):
    result = kronosd("config", "init", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = tmp_path / "config.yaml"
    assert written.read_text() == (REPO / "daemon" / "assets" / "config.yaml").read_text()
    assert kronosd("config", "check", cwd=tmp_path).returncode == 0
    again = kronosd("config", "init", cwd=tmp_path)
    assert again.returncode == 2 and b"--force" in again.stderr
    finetune = kronosd("config", "init", "--kind", "finetune-demo", "ft.yaml", cwd=tmp_path)
    assert finetune.returncode == 0, finetune.stderr
    data_line = next(line for line in (tmp_path / "ft.yaml").read_text().splitlines() if line.startswith("data_"))
    assert Path(data_line.split(":", 1)[1].strip()).is_file()  # the bundled candles, by absolute path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_config_init_writes_a_unit_with_this_installations_paths(tmp_path):
    unit = tmp_path / "kronosd.service"
    assert kronosd("config", "init", "--kind", "systemd", str(unit)).returncode == 0
    text = unit.read_text()
    documentation = next(line for line in text.splitlines() if line.startswith("Documentation="))
    assert Path(documentation.removeprefix("Documentation=file://")).is_file()
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == ""


def test_a_predictor_without_a_tokenizer_is_not_paired_with_the_bundled_one(tmp_path):
    lone = tmp_path / "predictor"
    shutil.copytree(TINY / "model", lone)
    result = kronosd("forecast", "--model", str(lone), "--horizon", "2", "--samples", "2", "--lookback", "64")
    assert result.returncode == 2
    assert b"which tokenizer goes with" in result.stderr
    paired = kronosd("forecast", "--model", str(lone), "--tokenizer", str(TINY / "tokenizer"), "--horizon", "2",
                     "--samples", "2", "--lookback", "64", "--json")
    assert paired.returncode == 0, paired.stderr
    assert json.loads(paired.stdout)["tokenizer"] == str(TINY / "tokenizer")


def test_an_unreachable_hub_fails_at_once_with_the_way_out(tmp_path):
    # A closed loopback port stands in for a machine without internet; the cache is empty.
    env = {**ENV, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    result = kronosd("forecast", "--model", "NeoQuasar/Kronos-small", "--horizon", "2", env=env)
    assert result.returncode == 2
    assert b"not in the local Hugging Face cache" in result.stderr and b"hf download" in result.stderr
    assert b"Retrying" not in result.stderr  # no huggingface_hub retry loop before the answer


def test_float_epoch_open_times_load_and_fractions_are_refused(tmp_path):
    frame = pl.read_parquet(BUNDLED / "ETHUSDT_1h.parquet").tail(80)
    floats = tmp_path / "resampled.csv"
    frame.with_columns(pl.col("open_time").cast(pl.Float64)).write_csv(floats, float_scientific=True)
    assert "e12" in floats.read_text().splitlines()[1]
    result = kronosd("forecast", "--data", str(floats), "--lookback", "64", "--horizon", "2", "--samples", "2",
                     "--json")
    assert result.returncode == 0, result.stderr
    last = frame["open_time"][-1]
    assert json.loads(result.stdout)["history_end"] == f"{pl.from_epoch(pl.Series([last]), 'ms')[0]:%Y-%m-%dT%H:%M:%SZ}"
    fractional = tmp_path / "fractional.csv"
    frame.with_columns(pl.col("open_time").cast(pl.Float64) + 0.5).write_csv(fractional)
    refused = kronosd("forecast", "--data", str(fractional), "--lookback", "64")
    assert refused.returncode == 2 and b"whole epoch milliseconds" in refused.stderr
    assert b"Traceback" not in refused.stderr
