"""The simulator's `hostile` fault profile: an exchange (or the proxies in front of it) that misbehaves in
every way a client must survive, mixed into an otherwise true live stream.

Websocket: after a closing event, now and then one kind of garbage follows — text that is not JSON, a
binary frame, a foreign event type, a kline with a field missing, mistyped, not a number, NaN or
Infinity, a price <= 0, high < low, a negative volume, an open time off the grid, a symbol nobody
subscribed to, an absurdly large frame, the same close again, an older close re-sent, a close held back
and sent after the next one, a close replaced by a corrupt copy (the client must fetch it over REST),
an event whose time jumps hours back. REST klines: an HTML page or a
truncated body with status 200, rows in reverse order, rows past `endTime` or before `startTime`, an empty
array for a range that has candles (once per range, so a second request gets the truth); `/time` jumping
back. Kinds are dealt round-robin from a seeded shuffle, so every kind appears within a few dozen candles
and a run is reproducible. Nothing here changes the truth: a correct client ends with the same store.
"""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from typing import Any

WS_KINDS = (
    "not_json", "binary", "wrong_event", "missing_field", "mistyped_field", "not_a_number", "nan", "infinity",
    "negative_price", "high_below_low", "negative_volume", "off_grid", "unsubscribed", "huge_frame",
    "duplicate", "stale_close", "reorder", "clock_back", "corrupt_close",
)
REST_KINDS = ("html_page", "truncated_json", "reversed", "end_ignored", "overlap", "empty", "time_back")
# What a correct client counts for each injected kind (boundary:reason in its rejection log); `reorder`
# shows as a stale close, or not at all when the held-back close was already fetched through REST.
EXPECTED_REJECTIONS = {
    "not_json": "websocket:not_json", "binary": "websocket:binary_frame", "wrong_event": "websocket:unexpected_event",
    "missing_field": "websocket:missing_field", "mistyped_field": "websocket:mistyped_field",
    "not_a_number": "websocket:not_a_number", "nan": "websocket:not_finite", "infinity": "websocket:not_finite",
    "negative_price": "websocket:non_positive_price", "high_below_low": "websocket:high_below_low",
    "negative_volume": "websocket:negative_volume", "off_grid": "websocket:off_grid",
    "unsubscribed": "websocket:unsubscribed", "huge_frame": "websocket:frame_too_large",
    "duplicate": "websocket:stale_close", "stale_close": "websocket:stale_close",
    "clock_back": "exchange_clock:clock_backwards", "corrupt_close": "websocket:not_finite",
    "html_page": "rest:wrong_content_type", "truncated_json": "rest:not_json", "reversed": "rest:out_of_order",
    "end_ignored": "rest:outside_request", "overlap": "rest:outside_request",
    "time_back": "exchange_clock:clock_backwards",
}
HOUR_MS = 3_600_000


class _Dealer:
    """Round-robin over a seeded shuffle of `kinds`, firing with probability `rate`."""

    def __init__(self, kinds: tuple[str, ...], rate: float, rng: random.Random) -> None:
        self.kinds, self.rate, self.rng = list(kinds), rate, rng
        self.rng.shuffle(self.kinds)
        self.position = 0

    def deal(self) -> str | None:
        if self.rng.random() >= self.rate:
            return None
        kind = self.kinds[self.position % len(self.kinds)]
        self.position += 1
        return kind


class HostileProfile:
    def __init__(self, seed: int = 0, ws_rate: float = 0.5, rest_rate: float = 0.25) -> None:
        rng = random.Random(seed)
        self.ws = _Dealer(WS_KINDS, ws_rate, rng)
        self.rest = _Dealer(REST_KINDS[:-1], rest_rate, rng)
        self.time = _Dealer(("time_back",), rest_rate / 2, rng)
        self.injected: Counter[str] = Counter()
        self._lied_empty: set[tuple[str, str, int]] = set()

    # -- websocket --------------------------------------------------------------------------------
    def after_close(self, event: dict[str, Any], history: list[dict[str, Any]]) -> tuple[list[Any], str]:
        """Frames (events or raw text/bytes) to send after the closing `event`, and what to do with `event`:
        "send" it, "hold" it back (sent after the next close) or "drop" it (only the corrupt copy goes out).
        `history` holds this stream's earlier closes."""
        kind = self.ws.deal()
        if kind is None or (kind == "stale_close" and not history):
            return [], "send"
        self.injected[kind] += 1
        if kind == "reorder":
            return [], "hold"
        if kind == "duplicate":
            return [event], "send"
        if kind == "stale_close":
            return [history[max(0, len(history) - 3)]], "send"
        if kind == "corrupt_close":
            return [self._garbage("nan", event)], "drop"
        return [self._garbage(kind, event)], "send"

    def _garbage(self, kind: str, event: dict[str, Any]) -> Any:
        if kind == "not_json":
            return '{"e": "kline", "E": 1, "k": {"t": '
        if kind == "binary":
            return b"\x00\x01kline\xff"
        if kind == "huge_frame":
            return json.dumps({"e": "kline", "padding": "x" * 200_000})
        bad = copy.deepcopy(event)
        k = bad["k"]
        if kind == "wrong_event":
            return {"e": "24hrTicker", "E": bad["E"], "s": k["s"], "c": k["c"]}
        if kind == "clock_back":
            bad["E"] -= 6 * HOUR_MS
            k["x"] = False  # an interim update: only its clock is wrong
            return bad
        mutate = {
            "missing_field": lambda: k.pop("c"),
            "mistyped_field": lambda: k.__setitem__("t", str(k["t"])),
            "not_a_number": lambda: k.__setitem__("o", "12,5x"),
            "nan": lambda: k.__setitem__("c", "NaN"),
            "infinity": lambda: k.__setitem__("h", "Infinity"),
            "negative_price": lambda: k.__setitem__("l", "-1.00000000"),
            "high_below_low": lambda: k.update(h=k["l"], l=k["h"]),
            "negative_volume": lambda: k.__setitem__("v", "-5.00000000"),
            "off_grid": lambda: k.update(t=k["t"] + 1234, T=k["T"] + 1234),
            "unsubscribed": lambda: k.update(s="NOPEUSDT") or bad.update(s="NOPEUSDT"),
        }
        mutate[kind]()
        return bad

    # -- REST -------------------------------------------------------------------------------------
    def server_time(self, now_ms: int) -> int:
        if self.time.deal() is None:
            return now_ms
        self.injected["time_back"] += 1
        return now_ms - 3 * HOUR_MS

    def klines_kind(self, symbol: str, interval: str, start: int | None) -> str | None:
        kind = self.rest.deal()
        if kind == "empty":
            key = (symbol, interval, start or 0)
            if key in self._lied_empty:
                return None  # the second opinion gets the truth
            self._lied_empty.add(key)
        if kind is not None:
            self.injected[kind] += 1
        return kind
