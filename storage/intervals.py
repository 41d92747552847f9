"""Binance kline intervals as fixed millisecond lengths, and the grid their candles open on."""

from __future__ import annotations

from datetime import UTC, datetime

_MINUTE = 60_000
_HOUR = 60 * _MINUTE
_DAY = 24 * _HOUR

INTERVAL_MS: dict[str, int] = {
    "1s": 1_000,
    "1m": _MINUTE,
    "3m": 3 * _MINUTE,
    "5m": 5 * _MINUTE,
    "15m": 15 * _MINUTE,
    "30m": 30 * _MINUTE,
    "1h": _HOUR,
    "2h": 2 * _HOUR,
    "4h": 4 * _HOUR,
    "6h": 6 * _HOUR,
    "8h": 8 * _HOUR,
    "12h": 12 * _HOUR,
    "1d": _DAY,
    "3d": 3 * _DAY,
    "1w": 7 * _DAY,
}

# Weekly candles open on Mondays; 1970-01-01 was a Thursday, so the weekly grid is shifted by 4 days.
_GRID_OFFSET_MS = {"1w": 4 * _DAY}


def interval_ms(interval: str) -> int:
    """Length of one candle of `interval` in milliseconds; a clear error for anything else."""
    try:
        return INTERVAL_MS[interval]
    except KeyError:
        if interval == "1M":
            raise ValueError("interval 1M is not supported: months have no fixed length (use 1w or 1d)") from None
        known = ", ".join(INTERVAL_MS)
        raise ValueError(f"unknown interval {interval!r}; Binance intervals are: {known}") from None


def grid_offset_ms(interval: str) -> int:
    return _GRID_OFFSET_MS.get(interval, 0)


def is_on_grid(open_time_ms: int, interval: str) -> bool:
    return (open_time_ms - grid_offset_ms(interval)) % interval_ms(interval) == 0


def floor_to_grid(time_ms: int, interval: str) -> int:
    step, offset = interval_ms(interval), grid_offset_ms(interval)
    return (time_ms - offset) // step * step + offset


def ceil_to_grid(time_ms: int, interval: str) -> int:
    floored = floor_to_grid(time_ms, interval)
    return floored if floored == time_ms else floored + interval_ms(interval)


def ms_to_datetime(time_ms: int) -> datetime:
    return datetime.fromtimestamp(time_ms / 1000, tz=UTC)


def format_ms(time_ms: int) -> str:
    """ISO-8601 UTC with a `Z` (`2024-01-01T12:00:00Z`): the one time format of every human and JSON output."""
    moment = ms_to_datetime(time_ms)
    if time_ms % 1000:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> int:
    """`2024-01-01`, `2024-01-01T12:00`, ISO with offset, or integer ms → UTC milliseconds."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"cannot read time {text!r}; use YYYY-MM-DD, YYYY-MM-DDTHH:MM or milliseconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)
