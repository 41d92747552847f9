"""The daemon against a hostile exchange, end to end (real subprocesses, a real broker), and the operator-facing
guards: supervised restarts, forward-only forecasts, registry version names, file modes, exposed secrets."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import stat
import subprocess
import sys

import pytest
from daemon_helpers import ROOT, Daemon, Simulator, Subscriber, daemon_config, wait_for
from test_daemon_e2e import assert_candles_match_truth, snapshot_rows

from daemon.config import KronosConfig, MqttConfig
from daemon.mqtt import Publisher
from daemon.service import Daemon as Service
from daemon.simulator.hostile import EXPECTED_REJECTIONS
from storage.writer import StoreWriter

SYMBOLS = ("BTCUSDT", "ETHUSDT")


def origins_by_pair(subscriber: Subscriber) -> dict[str, list[str]]:
    return {symbol: [f["origin_time"] for f in subscriber.forecasts(symbol)] for symbol in SYMBOLS}


def assert_strictly_increasing(values: list, what: str) -> None:
    assert all(a < b for a, b in itertools.pairwise(values)), f"{what} went back: {values}"


@pytest.mark.slow
def test_daemon_survives_a_hostile_exchange_keeps_the_truth_and_never_forecasts_backwards(tmp_path, broker):
    simulator = Simulator("2024-06-01", 7200, "--profile", "hostile", "--seed", "3", "--hostile-rate", "0.9")
    subscriber = Subscriber(broker.port)
    config = daemon_config(tmp_path, simulator, broker.port, symbols=SYMBOLS,
                           mqtt={"username": "kronos", "password": "not-a-secret"})
    config.chmod(0o644)  # world-readable with a password in it: a warning, not a refusal
    daemon = Daemon(config)
    restarted = None
    try:
        daemon.wait_event("daemon_ready", 60)
        assert daemon.events("config_world_readable")
        for symbol in SYMBOLS:
            wait_for(lambda s=symbol: len(subscriber.forecasts(s)) >= 30, 120, what=f"{symbol} forecasts")
        assert daemon.process.poll() is None, "the daemon died"
        injected = simulator.stats()["hostile_injected"]
        assert daemon.stop() == 0
        stopped = daemon.events("daemon_stopped")[0]

        # every kind of garbage the exchange sent is counted in the daemon's summary
        counted = stopped["rejected_inputs"]
        expected = {EXPECTED_REJECTIONS[kind] for kind, n in injected.items() if n > 0 and kind in EXPECTED_REJECTIONS}
        assert len(injected) >= 15, injected
        assert expected <= set(counted), f"never counted: {sorted(expected - set(counted))}"
        reasons = {(line["boundary"], line["reason"]) for line in daemon.events("input_rejected")}
        assert {tuple(key.split(":")) for key in expected} <= reasons, "each kind is also logged"

        # a second life on the same state: forecasts still only move forward
        restarted = Daemon(config)
        restarted.wait_event("daemon_ready", 60)
        before = {s: len(subscriber.forecasts(s)) for s in SYMBOLS}
        for symbol in SYMBOLS:
            wait_for(lambda s=symbol: len(subscriber.forecasts(s)) >= before[s] + 3, 120,
                     what="forecasts after restart")
        assert restarted.stop() == 0
    except BaseException:
        daemon.dump()
        if restarted is not None:
            restarted.dump()
        raise
    finally:
        for process in (daemon, restarted):
            if process is not None and process.process.poll() is None:
                process.kill()
        subscriber.close()
        simulator.close()

    snapshot = tmp_path / "state" / "kronos.duckdb"
    for symbol in SYMBOLS:
        assert_candles_match_truth(snapshot, symbol)
        assert_strictly_increasing(origins_by_pair(subscriber)[symbol], f"{symbol} retained forecast origin")
        issued = snapshot_rows(snapshot, "SELECT DISTINCT origin_time, issued_at FROM forecasts "
                                         f"WHERE symbol = '{symbol}' ORDER BY issued_at")
        assert_strictly_increasing([origin for origin, _ in issued], f"{symbol} origins in the forecasts table")
    # deliberate modes: the service's group reads the state and the snapshot, nobody else does
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o750
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o640


def test_a_publisher_never_moves_a_retained_forecast_back_in_time():
    publisher = Publisher(MqttConfig())
    assert publisher.publish_forecast("BTCUSDT", "1h", {"origin_time": "b"}, origin_ms=2_000)
    assert not publisher.publish_forecast("BTCUSDT", "1h", {"origin_time": "a"}, origin_ms=1_000)
    assert not publisher.publish_forecast("BTCUSDT", "1h", {"origin_time": "b"}, origin_ms=2_000)
    assert publisher.publish_forecast("ETHUSDT", "1h", {"origin_time": "a"}, origin_ms=1_000)
    assert json.loads(publisher._retained["kronos/forecast/BTCUSDT/1h"])["origin_time"] == "b"


def test_a_failed_subsystem_is_restarted_with_backoff_and_a_dead_store_stops_the_daemon(tmp_path):
    service = Service(KronosConfig())

    async def scenario():
        service.writer = StoreWriter(tmp_path / "live.duckdb").start()
        service.exit_code = 0
        lives = []

        async def flaky():
            lives.append(len(lives))
            if len(lives) <= 2:
                raise RuntimeError(f"failure {len(lives)}")
            await asyncio.sleep(3600)

        service._start("flaky", flaky)
        await asyncio.sleep(3.6)  # 1 s, then 2 s of backoff
        assert lives == [0, 1, 2] and service.restarts["flaky"] == 2
        assert not service._tasks["flaky"].done() and not service._stop.is_set()

        async def doomed():
            await asyncio.sleep(0.1)
            raise RuntimeError("disk gone")

        service.writer.close()  # the store can no longer be written
        service._start("doomed", doomed)
        await asyncio.wait_for(service._stop.wait(), 5)
        assert service.exit_code == 1
        for task in service._tasks.values():
            task.cancel()

    asyncio.run(scenario())


def kronosd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_models_promote_accepts_only_registry_version_names(tmp_path):
    import torch

    from daemon.registry import ModelRegistry
    from kronos_model import Kronos, KronosTokenizer
    from kronos_model.finetune.config import TINY_PREDICTOR, TINY_TOKENIZER

    torch.manual_seed(0)
    registry = ModelRegistry(tmp_path / "models")
    version = registry.add_pair(KronosTokenizer(**TINY_TOKENIZER), Kronos(**TINY_PREDICTOR), {"origin": "test"})
    registry.promote(version)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for hostile in ("../elsewhere", str(outside), "v../../x", "current", "-"):
        result = kronosd("models", "promote", hostile, "--state-dir", str(tmp_path))
        assert result.returncode == 2, result.stderr
        assert "is not a model version name" in result.stderr and "Traceback" not in result.stderr
        assert registry.resolve("current") == version
    missing = kronosd("models", "promote", "v20990101T000000-deadbeef", "--state-dir", str(tmp_path))
    assert missing.returncode == 2 and "no model version" in missing.stderr

    # a `current` link planted to point outside the registry is refused, not followed
    (tmp_path / "models" / "current").unlink()
    os.symlink(str(outside), tmp_path / "models" / "current")
    listed = kronosd("models", "list", "--state-dir", str(tmp_path))
    assert listed.returncode == 2 and "not at a version of this registry" in listed.stderr
