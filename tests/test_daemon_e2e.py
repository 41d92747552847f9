"""`kronosd run` end to end: the daemon as a subprocess against the exchange simulator and a real Mosquitto
broker, driven by real signals. The market clock runs at 2 hours per second."""

from __future__ import annotations

import json
import signal
import time

import duckdb
import polars as pl
import pytest
import yaml
from daemon_helpers import (
    Daemon,
    NotifySocket,
    Simulator,
    Subscriber,
    daemon_config,
    snapshot_rows,
    wait_for,
    worker_processes,
)

from kronos_model.data import read_candles

pytestmark = pytest.mark.slow
START = "2024-06-01"
HOUR_MS = 3_600_000


@pytest.fixture
def simulator():
    sim = Simulator(START, speed=7200)
    yield sim
    sim.close()


def assert_candles_match_truth(snapshot, symbol: str) -> int:
    """Every stored candle equals the real one, none is missing between the first and the last, none twice."""
    con = duckdb.connect(str(snapshot), read_only=True)
    stored = con.sql("SELECT epoch_ms(open_time) AS t, open, high, low, close, volume FROM candles "
                     f"WHERE symbol = '{symbol}' AND interval = '1h' ORDER BY open_time").pl()
    con.close()
    assert stored.height > 0
    assert stored["t"].n_unique() == stored.height, "duplicate candles"
    truth = read_candles(f"daemon/assets/data/{symbol}_1h.parquet").with_columns(
        pl.col("timestamps").dt.epoch("ms").alias("t"))
    expected = truth.filter(pl.col("t").is_between(stored["t"].min(), stored["t"].max()))
    assert stored["t"].to_list() == expected["t"].to_list(), "missing candles"
    for column in ("open", "high", "low", "close", "volume"):
        assert stored[column].to_list() == expected[column].to_list()
    return stored.height


