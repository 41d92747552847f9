"""systemd's sd_notify protocol: datagrams to $NOTIFY_SOCKET (READY, STATUS, RELOADING, STOPPING, WATCHDOG).

Fifteen lines instead of a dependency; a no-op when not started by systemd (no NOTIFY_SOCKET).
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, address: str | None = None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address or None
        watchdog_usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        enabled = watchdog_usec and (pid is None or int(pid) == os.getpid())
        self.watchdog_interval_s = int(watchdog_usec) / 2e6 if enabled else None

    def send(self, *fields: str) -> bool:
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # Never block the event loop on a slow or absent reader: drop the datagram instead.
            sock.setblocking(False)
            try:
                sock.connect(self.address)
                sock.send("\n".join(fields).encode())
            except OSError:
                return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload; harmless on 252.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")
