"""Real processes for the daemon's end-to-end tests: the exchange simulator, a private Mosquitto broker, an
MQTT subscriber, a systemd notify socket, and `kronosd run` itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "daemon" / "assets" / "data"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Simulator:
    """`kronosd simulate` on the bundled BTC and ETH candles, market clock `speed` times real time."""

    def __init__(self, start: str, speed: float, *extra: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "simulate", "--data", str(DATA / "BTCUSDT_1h.parquet"),
             "--data", str(DATA / "ETHUSDT_1h.parquet"), "--start", start, "--speed", str(speed), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        self.urls = json.loads(self.process.stdout.readline())

    def fault(self, spec: str) -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.urls['rest_url']}/_sim/fault?spec={spec}",
                                                      method="POST"), timeout=5).read()

    def stats(self) -> dict:
        import urllib.request

        return json.loads(urllib.request.urlopen(f"{self.urls['rest_url']}/_sim/stats", timeout=5).read())

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class Broker:
    """A private Mosquitto on a free port, so the tests can stop and restart it."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.config = tmp / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for(self._listening, 10, what="mosquitto")

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class Subscriber:
    """Collects every message under `kronos/#` (paho in its own thread); reconnects by itself."""

    def __init__(self, port: int, topic: str = "kronos/#"):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _client, _userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload, bool(message.retain)))

    def payloads(self, topic: str) -> list[bytes]:
        with self.lock:
            return [payload for t, payload, _ in self.messages if t == topic]

    def forecasts(self, symbol: str, interval: str = "1h") -> list[dict]:
        return [json.loads(p) for p in self.payloads(f"kronos/forecast/{symbol}/{interval}")]

    def events(self, kind: str | None = None) -> list[dict]:
        found = [json.loads(p) for p in self.payloads("kronos/events")]
        return [e for e in found if kind is None or e["kind"] == kind]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class NotifySocket:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.received: list[str] = []
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)  # like systemd: always reading
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                self.received.append(self.sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return

    def poll(self) -> list[str]:
        return list(self.received)

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self.sock.close()


def daemon_config(tmp: Path, sim: Simulator, broker_port: int, symbols=("BTCUSDT",), **sections) -> Path:
    config = {
        "exchange": {"rest_url": sim.urls["rest_url"], "ws_url": sim.urls["ws_url"],
                     "archive_url": sim.urls["archive_url"], "backoff_base_s": 0.1, "backoff_max_s": 1.0,
                     "watchdog_s": 5.0},
        "storage": {"state_dir": str(tmp / "state"), "snapshot_interval_s": 1.0},
        "markets": {"symbols": list(symbols), "intervals": ["1h"], "history_days": 20},
        "model": {"predictor": "scratch", "tokenizer": "scratch", "device": "cpu"},
        "forecast": {"lookback": 48, "horizon": 6, "sample_paths": 4},
        "finetune": {"enabled": False},
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "reconnect_max_s": 1.0},
        "http": {"port": free_port()},  # never the default 8765: daemons of parallel tests would collide
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Daemon:
    """`kronosd run` as a subprocess; its JSON log lines are collected from stdout."""

    def __init__(self, config: Path, env: dict[str, str] | None = None):
        self.lines: list[dict] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(config), "--json-logs"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self.lines.append(json.loads(line))
            except json.JSONDecodeError:
                self.lines.append({"event": "raw", "text": line})

    def events(self, name: str) -> list[dict]:
        return [line for line in list(self.lines) if line.get("event") == name]

    def wait_event(self, name: str, timeout: float = 60.0, count: int = 1) -> list[dict]:
        return wait_for(lambda: len(self.events(name)) >= count and self.events(name), timeout, what=name)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def dump(self, last: int = 60) -> None:
        """Print the daemon's recent log lines (shown by pytest when a test fails)."""
        quiet = {"forecast_published", "snapshot_published"}
        published: dict[str, int] = {}
        for line in self.events("forecast_published"):
            published[line["symbol"]] = published.get(line["symbol"], 0) + 1
        print("forecasts published per symbol:", published)
        for line in [x for x in list(self.lines) if x.get("event") not in quiet][-last:]:
            print(json.dumps(line)[:600])

    def finish(self) -> None:
        """End of a test, passed or not: show the recent log, and kill the daemon if it is still running."""
        self.dump()
        if self.process.poll() is None:
            self.kill()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        self._reader.join(timeout=5)


def worker_processes(pid: int) -> set[int]:
    """The multiprocessing children `pid` spawned (the daemon's model worker), not its resource tracker."""
    children = {int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()}
    found = set()
    for child in children:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(child)
        except FileNotFoundError:
            continue  # it just exited
    return found


def snapshot_rows(path, query: str) -> list[tuple]:
    """Rows of `query` on a published snapshot, opened read-only as users do."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()
