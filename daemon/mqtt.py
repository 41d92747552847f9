"""MQTT publishing, decoupled from the forecast pipeline.

aiomqtt never reconnects by itself, so one task owns the connection: it connects (with a retained
`offline` last will), publishes the retained `online` status, drains what is waiting, and on any MqttError
backs off with jitter and reconnects. Forecasts wait in a per-topic slot (only the newest matters; a newer
one replaces an unsent older one), events in a bounded queue (oldest dropped first), so a dead broker costs
memory bounded by the number of topics, never blocks forecasting, and publishing resumes when it returns.

Topics (prefix default `kronos`):
- `<prefix>/forecast/<SYMBOL>/<interval>`: retained, QoS 1, the forecast payload (README documents it);
- `<prefix>/status`: retained `online` / `offline` (also the last will);
- `<prefix>/events`: QoS 1, not retained: fine-tunes, promotions, rejections, gaps, rolling scores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
from collections import deque
from typing import Any

import aiomqtt
import structlog

from daemon.config import MqttConfig

log = structlog.get_logger("daemon.mqtt")


class Publisher:
    def __init__(self, config: MqttConfig, max_events: int = 1000):
        self.config = config
        self.prefix = config.prefix.rstrip("/")
        self._retained: dict[str, bytes] = {}
        self._origins: dict[str, int] = {}  # the newest forecast origin handed in per topic
        self._events: deque[bytes] = deque(maxlen=max_events)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.connected = False
        self.published = 0
        self.connects = 0

    # -- what other tasks call -------------------------------------------------------------------

    @property
    def status_topic(self) -> str:
        return f"{self.prefix}/status"

    def forecast_topic(self, symbol: str, interval: str) -> str:
        return f"{self.prefix}/forecast/{symbol}/{interval}"

    def publish_forecast(self, symbol: str, interval: str, payload: dict[str, Any], *, origin_ms: int) -> bool:
        """Queue a forecast for its retained topic; refused (False) when it is older than the one before:
        a retained topic must never go back in time."""
        topic = self.forecast_topic(symbol, interval)
        if origin_ms <= self._origins.get(topic, -1):
            log.warning("stale_forecast_refused", topic=topic, origin_ms=origin_ms, newest_ms=self._origins[topic])
            return False
        self._origins[topic] = origin_ms
        self._retained[topic] = json.dumps(payload).encode()
        self._wake.set()
        return True

    def publish_event(self, kind: str, **fields: Any) -> None:
        self._events.append(json.dumps({"kind": kind, **fields}, default=str).encode())
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @property
    def queued(self) -> int:
        """Forecasts and events waiting for the broker."""
        return len(self._retained) + len(self._events)

    # -- the connection task ---------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        cfg = self.config
        tls = None
        if cfg.tls:
            tls = ssl.create_default_context(cafile=cfg.ca_file)
        return aiomqtt.Client(
            cfg.host, port=cfg.port, identifier=cfg.client_id, username=cfg.username, password=cfg.password,
            keepalive=cfg.keepalive_s, tls_context=tls, timeout=10,
            will=aiomqtt.Will(self.status_topic, b"offline", qos=1, retain=True),
        )

    async def _drain(self, client: aiomqtt.Client) -> None:
        while self._retained:
            topic = next(iter(self._retained))
            payload = self._retained.pop(topic)
            try:
                await client.publish(topic, payload, qos=1, retain=True)
            except aiomqtt.MqttError:
                self._retained.setdefault(topic, payload)  # keep it unless a newer one arrived meanwhile
                raise
            self.published += 1
        while self._events:
            payload = self._events[0]
            await client.publish(f"{self.prefix}/events", payload, qos=1)
            self._events.popleft()
            self.published += 1

    async def run(self) -> None:
        """Publish until stop(); then leave the retained status at `offline`."""
        delay = 1.0
        while not self._stop.is_set():
            try:
                async with self._client() as client:
                    self.connected, delay = True, 1.0
                    self.connects += 1
                    log.info("mqtt_connected", host=self.config.host, port=self.config.port)
                    await client.publish(self.status_topic, b"online", qos=1, retain=True)
                    while True:
                        await self._drain(client)
                        if self._stop.is_set():
                            await client.publish(self.status_topic, b"offline", qos=1, retain=True)
                            log.info("mqtt_offline_published")
                            return
                        self._wake.clear()
                        if not (self._retained or self._events or self._stop.is_set()):
                            await self._wake.wait()
            except aiomqtt.MqttError as exc:
                was_connected, self.connected = self.connected, False
                log.warning("mqtt_disconnected" if was_connected else "mqtt_unreachable", host=self.config.host,
                            port=self.config.port, error=str(exc), retry_in_s=round(delay, 2))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.config.reconnect_max_s)
            finally:
                self.connected = False
