"""What the daemon can say about its own health: per-pair ingest state, readiness checks, the systemd STATUS line.

One place computes it, so /readyz, /metrics, the dashboard and `systemctl status` never disagree.

Candle age is measured on the exchange's clock: the newest event time a stream delivered, moved on by the local
time since that message arrived (the simulator's clock runs faster than ours, so the local clock alone would be
wrong there), and never behind the REST server time. A pair is overdue when its next candle should have closed
(one interval after the newest stored one) and a grace period has passed too.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from storage.intervals import interval_ms

if TYPE_CHECKING:
    from daemon.service import Daemon

Pair = tuple[str, str]
OVERDUE_GRACE_S = 15.0  # as the ingestor's own close watch (StreamSettings.close_grace_s)


@dataclass
class PairHealth:
    symbol: str
    interval: str
    connected: bool  # its websocket connection is open
    silent_s: float | None  # seconds since that connection delivered anything (None: never)
    newest_open_ms: int | None  # the newest closed candle stored by this process's ingestion
    age_s: float | None  # exchange seconds since that candle closed
    overdue: bool
    resyncing: bool  # a REST backfill is catching up (the stream is buffered meanwhile)
    paused: str | None  # why the pair is not trading, when it is not

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _exchange_now_ms(connection: Any, rest: Any) -> int | None:
    candidates = []
    if connection is not None and connection.exchange_time_ms is not None:
        since = time.monotonic() - connection.last_message_at if connection.last_message_at else 0.0
        candidates.append(connection.exchange_time_ms + int(since * 1000))
    if rest is not None:
        candidates.append(rest.server_now_ms())
    return max(candidates) if candidates else None


def pair_health(daemon: Daemon) -> list[PairHealth]:
    """The state of every configured pair, from the running ingestor (before it exists: nothing is known)."""
    ingestor = getattr(daemon, "ingestor", None)
    rest = getattr(daemon, "rest", None)
    result = []
    for symbol, interval in daemon.config.markets.pairs:
        pair = (symbol, interval)
        connection = None
        if ingestor is not None:
            connection = next((c for c in ingestor.connections if pair in c.pairs), None)
        if connection is None or ingestor is None:
            result.append(PairHealth(symbol, interval, False, None, None, None, True, False, None))
            continue
        silent = time.monotonic() - connection.last_message_at if connection.last_message_at else None
        newest = ingestor.last_closed.get(pair)
        age = None
        overdue = True
        now = _exchange_now_ms(connection, rest)
        if newest is not None and now is not None:
            step = interval_ms(interval)
            age = max(0.0, (now - (newest + step)) / 1000)
            overdue = age > step / 1000 + OVERDUE_GRACE_S
        result.append(PairHealth(symbol, interval, connection.connected, silent, newest, age, overdue,
                                 ingestor.buffers.get(pair) is not None, ingestor.paused.get(pair)))
    return result


def readiness(daemon: Daemon) -> list[dict[str, Any]]:
    """Every readiness check as {check, ok, detail}; ready when all are ok."""
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    writer = getattr(daemon, "writer", None)
    check("store", writer is not None and writer.alive, "the store writer takes writes" if writer is not None
          and writer.alive else "the store writer is not running")
    forecaster = getattr(daemon, "forecaster", None)
    champion = forecaster.champion if forecaster is not None else None
    check("champion", champion is not None, f"model {champion.version} loaded" if champion else "no model loaded")
    silence_limit = daemon.config.http.stream_silence_s
    for health in pair_health(daemon):
        name = f"{health.symbol}/{health.interval}"
        if health.paused:
            check(f"stream {name}", False, f"paused: {health.paused}")
            continue
        if not health.connected:
            check(f"stream {name}", False, "not connected")
        elif health.silent_s is None or health.silent_s > silence_limit:
            silent = "nothing received yet" if health.silent_s is None else f"silent for {health.silent_s:.1f} s"
            check(f"stream {name}", False, f"{silent} (limit {silence_limit:g} s)")
        else:
            check(f"stream {name}", True, f"last message {health.silent_s:.1f} s ago")
        if health.resyncing:
            check(f"candles {name}", False, "backfilling the gap since the last stored candle")
        elif health.age_s is None:
            check(f"candles {name}", False, "no closed candle stored yet")
        elif health.overdue:
            check(f"candles {name}", False, f"newest candle closed {health.age_s:.0f} s ago: the next is overdue")
        else:
            check(f"candles {name}", True, f"newest closed candle closed {health.age_s:.0f} s ago")
    return checks


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "no candle yet"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def status_line(daemon: Daemon) -> str:
    """`BTCUSDT/1h 14 s ago · model v… · 1,234 forecasts · MQTT up`: what `systemctl status` shows."""
    pairs = pair_health(daemon)
    if len(pairs) <= 3:
        parts = [f"{p.symbol}/{p.interval} {_ago(p.age_s)}" + (" (paused)" if p.paused else "") for p in pairs]
    else:
        oldest = max(pairs, key=lambda p: -1 if p.age_s is None else p.age_s)
        parts = [f"{len(pairs)} pairs, oldest {oldest.symbol}/{oldest.interval} {_ago(oldest.age_s)}"]
    forecaster = getattr(daemon, "forecaster", None)
    if forecaster is not None:
        champion = forecaster.champion
        parts.append(f"model {champion.version if champion else 'none'}")
        parts.append(f"{forecaster.published:,} forecasts")
    publisher = getattr(daemon, "publisher", None)
    if publisher is None:
        parts.append("MQTT off")
    else:
        parts.append("MQTT up" if publisher.connected else "MQTT down")
    continual = getattr(daemon, "continual", None)
    if continual is not None and continual.running:
        parts.append("fine-tuning")
    return " · ".join(parts)
