"""HTTP against the daemon's server on loopback: plain urllib (a real socket, no client library of our own),
event-stream reading and Prometheus parsing with prometheus_client's own parser."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from daemon_helpers import ROOT
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def request(url: str, token: str | None = None, method: str = "GET", headers: dict | None = None) -> Answer:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as response:
            return Answer(response.status, response.read(), dict(response.headers))
    except urllib.error.HTTPError as error:
        return Answer(error.code, error.read(), dict(error.headers))


def metric_families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_value(family, suffix: str = "", **labels: str) -> float:
    """Sum of the family's samples named `<family><suffix>` whose labels include `labels`."""
    name = family.name + suffix
    return sum(s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v
                                                                        for k, v in labels.items()))


def read_events(host: str, port: int, path: str, want: str, token: str | None = None,
                timeout: float = 60.0) -> list[tuple[str, dict]]:
    """Open an event stream over a raw socket and read until an event of kind `want` arrives."""
    sock = socket.create_connection((host, port), timeout=timeout)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    # HTTP/1.0: the body comes unchunked, so event frames can be split on blank lines as they arrive
    sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: text/event-stream\r\n{auth}\r\n".encode())
    buffer, events, headers_done = b"", [], False
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return events
            buffer += chunk
            if not headers_done:
                if b"\r\n\r\n" not in buffer:
                    continue
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head[:200]
                headers_done = True
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                lines = frame.decode().splitlines()
                kind = next((line[7:] for line in lines if line.startswith("event: ")), None)
                data = next((line[6:] for line in lines if line.startswith("data: ")), None)
                if kind and data:
                    events.append((kind, json.loads(data)))
                    if kind == want:
                        return events
    finally:
        sock.close()


class Dashboard:
    """`kronosd dashboard` as a subprocess; its URL is the first stdout line."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen([sys.executable, "-m", "daemon.cli", "dashboard", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.process.stdout.readline()
        if not line.startswith("dashboard: "):
            self.process.kill()
            raise AssertionError(f"no URL from kronosd dashboard: {line!r} {self.process.stderr.read()[-2000:]}")
        self.url = line.split()[1].rstrip("/")

    def close(self) -> int:
        self.process.terminate()
        return self.process.wait(timeout=15)
