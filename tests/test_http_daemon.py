"""The HTTP server of `kronosd run`, end to end: a daemon subprocess against the exchange simulator and a private
Mosquitto, its server on a loopback port. Token auth, input validation, /metrics parsed with prometheus_client's
parser, /readyz through a stalled stream, live events, systemd's STATUS=, and afterwards `kronosd dashboard` on
the state the daemon left. Plus the refusal to listen beyond loopback without a token."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time

import duckdb
import pytest
from daemon_helpers import ROOT, Daemon, NotifySocket, Simulator, Subscriber, daemon_config, free_port, wait_for
from http_helpers import Dashboard, metric_families, read_events, request, sample_value
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

from daemon.config import HttpConfig, KronosConfig

SYMBOLS = ("BTCUSDT", "ETHUSDT")
TOKEN = "a-test-token-of-some-length"

# Every family the issue asks for, with its Prometheus type.
FAMILIES = {
    "kronosd_candles_stored": "counter",
    "kronosd_candle_age_seconds": "gauge",
    "kronosd_ws_reconnects": "counter",
    "kronosd_rest_requests": "counter",
    "kronosd_rest_weight_used": "gauge",
    "kronosd_rest_weight_limit": "gauge",
    "kronosd_gaps_backfilled": "counter",
    "kronosd_forecast_latency_seconds": "histogram",
    "kronosd_forecast_since_close_seconds": "histogram",
    "kronosd_model_inference_seconds": "histogram",
    "kronosd_event_loop_lag_seconds": "histogram",
    "kronosd_mqtt_connected": "gauge",
    "kronosd_mqtt_queued_messages": "gauge",
    "kronosd_finetune_runs": "counter",
    "kronosd_model_promotions": "counter",
    "kronosd_model_rejections": "counter",
    "kronosd_model_info": "gauge",  # the classic text format has no info type (OpenMetrics below has)
    "kronosd_ledger_relative_mae": "gauge",
    "kronosd_ledger_coverage_80": "gauge",
    "kronosd_snapshot_publish_seconds": "histogram",
    "kronosd_forecasts_published": "counter",
    "kronosd_stream_connected": "gauge",
    "kronosd_input_rejections": "counter",
    "kronosd_subsystem_restarts": "counter",
}


def scrape(base: str) -> dict:
    answer = request(f"{base}/metrics", TOKEN)
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/plain")
    return metric_families(answer.body.decode())


@pytest.mark.slow
def test_http_server_of_a_running_daemon(tmp_path, broker):
    simulator = Simulator("2024-06-01", 7200)
    notify = NotifySocket(tmp_path / "notify.sock")
    subscriber = Subscriber(broker.port)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # watchdog_s well above the stall below: readiness must notice the silence, not a reconnect
    config = daemon_config(tmp_path, simulator, broker.port, symbols=SYMBOLS,
                           exchange={"watchdog_s": 60.0}, forecast={"score_every": 3},
                           http={"port": port, "token": TOKEN, "stream_silence_s": 2.0})
    daemon = Daemon(config, env={"NOTIFY_SOCKET": notify.path})
    try:
        daemon.wait_event("http_listening", 60)
        assert request(f"{base}/healthz", TOKEN).json() == {"status": "ok"}
        daemon.wait_event("forecast_published", 60, count=6)

        # -- auth: every path needs the token, compared exactly
        for path in ("/", "/healthz", "/metrics", "/api/pairs", "/api/stream", "/assets/app.js"):
            for token in (None, "wrong", TOKEN + "x"):
                denied = request(f"{base}{path}", token)
                assert denied.status == 401, (path, token)
                assert "Bearer" in denied.json()["error"] and denied.headers["WWW-Authenticate"].startswith("Bearer")
        assert request(f"{base}/", TOKEN).status == 200

        # -- bad input: 400 with a JSON reason, never a 500
        q = "symbol=BTCUSDT&interval=1h"
        for path, words in (("/api/candles?symbol=DOGEUSDT&interval=1h", "unknown pair"),
                            ("/api/candles?symbol=BTCUSDT&interval=4h", "unknown pair"),
                            ("/api/candles?interval=1h", "required"),
                            (f"/api/candles?{q}&limit=1000000000", "limit"),
                            (f"/api/candles?{q}&limit=99999999999999999999", "limit"),
                            (f"/api/candles?{q}&limit=5001", "from 1 to 5000"),
                            (f"/api/candles?{q}&limit=0", "from 1 to 5000"),
                            (f"/api/candles?{q}&limit=-3", "limit"),
                            (f"/api/candles?{q}&limit=ten", "limit"),
                            (f"/api/candles?{q}&limit=1&limit=2", "more than once"),
                            (f"/api/candles?{q}&colour=red", "unknown parameter"),
                            (f"/api/track?{q}&step=abc", "step"),
                            ("/api/forecast?symbol=%27%3B%20DROP%20TABLE%20candles&interval=1h", "unknown pair"),
                            ("/api/models?limit=100000", "limit"),
                            ("/api/pairs?x=1", "unknown parameter")):
            answer = request(f"{base}{path}", TOKEN)
            assert answer.status == 400, (path, answer.status, answer.body[:200])
            assert words in answer.json()["error"], (path, answer.json())
        assert request(f"{base}/nothing-here", TOKEN).status == 404
        assert request(f"{base}/assets/../service.py", TOKEN).status == 404
        assert request(f"{base}/api/candles?{q}", TOKEN, method="POST").status == 405  # read-only
        assert request(f"{base}/api/candles?{q}", TOKEN, method="DELETE").status == 405

        # -- the API answers with what the daemon stored and published
        candles = request(f"{base}/api/candles?{q}&limit=50", TOKEN).json()["candles"]
        assert len(candles) == 50 and all(a["time"] < b["time"] for a, b in itertools.pairwise(candles))
        forecast = request(f"{base}/api/forecast?{q}", TOKEN).json()["forecast"]
        assert len(forecast["steps"]) == 6
        assert all(s["p10"] <= s["p50"] <= s["p90"] and 0 <= s["prob_up"] <= 1 for s in forecast["steps"])
        wait_for(lambda: request(f"{base}/api/ledger?{q}", TOKEN).json()["scores"], 30, what="ledger scores")

        # -- /metrics: every family, the right type
        first = scrape(base)
        for name, kind in FAMILIES.items():
            assert name in first, f"no metric family {name}"
            assert first[name].type == kind, (name, first[name].type)
        version = daemon.events("daemon_ready")[0]["model_version"]
        assert sample_value(first["kronosd_model_info"], version=version) == 1
        open_metrics = request(f"{base}/metrics", TOKEN, headers={"Accept": "application/openmetrics-text"})
        assert open_metrics.headers["Content-Type"].startswith("application/openmetrics-text")
        typed = {f.name: f for f in openmetrics_families(open_metrics.body.decode())}
        assert typed["kronosd_model"].type == "info" and typed["kronosd_candles_stored"].type == "counter"
        assert typed["kronosd_model"].samples[0].labels == {"version": version}
        assert sample_value(first["kronosd_mqtt_connected"]) == 1
        assert sample_value(first["kronosd_rest_requests"], "_total", status="200") > 0
        assert sample_value(first["kronosd_rest_weight_limit"]) > 0
        for symbol in SYMBOLS:
            assert sample_value(first["kronosd_stream_connected"], symbol=symbol) == 1
            assert sample_value(first["kronosd_ledger_relative_mae"], symbol=symbol) > 0
        wait_for(lambda: sample_value(scrape(base)["kronosd_snapshot_publish_seconds"], "_count") > 0, 30,
                 what="a timed snapshot publish")

        # -- /readyz: ready, then 503 while the simulator stalls the stream, then ready again
        wait_for(lambda: request(f"{base}/readyz", TOKEN).status == 200, 30, what="ready")
        ready = request(f"{base}/readyz", TOKEN).json()
        assert ready["ready"] and {c["check"] for c in ready["checks"]} >= {"store", "champion", "stream BTCUSDT/1h",
                                                                               "candles ETHUSDT/1h"}
        simulator.fault("ws:stall:1:6")
        stalled = wait_for(lambda: (a := request(f"{base}/readyz", TOKEN)).status == 503 and a.json(), 30,
                           what="503 during the stall")
        failing = {c["check"]: c["detail"] for c in stalled["failing"]}
        assert "stream BTCUSDT/1h" in failing and "silent" in failing["stream BTCUSDT/1h"], stalled
        assert stalled["ready"] is False
        wait_for(lambda: request(f"{base}/readyz", TOKEN).status == 200, 60, what="ready again after the stall")

        # -- candles, forecasts and loop samples move the numbers; a dropped stream counts a reconnect
        simulator.fault("ws:drop")
        daemon.wait_event("resynced", 30, count=len(SYMBOLS) + 2)
        daemon.wait_event("forecast_published", 60, count=len(daemon.events("forecast_published")) + 4)
        second = scrape(base)
        for symbol in SYMBOLS:
            for name, suffix in (("kronosd_candles_stored", "_total"), ("kronosd_gaps_backfilled", "_total"),
                                 ("kronosd_forecasts_published", "_total"),
                                 ("kronosd_forecast_latency_seconds", "_count"),
                                 ("kronosd_model_inference_seconds", "_count")):
                assert sample_value(second[name], suffix, symbol=symbol) > sample_value(first[name], suffix,
                                                                                       symbol=symbol), (name, symbol)
            assert sample_value(second["kronosd_candle_age_seconds"], symbol=symbol) >= 0
        assert sample_value(second["kronosd_ws_reconnects"], "_total") > sample_value(first["kronosd_ws_reconnects"],
                                                                                       "_total")
        assert sample_value(second["kronosd_event_loop_lag_seconds"], "_count") > \
            sample_value(first["kronosd_event_loop_lag_seconds"], "_count")
        assert sample_value(second["kronosd_rest_requests"], "_total") > sample_value(first["kronosd_rest_requests"],
                                                                                       "_total")

        # -- live events: a forecast arrives on the stream with the shape /api/forecast has
        events = read_events("127.0.0.1", port, "/api/stream", "forecast", TOKEN)
        kinds = [kind for kind, _ in events]
        assert kinds[0] == "hello" and kinds[-1] == "forecast"
        pushed = events[-1][1]["forecast"]
        assert pushed["symbol"] in SYMBOLS and len(pushed["steps"]) == 6
        wait_for(lambda: any(f["origin_time"] == iso_of(pushed["origin_time"]) for f in
                             subscriber.forecasts(pushed["symbol"])), 10, what="the same forecast on MQTT")

        # -- systemd: STATUS= tells the state at a glance
        statuses = [m for m in notify.poll() if m.startswith("STATUS=")]
        assert statuses, notify.poll()
        last = statuses[-1]
        assert "BTCUSDT/1h" in last and "ago" in last and "model v" in last and "forecasts" in last \
            and "MQTT up" in last, last
        assert daemon.stop() == 0
    finally:
        daemon.finish()
        subscriber.close()
        notify.close()
        simulator.close()

    # -- without the daemon: `kronosd dashboard` serves the state it left
    state = tmp_path / "state"
    offline = Dashboard("--state-dir", str(state), "--port", "0")
    try:
        pairs = request(f"{offline.url}/api/pairs").json()
        assert pairs["mode"] == "snapshot"
        assert {(p["symbol"], p["interval"]) for p in pairs["pairs"]} == {(s, "1h") for s in SYMBOLS}
        served = request(f"{offline.url}/api/candles?{q}&limit=5000").json()["candles"]
        con = duckdb.connect(str(state / "kronos.duckdb"), read_only=True)
        stored = con.execute("SELECT count(*), epoch_ms(max(open_time)) FROM candles "
                             "WHERE symbol = 'BTCUSDT'").fetchall()
        con.close()
        assert len(served) == stored[0][0] and served[-1]["time"] == stored[0][1] // 1000
        assert request(f"{offline.url}/api/models").json()["current"] == version
        assert request(f"{offline.url}/api/forecast?{q}").json()["forecast"]["steps"]
        assert request(f"{offline.url}/api/status").json()["model_version"] == version
        assert request(f"{offline.url}/readyz").status == 200
        assert request(f"{offline.url}/metrics").status == 404  # no daemon, no metrics
        assert request(f"{offline.url}/api/candles?symbol=XRPUSDT&interval=1h").status == 400
        assert request(f"{offline.url}/").status == 200
    finally:
        assert offline.close() == 0


def iso_of(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def test_listening_beyond_loopback_needs_a_token(tmp_path):
    with pytest.raises(ValueError, match="not a loopback address"):
        HttpConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match="not a loopback address"):
        KronosConfig.model_validate({"http": {"host": "kronos.example.org"}})
    with pytest.raises(ValueError, match="at least 16"):
        HttpConfig(host="0.0.0.0", token="short")
    assert HttpConfig(host="0.0.0.0", token="x" * 16).token
    for host in ("127.0.0.1", "127.0.0.53", "::1", "localhost"):
        assert HttpConfig(host=host).token is None
    assert HttpConfig(host="0.0.0.0", enabled=False).enabled is False

    # the daemon refuses at start, exit code 2 (systemd does not restart a bad config), with the reason
    config = tmp_path / "config.yaml"
    config.write_text("http: {host: 0.0.0.0, port: 8765}\nmqtt: {enabled: false}\n")
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "http" in result.stderr and "not a loopback address" in result.stderr and "token" in result.stderr
    assert "Traceback" not in result.stderr

    # and so does `kronosd dashboard`
    state = tmp_path / "state"
    state.mkdir()
    duckdb.connect(str(state / "kronos.duckdb")).close()
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "dashboard", "--state-dir", str(state),
                             "--host", "0.0.0.0", "--port", str(free_port())],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "not a loopback address" in result.stderr
    assert json.dumps(result.stderr)


@pytest.mark.slow
def test_demo_serves_the_dashboard_and_prints_its_url(tmp_path):
    port = free_port()
    demo = subprocess.Popen([sys.executable, "-m", "daemon.cli", "demo", "--minutes", "0.4", "--no-mqtt",
                             "--workdir", str(tmp_path / "demo-run"), "--http-port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        first = demo.stdout.readline().strip()
        assert first == f"dashboard: http://127.0.0.1:{port}/"
        assert request(f"http://127.0.0.1:{port}/").status == 200
        pairs = request(f"http://127.0.0.1:{port}/api/pairs").json()
        assert pairs == {"mode": "live", "horizon": 12, "pairs": [{"symbol": "BTCUSDT", "interval": "1h"}]}
        wait_for(lambda: request(f"http://127.0.0.1:{port}/api/forecast?symbol=BTCUSDT&interval=1h").json()[
            "forecast"], 60, what="a forecast on the demo's dashboard")
        rest = demo.stdout.read().strip().splitlines()
        assert demo.wait(timeout=120) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
    summary = json.loads(rest[-1])  # the summary stays the last stdout line
    assert summary["forecasts_published"] > 0
