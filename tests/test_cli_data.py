"""The data commands as users run them: real subprocesses, a `kronosd simulate` process on loopback,
real DuckDB files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from market_helpers import BUNDLED, REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def kronosd(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kronosd {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


@pytest.fixture
def simulator(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "simulate", "--start", "2025-03-01T00:30", "--speed", "0"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        urls = json.loads(process.stdout.readline())
        yield urls
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert process.returncode == 0


def table(db: Path, query: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def test_backfill_twice_changes_nothing_the_second_time(tmp_path, simulator):
    db = tmp_path / "state" / "kronos.duckdb"
    common = ["--symbol", "BTCUSDT", "--interval", "1h", "--db", str(db), "--rest-url", simulator["rest_url"]]
    first = json.loads(kronosd("backfill", "--start", "2024-01-01", "--json", *common, cwd=tmp_path).stdout)
    assert first["rows_changed"] == first["rows_received"] == 425 * 24  # 2024-01-01 → 2025-03-01
    assert first["peak_weight_share"] <= 0.5
    everything = "SELECT * FROM candles ORDER BY open_time"
    before = table(db, everything)
    second = json.loads(kronosd("backfill", "--start", "2024-01-01", "--json", *common, cwd=tmp_path).stdout)
    assert second["holes"] == 0 and second["rows_changed"] == 0
    assert table(db, everything) == before  # ingested_at included
    assert (tmp_path / "state" / "kronos.live.duckdb").exists()


@pytest.mark.slow
def test_backfill_through_the_archive_gives_the_same_store_as_rest(tmp_path, simulator):
    results = {}
    for source in ("rest", "archive"):
        db = tmp_path / source / "kronos.duckdb"
        kronosd(
            "backfill",
            "--symbol",
            "ETHUSDT",
            "--interval",
            "1h",
            "--start",
            "2023-06-01",
            "--end",
            "2024-05-01",
            "--source",
            source,
            "--db",
            str(db),
            "--rest-url",
            simulator["rest_url"],
            "--archive-url",
            simulator["archive_url"],
            cwd=tmp_path,
        )
        results[source] = table(
            db, "SELECT open_time, open, high, low, close, volume, quote_volume, trades FROM candles ORDER BY 1"
        )
    assert len(results["rest"]) == 335 * 24
    assert results["rest"] == results["archive"]


def test_backfill_errors_are_one_clear_line(tmp_path, simulator):
    db = str(tmp_path / "kronos.duckdb")
    unknown = kronosd(
        "backfill",
        "--symbol",
        "NOPEUSDT",
        "--interval",
        "1h",
        "--days",
        "2",
        "--db",
        db,
        "--rest-url",
        simulator["rest_url"],
        cwd=tmp_path,
        check=False,
    )
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines()[-1].startswith("kronosd backfill: error: unknown symbol 'NOPEUSDT'")
    bad_interval = kronosd(
        "backfill",
        "--symbol",
        "BTCUSDT",
        "--interval",
        "1M",
        "--days",
        "2",
        "--db",
        db,
        "--rest-url",
        simulator["rest_url"],
        cwd=tmp_path,
        check=False,
    )
    assert bad_interval.returncode == 2 and "months have no fixed length" in bad_interval.stderr


def test_a_ban_stops_the_backfill_and_says_until_when(tmp_path, simulator):
    import urllib.request

    urllib.request.urlopen(
        urllib.request.Request(f"{simulator['rest_url']}/_sim/fault?spec=rest:418:1:600", method="POST"), timeout=10
    ).read()
    db = str(tmp_path / "state" / "kronos.duckdb")
    args = (
        "backfill",
        "--symbol",
        "BTCUSDT",
        "--interval",
        "1h",
        "--days",
        "3",
        "--db",
        db,
        "--rest-url",
        simulator["rest_url"],
    )
    banned = kronosd(*args, cwd=tmp_path, check=False)
    assert banned.returncode == 3
    assert "banned this IP (HTTP 418) until" in banned.stderr
    again = kronosd(*args, cwd=tmp_path, check=False)  # remembered: no request is sent
    assert again.returncode == 3


@pytest.mark.slow
def test_import_stats_export_round_trip_on_the_bundled_data(tmp_path):
    db = tmp_path / "kronos.duckdb"
    imported = kronosd(
        "import",
        str(BUNDLED / "BTCUSDT_1h.parquet"),
        str(BUNDLED / "ETHUSDT_1h.parquet"),
        "--db",
        str(db),
        cwd=tmp_path,
    )
    assert "26303 of 26303 candles new or changed" in imported.stdout
    stats = json.loads(
        kronosd("stats", "--symbol", "BTCUSDT", "--interval", "1h", "--json", "--db", str(db), cwd=tmp_path).stdout
    )
    assert stats["rows"] == 26303 and stats["expected"] == 26304 and stats["missing"] == 1
    assert [gap["from_utc"] for gap in stats["gaps"]] == ["2023-03-24T13:00:00Z"]
    assert stats["duplicates"] == 0 and stats["ohlc_violations"] == 0 and stats["zero_volume"] == 1
    assert 0.2 < stats["returns"]["annualized_volatility"] < 1.0
    text = kronosd("stats", "--symbol", "BTCUSDT", "--interval", "1h", "--db", str(db), cwd=tmp_path).stdout
    assert "2023-03-24T13:00:00Z .. 2023-03-24T14:00:00Z (1 candles)" in text

    csv_out, json_out = tmp_path / "out" / "eth.csv", tmp_path / "out" / "eth.json"
    kronosd(
        "export",
        "--symbol",
        "ETHUSDT",
        "--interval",
        "1h",
        "--format",
        "csv",
        "--start",
        "2024-01-01",
        "--out",
        str(csv_out),
        "--db",
        str(db),
        cwd=tmp_path,
    )
    kronosd(
        "export",
        "--symbol",
        "ETHUSDT",
        "--interval",
        "1h",
        "--format",
        "json",
        "--end",
        "2022-09-24",
        "--out",
        str(json_out),
        "--db",
        str(db),
        cwd=tmp_path,
    )
    assert csv_out.read_text().splitlines()[0].startswith("open_time,open,high,low,close,volume,close_time")
    records = json.loads(json_out.read_text())
    assert records[0]["open_time"] == 1663916400000 and len(records) == 17
    again = kronosd("import", str(csv_out), "--symbol", "ETHUSDT", "--interval", "1h", "--db", str(db), cwd=tmp_path)
    assert "0 of " in again.stdout  # the exported file is exactly what is stored


BAD_FILES = {
    "nan": "open_time,open,high,low,close,volume\n0,1,2,0.5,NaN,10\n",
    "unsorted": "open_time,open,high,low,close,volume\n3600000,1,2,0.5,1.5,10\n0,1,2,0.5,1.5,10\n",
    "duplicate": "open_time,open,high,low,close,volume\n0,1,2,0.5,1.5,10\n0,1,2,0.5,1.5,10\n",
    "off-grid": "open_time,open,high,low,close,volume\n0,1,2,0.5,1.5,10\n3601000,1,2,0.5,1.5,10\n",
    "columns": "time,open,high,low,close,volume\n0,1,2,0.5,1.5,10\n",
    "ohlc": "open_time,open,high,low,close,volume\n0,1,2,0.5,3,10\n",
}
EXPECTED_MESSAGE = {
    "nan": "no value (empty or NaN) in required column close",
    "unsorted": "earlier than the row before them",
    "duplicate": "share an open_time",
    "off-grid": "off the 1h grid",
    "columns": "wrong columns",
    "ohlc": "break low <= open, close <= high",
}


@pytest.mark.parametrize("problem", sorted(BAD_FILES))
def test_a_bad_file_gets_a_clear_report_and_nothing_is_stored(tmp_path, problem):
    path = tmp_path / f"TESTUSDT_1h_{problem}.csv"
    path.write_text(BAD_FILES[problem])
    good = tmp_path / "GOODUSDT_1h.csv"
    good.write_text("open_time,open,high,low,close,volume\n0,1,2,0.5,1.5,10\n")
    db = tmp_path / "kronos.duckdb"
    result = kronosd("import", str(good), str(path), "--db", str(db), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert EXPECTED_MESSAGE[problem] in result.stderr
    assert not db.exists(), "a bad file aborts the whole import before anything is stored"


def test_stats_without_a_database_says_what_to_do(tmp_path):
    result = kronosd(
        "stats",
        "--symbol",
        "BTCUSDT",
        "--interval",
        "1h",
        "--db",
        str(tmp_path / "none.duckdb"),
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert "run `kronosd backfill` or `kronosd import` first" in result.stderr


def test_import_reads_binance_archive_zips_and_gzipped_csv(tmp_path, simulator):
    import gzip
    import urllib.request

    # A real archive-layout zip (headerless, microsecond times in 2025) as the simulator serves it.
    zip_path = tmp_path / "BTCUSDT-1h-2025-01.zip"
    url = f"{simulator['archive_url']}/data/spot/monthly/klines/BTCUSDT/1h/{zip_path.name}"
    with urllib.request.urlopen(url, timeout=10) as response:
        zip_path.write_bytes(response.read())
    gz_path = tmp_path / "ETHUSDT_1h.csv.gz"
    csv_text = "open_time,open,high,low,close,volume\n1709251200000,3340.1,3350,3330,3345,10\n"
    gz_path.write_bytes(gzip.compress(csv_text.encode()))
    db = tmp_path / "kronos.duckdb"
    result = kronosd("import", str(zip_path), str(gz_path), "--db", str(db), cwd=tmp_path)
    assert "microsecond times" in result.stdout
    rows = table(db, "SELECT symbol, count(*), min(epoch_ms(open_time)) FROM candles GROUP BY 1 ORDER BY 1")
    assert rows == [("BTCUSDT", 744, 1735689600000), ("ETHUSDT", 1, 1709251200000)]


@pytest.mark.slow
def test_simulate_serves_a_store_with_faults_and_backfill_rides_them_out(tmp_path):
    source = tmp_path / "source.duckdb"
    kronosd("import", str(BUNDLED / "ETHUSDT_1h.parquet"), "--db", str(source), cwd=tmp_path)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "simulate",
            "--store",
            str(source),
            "--start",
            "2024-09-01T00:30",
            "--speed",
            "0",
            "--fault",
            "rest:5xx:2",
            "--fault",
            "rest:429:1:1",
        ],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        urls = json.loads(process.stdout.readline())
        assert urls["series"] == ["ETHUSDT 1h (17518 candles)"]
        db = tmp_path / "copy" / "kronos.duckdb"
        report = json.loads(
            kronosd(
                "backfill",
                "--symbol",
                "ETHUSDT",
                "--interval",
                "1h",
                "--start",
                "2024-08-01",
                "--json",
                "--db",
                str(db),
                "--rest-url",
                urls["rest_url"],
                cwd=tmp_path,
            ).stdout
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert report["rows_changed"] == 31 * 24 and report["rate_limited"] == 1
    query = "SELECT open_time, open, high, low, close, volume, quote_volume, trades FROM candles ORDER BY 1"
    window = " WHERE open_time >= TIMESTAMPTZ '2024-08-01 00:00+00' AND open_time < TIMESTAMPTZ '2024-09-01 00:00+00'"
    assert table(db, query) == table(source, query.replace(" ORDER BY", window + " ORDER BY"))


def test_many_pairs_in_one_call_backfill_stats_export_and_import_back(tmp_path, simulator):
    state = tmp_path / "state"
    config = tmp_path / "config.yaml"
    config.write_text("markets:\n  symbols: [BTCUSDT, ETHUSDT]\n  intervals: [1h]\n")
    common = ["--config", str(config), "--state-dir", str(state)]
    backfilled = json.loads(kronosd("backfill", "--all-pairs", "--start", "2024-08-01", "--end", "2024-08-29", "--json",
                                    "--rest-url", simulator["rest_url"], *common, cwd=tmp_path).stdout)
    assert [(r["symbol"], r["interval"]) for r in backfilled] == [("BTCUSDT", "1h"), ("ETHUSDT", "1h")]
    # 28 days of candles per pair, both fetched in one run (the bundled ETHUSDT ends in 2024-09)
    assert [r["rows_changed"] for r in backfilled] == [28 * 24, 28 * 24]
    assert all(r["peak_weight_share"] <= 0.5 for r in backfilled)
    stats = json.loads(kronosd("stats", "--symbol", "btcusdt,ETHUSDT", "--interval", "1h", "--json", *common,
                               cwd=tmp_path).stdout)
    assert [(s["symbol"], s["interval"], s["rows"]) for s in stats] == [("BTCUSDT", "1h", 672), ("ETHUSDT", "1h", 672)]
    out = tmp_path / "exported"
    kronosd("export", "--all-pairs", "--out", str(out), *common, cwd=tmp_path)
    files = sorted(path.name for path in out.iterdir())
    assert files == ["BTCUSDT-1h.csv", "ETHUSDT-1h.csv"]
    copy = tmp_path / "copy"
    imported = kronosd("import", *(str(out / name) for name in files), "--state-dir", str(copy), cwd=tmp_path)
    assert imported.stdout.count("672 of 672 candles new or changed") == 2
    assert table(copy / "kronos.duckdb", "SELECT symbol, interval, count(*) FROM candles GROUP BY ALL ORDER BY ALL") \
        == [("BTCUSDT", "1h", 672), ("ETHUSDT", "1h", 672)]
    to_one_file = kronosd("export", "--all-pairs", "--out", "-", *common, cwd=tmp_path, check=False)
    assert to_one_file.returncode == 2 and "must be a directory" in to_one_file.stderr
