"""Live updates for dashboards: server-sent events fanned out to every connected page.

Each page gets a bounded queue. Publishing never waits: a page that cannot keep up (a stalled browser, a
suspended laptop) is dropped once its queue is full and reconnects by itself (EventSource does), reloading
what it missed from the JSON API. So no page can make the daemon hold memory or block its loop.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog

log = structlog.get_logger("daemon.http.events")

QUEUE_SIZE = 256
_CLOSE = object()


class EventHub:
    def __init__(self) -> None:
        self._queues: set[asyncio.Queue] = set()
        self.sent = 0
        self.dropped_clients = 0

    @property
    def clients(self) -> int:
        return len(self._queues)

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._queues.discard(queue)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Queue one event for every page; encoded once, whatever the number of pages."""
        if not self._queues:
            return
        frame = f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n".encode()
        for queue in list(self._queues):
            try:
                queue.put_nowait(frame)
                self.sent += 1
            except asyncio.QueueFull:
                self._drop(queue)

    def _drop(self, queue: asyncio.Queue) -> None:
        self._queues.discard(queue)
        self.dropped_clients += 1
        log.warning("dashboard_client_dropped", reason="it did not keep up with the live updates")
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(_CLOSE)

    def close(self) -> None:
        """End every stream (shutdown): each handler returns at its next read."""
        for queue in list(self._queues):
            self._drop_quietly(queue)

    def _drop_quietly(self, queue: asyncio.Queue) -> None:
        self._queues.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(_CLOSE)


def is_close(item: object) -> bool:
    return item is _CLOSE