def test_service_lifecycle_forecasts_gaps_reload_broker_restart_and_clean_stop(tmp_path, broker, simulator):
    notify = NotifySocket(tmp_path / "notify.sock")
    subscriber = Subscriber(broker.port)
    config = daemon_config(tmp_path, simulator, broker.port)
    daemon = Daemon(config, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
    snapshot = tmp_path / "state" / "kronos.duckdb"
    try:
        daemon.wait_event("daemon_ready", 60)
        wait_for(lambda: "READY=1" in "\n".join(notify.poll()), 10, what="READY=1")

        # forecasts arrive for closed candles, retained on the forecast topic and in the forecasts table
        wait_for(lambda: len(subscriber.forecasts("BTCUSDT")) >= 3, 60, what="3 BTC forecasts")
        first = subscriber.forecasts("BTCUSDT")[0]
        assert set(first) >= {"symbol", "interval", "issued_at", "origin_time", "model_version", "timestamps",
                              "mean", "p10", "p50", "p90", "prob_up", "last_close"}
        assert len(first["timestamps"]) == 6 and len(first["p50"]["close"]) == 6
        assert all(p10 <= p50 <= p90 for p10, p50, p90 in zip(first["p10"]["close"], first["p50"]["close"],
                                                              first["p90"]["close"], strict=True))
        assert b"online" in subscriber.payloads("kronos/status")

        # a reader keeps the published snapshot open the whole time; ingestion goes on
        wait_for(snapshot.exists, 20, what="snapshot")
        reader = duckdb.connect(str(snapshot), read_only=True)
        held_count = reader.execute("SELECT count(*) FROM candles").fetchall()[0][0]
        origins = [f["origin_time"] for f in subscriber.forecasts("BTCUSDT")]
        assert origins == sorted(origins)

        # websocket dropped in the middle of a candle: the gap is backfilled
        simulator.fault("ws:drop")
        daemon.wait_event("resynced", 30, count=2)

        # the broker restarts: publishing resumes
        broker.stop()
        daemon.wait_event("mqtt_disconnected", 20)
        broker.start()
        daemon.wait_event("mqtt_connected", 30, count=2)
        before = len(subscriber.forecasts("BTCUSDT"))
        wait_for(lambda: len(subscriber.forecasts("BTCUSDT")) > before + 2, 40, what="forecasts after restart")

        # SIGHUP with an invalid config keeps the running one
        good = config.read_text()
        config.write_text(good.replace("lookback: 48", "lookback: -5"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reload_rejected", 20)
        assert daemon.process.poll() is None

        # SIGHUP adding a symbol and moving generations from the model worker process into a thread: ETHUSDT
        # forecasts start, and the worker process is gone
        assert len(worker_processes(daemon.process.pid)) == 1  # forecasts ran in the child (the default)
        values = yaml.safe_load(good)
        values["markets"]["symbols"] = ["BTCUSDT", "ETHUSDT"]
        values["forecast"]["worker"] = "thread"
        config.write_text(yaml.safe_dump(values))
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reloaded", 30)
        wait_for(lambda: subscriber.forecasts("ETHUSDT"), 60, what="an ETH forecast")
        wait_for(lambda: not worker_processes(daemon.process.pid), 30, what="the model worker process to exit")

        new_count = reader.execute("SELECT count(*) FROM candles").fetchall()[0][0]
        assert new_count == held_count  # the reader's file never changed under it
        reader.close()

        # SIGTERM: a clean exit within 10 s, with `offline` retained
        stop_started = time.monotonic()
        assert daemon.stop(timeout=30) == 0
        assert time.monotonic() - stop_started < 10  # the contract for SIGTERM
        messages = notify.poll()
        assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in messages)
        assert "STOPPING=1" in messages
        assert any("WATCHDOG=1" in m for m in messages)
        assert messages.index("STOPPING=1") > max(i for i, m in enumerate(messages) if m.startswith("READY=1"))
        wait_for(lambda: subscriber.payloads("kronos/status")[-1:] == [b"offline"], 10, what="offline")
        late = Subscriber(broker.port, "kronos/status")
        wait_for(lambda: late.payloads("kronos/status"), 10, what="retained status")
        assert late.payloads("kronos/status")[-1] == b"offline"
        late.close()
    finally:
        daemon.finish()
        subscriber.close()
        notify.close()

    # after a clean stop the snapshot holds everything: candles equal the truth, forecasts were stored
    assert assert_candles_match_truth(snapshot, "BTCUSDT") > 20 * 24
    assert_candles_match_truth(snapshot, "ETHUSDT")
    stored = snapshot_rows(snapshot, "SELECT count(DISTINCT origin_time), count(*) FROM forecasts "
                                     "WHERE symbol = 'BTCUSDT'")[0]
    assert stored[0] >= 5 and stored[1] == stored[0] * 6
    # every forecast was made from a stored (so closed) candle
    orphans = snapshot_rows(snapshot, "SELECT count(*) FROM forecasts f LEFT JOIN candles c ON c.symbol = f.symbol "
                                      "AND c.interval = f.interval AND c.open_time = f.origin_time "
                                      "WHERE c.open_time IS NULL")[0][0]
    assert orphans == 0


def test_forecasts_are_published_calibrated_with_raw_alongside_and_stay_calibrated_after_a_restart(
        tmp_path, broker, simulator):
    """The calibrator needs `min_history` outcomes per step (5 here, horizon 6): the first forecasts go out raw
    and flagged, later ones calibrated with the raw values under `raw`; a restart warms it from the store."""
    subscriber = Subscriber(broker.port)
    config = daemon_config(tmp_path, simulator, broker.port,
                           forecast={"lookback": 48, "horizon": 6, "sample_paths": 4,
                                     "calibration": {"min_history": 5, "window": 40}})
    snapshot = tmp_path / "state" / "kronos.duckdb"
    daemon = Daemon(config)
    try:
        daemon.wait_event("daemon_ready", 60)
        first = wait_for(lambda: subscriber.forecasts("BTCUSDT"), 60, what="a forecast")[0]
        assert first["calibrated"] is False  # a fresh store: no outcomes yet
        assert first["raw"]["p10"]["close"] == first["p10"]["close"] and first["raw"]["prob_up"] == first["prob_up"]
        calibrated = wait_for(lambda: [f for f in subscriber.forecasts("BTCUSDT") if f["calibrated"]], 120,
                              what="a calibrated forecast")
        payload = calibrated[0]
        assert set(payload["raw"]) == {"p10", "p50", "p90", "prob_up", "close_grid"}
        grid, raw_grid = payload["close_grid"], payload["raw"]["close_grid"]
        assert grid["levels"] == raw_grid["levels"] and len(grid["levels"]) == 19  # 5 %...95 %
        assert len(grid["values"]) == 19 and all(len(v) == 6 for v in grid["values"])
        assert grid["values"][grid["levels"].index(0.1)] == payload["p10"]["close"]  # the grid is what p10 is
        assert raw_grid["values"][raw_grid["levels"].index(0.9)] == payload["raw"]["p90"]["close"]
        for name in ("p10", "p50", "p90"):
            assert len(payload[name]["close"]) == len(payload["raw"][name]["close"]) == 6
        assert all(p10 <= p50 <= p90 for p10, p50, p90 in zip(payload["p10"]["close"], payload["p50"]["close"],
                                                              payload["p90"]["close"], strict=True))
        assert all(0 <= p <= 1 for p in payload["prob_up"])
        assert payload["p10"]["close"] != payload["raw"]["p10"]["close"]  # the band was moved
        assert "CQR" in payload["calibration"]["method"]
        assert 0 <= payload["calibration"]["coverage_80"] <= 1 and 0 <= payload["calibration"]["coverage_90"] <= 1
        assert payload["calibration"]["outcomes"] > 0
        # the other columns are the model's own
        assert len(payload["p10"]["open"]) == 6
        assert daemon.stop() == 0
        summary = daemon.events("daemon_stopped")[0]  # what `kronosd demo` prints: published and raw scores
        # (the steps scored by now may all be raw ones: the calibrated forecasts' targets close later)
        assert 0 <= summary["calibrated_share"] < 1 and summary["scored_steps"] > 0
        for key in ("coverage_80", "coverage_80_raw", "brier_prob_up", "brier_prob_up_raw"):
            assert 0 <= summary[key] <= 1
    finally:
        daemon.finish()
    before = len(subscriber.forecasts("BTCUSDT"))
    restarted = Daemon(config)
    try:
        warmed = restarted.wait_event("calibration_warmed", 60)[0]
        assert warmed["outcomes"] > 0 and warmed["history_per_step"] >= 5
        after = wait_for(lambda: subscriber.forecasts("BTCUSDT")[before:], 60, what="a forecast after the restart")
        assert after[0]["calibrated"] is True  # warmed from its stored forecasts: no raw stretch again
        assert restarted.stop() == 0
    finally:
        restarted.dump()
        if restarted.process.poll() is None:
            restarted.kill()
        subscriber.close()
    rows = snapshot_rows(snapshot, "SELECT count(*), count(close_p10_cal), count(close_p05), "
                                   "count(*) FILTER (WHERE close_p10_cal <= close_p50_cal "
                                   "AND close_p50_cal <= close_p90_cal AND prob_up_cal BETWEEN 0 AND 1), "
                                   "count(*) FILTER (WHERE len(close_grid) = 19 AND len(grid_levels) = 19), "
                                   "count(*) FILTER (WHERE close_grid_cal[2] = close_p10_cal "
                                   "AND close_grid_cal[18] = close_p90_cal) "
                                   "FROM forecasts WHERE symbol = 'BTCUSDT'")[0]
    total, calibrated_rows, with_p05, ordered, with_grid, grid_matches = rows
    assert with_p05 == total and with_grid == total  # the raw grid the calibrator is warmed from
    assert 0 < calibrated_rows < total and ordered == calibrated_rows == grid_matches


def test_continual_finetune_promotes_a_better_challenger_rejects_a_broken_one_and_survives_kill_9(
        tmp_path, broker, simulator):
    subscriber = Subscriber(broker.port)
    overrides = {"tokenizer_epochs": 1, "predictor_epochs": 1, "batch_size": 16, "max_train_windows": 128,
                 "max_val_windows": 64, "tokenizer_learning_rate": 0.002, "learning_rate": 0.002,
                 "train_ratio": 0.8, "val_ratio": 0.2, "progress": False}
    config = daemon_config(tmp_path, simulator, broker.port,
                           finetune={"enabled": True, "every_candles": 40, "window_candles": 400,
                                     "holdout_candles": 60, "overrides": overrides},
                           gate={"origins": 8, "sample_paths": 4},
                           # unanchored, the random starting model's paths start off the last close (its random
                           # tokenizer's reconstruction error); anchored it is a noisy random walk that a one-epoch
                           # fine-tune rarely beats, and this test is about the promotion flow
                           forecast={"lookback": 48, "horizon": 6, "sample_paths": 4, "anchor": False})
    snapshot = tmp_path / "state" / "kronos.duckdb"
    daemon = Daemon(config)
    try:
        # the from-scratch starting model is random: a trained challenger beats it and is promoted
        promoted = daemon.wait_event("promoted", 180)[0]
        lag = daemon.wait_event("finetune_loop_lag", 30)[0]  # measured while the trainer ran; numbers in README
        assert lag["samples"] > 10 and lag["p99_ms"] >= 0
        assert promoted["challenger"]["mae"] < promoted["champion"]["mae"]
        # the gate compared what would be published (calibrated), and its held-out forecasts warm the new champion
        assert promoted["comparison"]["metric"] == "crps_calibrated"
        assert promoted["challenger"]["crps_calibrated"] < promoted["champion"]["crps_calibrated"]
        new_version = promoted["model_version"]
        warmed = [e for e in daemon.events("calibration_warmed") if e.get("source") == "gate"]
        assert warmed and warmed[0]["model_version"] == new_version and warmed[0]["symbol"] == "BTCUSDT"
        assert warmed[0]["forecasts"] == 8 and warmed[0]["outcomes"] > 0
        wait_for(lambda: any(f["model_version"] == new_version for f in subscriber.forecasts("BTCUSDT")), 60,
                 what="a forecast from the promoted model")
        assert subscriber.events("promoted")

        # a broken run (non-finite loss) is rejected; forecasts continue on the champion
        values = yaml.safe_load(config.read_text())
        values["finetune"]["overrides"]["tokenizer_learning_rate"] = 1e30  # the loss overflows: exit code 3
        values["finetune"]["overrides"]["tokenizer_grad_clip"] = 1e30
        config.write_text(yaml.safe_dump(values))
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reloaded", 30)
        rejected = wait_for(lambda: [e for e in daemon.events("rejected") if "exited with 3" in e.get("reason", "")],
                            240, what="a rejected NaN run")
        assert rejected
        count = len(subscriber.forecasts("BTCUSDT"))
        wait_for(lambda: len(subscriber.forecasts("BTCUSDT")) > count + 2, 60, what="forecasts after rejection")
        current = subscriber.forecasts("BTCUSDT")[-1]["model_version"]
        assert current == (daemon.events("promoted")[-1]["model_version"])

        # kill -9, then a restart: nothing lost, nothing twice, the champion survives
        daemon.kill()
    finally:
        daemon.finish()
    restarted = Daemon(config)
    try:
        ready = restarted.wait_event("daemon_ready", 60)[0]
        assert ready["model_version"] == current
        restarted.wait_event("forecast_published", 60, count=3)
        assert restarted.stop() == 0
    except BaseException:
        restarted.dump()
        raise
    finally:
        if restarted.process.poll() is None:
            restarted.kill()
        subscriber.close()
    assert_candles_match_truth(snapshot, "BTCUSDT")
    kinds = [row[0] for row in snapshot_rows(snapshot, "SELECT kind FROM model_events ORDER BY event_time")]
    assert "promoted" in kinds and "rejected" in kinds and "finetune_started" in kinds
    stopped = next(line for line in restarted.lines if line.get("event") == "daemon_stopped")
    assert stopped["loop_lag_ms_p99"] is not None  # measured; the README reports the numbers
    assert json.dumps(stopped)


def test_notify_never_blocks_when_nobody_reads(tmp_path):
    """A full notify socket (a stalled reader) must not block the daemon: datagrams are dropped."""
    import socket as socket_module

    from daemon.notify import Notifier

    path = str(tmp_path / "stalled.sock")
    receiver = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_DGRAM)
    receiver.bind(path)
    notifier = Notifier(path)
    sent = [notifier.watchdog() for _ in range(5000)]  # far more than the socket buffer holds
    assert sent[0] is True and sent[-1] is False
    receiver.close()


def test_unknown_symbol_or_bad_config_stops_with_exit_code_2(tmp_path, simulator):
    config = daemon_config(tmp_path, simulator, 1, symbols=("FOOUSDT",), mqtt={"enabled": False})
    daemon = Daemon(config)
    assert daemon.process.wait(timeout=60) == 2  # RestartPreventExitStatus=2: systemd will not loop on it
    daemon._reader.join(timeout=5)
    text = json.dumps(daemon.lines)
    assert "unknown symbol 'FOOUSDT'" in text and "Traceback" not in text
    config.write_text("markets: {symbols: [BTCUSDT], intervals: [7h]}\n")
    bad = Daemon(config)
    assert bad.process.wait(timeout=60) == 2
    bad._reader.join(timeout=5)
    assert "7h" in json.dumps(bad.lines)
