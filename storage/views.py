"""Read-only views of the store for the dashboard and its JSON API (daemon/http/api.py).

Pure functions of a DuckDB connection (the live store's, or a snapshot's opened read-only), shaped for JSON:
times are Unix seconds where charts use them, ISO 8601 UTC strings elsewhere, non-finite numbers are None.
Every query is bounded by a limit its caller has validated.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import duckdb

GATE_KINDS = ("finetune_started", "promoted", "rejected", "swapped")


def _iso(ms: float | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def pairs_with_candles(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    rows = con.execute("SELECT DISTINCT symbol, interval FROM candles ORDER BY symbol, interval").fetchall()
    return [(str(symbol), str(interval)) for symbol, interval in rows]


def query_candles(con: duckdb.DuckDBPyConnection, symbol: str, interval: str, limit: int) -> list[dict[str, Any]]:
    rows = con.execute(
        "SELECT epoch_ms(open_time), open, high, low, close, volume FROM candles WHERE symbol = ? AND interval = ? "
        "ORDER BY open_time DESC LIMIT ?", [symbol, interval, limit]).fetchall()
    return [{"time": int(t) // 1000, "open": o, "high": h, "low": lo, "close": c, "volume": v}
            for t, o, h, lo, c, v in reversed(rows)]


def query_forecast(con: duckdb.DuckDBPyConnection, symbol: str, interval: str) -> dict[str, Any] | None:
    """The newest forecast of a pair (the newest origin, the latest issued model's rows)."""
    head = con.execute(
        "SELECT epoch_ms(origin_time), model_version, epoch_ms(issued_at), last_close, sample_paths FROM forecasts "
        "WHERE symbol = ? AND interval = ? ORDER BY origin_time DESC, issued_at DESC LIMIT 1",
        [symbol, interval]).fetchall()
    if not head:
        return None
    origin, version, issued, last_close, paths = head[0]
    rows = con.execute(
        "SELECT epoch_ms(target_time), close_p10, close_p50, close_p90, close_mean, prob_up FROM forecasts "
        "WHERE symbol = ? AND interval = ? AND origin_time = make_timestamptz(?::BIGINT * 1000) "
        "AND model_version = ? ORDER BY step", [symbol, interval, int(origin), version]).fetchall()
    return {"symbol": symbol, "interval": interval, "origin_time": int(origin) // 1000, "model_version": version,
            "issued_at": _iso(issued), "last_close": last_close, "sample_paths": paths,
            "steps": [{"time": int(t) // 1000, "p10": p10, "p50": p50, "p90": p90, "mean": mean, "prob_up": up}
                      for t, p10, p50, p90, mean, up in rows]}


def query_track(con: duckdb.DuckDBPyConnection, symbol: str, interval: str, step: int,
                limit: int) -> list[dict[str, Any]]:
    """Where earlier forecasts' step-`step` quantiles landed, next to the close that happened (null: not yet)."""
    rows = con.execute(
        """
        SELECT epoch_ms(f.target_time), f.close_p10, f.close_p50, f.close_p90, c.close, f.model_version
        FROM forecasts f LEFT JOIN candles c
          ON c.symbol = f.symbol AND c.interval = f.interval AND c.open_time = f.target_time
        WHERE f.symbol = ? AND f.interval = ? AND f.step = ?
        QUALIFY row_number() OVER (PARTITION BY f.target_time ORDER BY f.issued_at DESC) = 1
        ORDER BY f.target_time DESC LIMIT ?
        """, [symbol, interval, step, limit]).fetchall()
    return [{"time": int(t) // 1000, "p10": p10, "p50": p50, "p90": p90, "actual": actual, "model_version": version}
            for t, p10, p50, p90, actual, version in reversed(rows)]


def query_ledger(con: duckdb.DuckDBPyConnection, symbol: str, interval: str, limit: int) -> list[dict[str, Any]]:
    """The rolling scores the daemon stored (one `ledger_scores` model event per pair and version each time)."""
    rows = con.execute(
        "SELECT epoch_ms(event_time), model_version, details FROM model_events WHERE kind = 'ledger_scores' "
        "AND json_extract_string(details, '$.symbol') = ? AND json_extract_string(details, '$.interval') = ? "
        "ORDER BY event_time DESC LIMIT ?", [symbol, interval, limit]).fetchall()
    keep = ("origins", "scored_steps", "mae", "mae_random_walk", "relative_mae", "coverage_80", "quantile_loss",
            "quantile_loss_random_walk", "direction_accuracy", "brier_prob_up", "window", "beats_random_walk")
    result = []
    for at, version, details in reversed(rows):
        values = json.loads(details) if isinstance(details, str) else details or {}
        # `at`: the newest scored origin (market time, which the charts share; the event time is wall time)
        origin = values.get("last_origin")
        at_origin = int(datetime.strptime(origin, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()) \
            if isinstance(origin, str) else int(at) // 1000
        result.append({"time": int(at) // 1000, "at": at_origin, "model_version": version,
                       **{k: _finite(values.get(k)) for k in keep}})
    return result


def _gate_summary(details: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {k: details[k] for k in ("reason", "previous", "rows", "margin") if k in details}
    for side in ("challenger", "champion"):
        scores = details.get(side)
        if isinstance(scores, dict):
            summary[side] = {k: _finite(scores[k]) for k in ("crps", "mae", "finite", "origins") if k in scores}
    comparison = details.get("comparison")
    if isinstance(comparison, dict):
        summary["comparison"] = {k: _finite(v) for k, v in comparison.items() if not isinstance(v, dict | list)}
    return summary


def query_model_events(con: duckdb.DuckDBPyConnection, limit: int) -> list[dict[str, Any]]:
    rows = con.execute(
        f"SELECT epoch_ms(event_time), kind, model_version, champion_version, run_id, details FROM model_events "
        f"WHERE kind IN ({', '.join('?' for _ in GATE_KINDS)}) ORDER BY event_time DESC LIMIT ?",
        [*GATE_KINDS, limit]).fetchall()
    return [{"time": int(at) // 1000, "at": _iso(at), "kind": kind, "model_version": version,
             "champion_version": champion, "run_id": run_id,
             **_gate_summary(json.loads(details) if isinstance(details, str) else details or {})}
            for at, kind, version, champion, run_id, details in rows]


def query_gaps(con: duckdb.DuckDBPyConnection, symbol: str, interval: str) -> dict[str, Any]:
    counts = dict(con.execute("SELECT status, count(*) FROM gaps WHERE symbol = ? AND interval = ? GROUP BY status",
                              [symbol, interval]).fetchall())
    recent = con.execute(
        "SELECT epoch_ms(gap_start), epoch_ms(gap_end), status, reason FROM gaps WHERE symbol = ? AND interval = ? "
        "ORDER BY gap_start DESC LIMIT 20", [symbol, interval]).fetchall()
    total, newest = con.execute("SELECT count(*), epoch_ms(max(open_time)) FROM candles WHERE symbol = ? "
                                "AND interval = ?", [symbol, interval]).fetchall()[0]
    return {"stored_candles": int(total), "newest_open_time": _iso(newest), "gaps_by_status": counts,
            "recent_gaps": [{"start": _iso(a), "end": _iso(b), "status": s, "reason": r} for a, b, s, r in recent]}
