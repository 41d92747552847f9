"""The JSON API under /api/ (read-only), what the dashboard draws from; documented in the README.

Every parameter is checked before anything is read: a pair must be one the daemon ingests (or, without a
daemon, one the snapshot holds), a limit must lie in its documented range, and an unknown parameter is an
error too (a typo should not silently mean "the default"). Bad input is a 400 with a JSON reason.

Times are Unix seconds (UTC) wherever a chart uses them, ISO strings elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
from aiohttp import web

from daemon.registry import VERSION_PATTERN

MAX_CANDLES = 5000
MAX_TRACK = 5000
MAX_EVENTS = 1000
MAX_RUNS = 50
MAX_LOG_BYTES = 8 * 1024 * 1024  # a train_log.jsonl larger than this is thinned, never read whole per request
GATE_KINDS = ("finetune_started", "promoted", "rejected", "swapped")


class BadRequest(ValueError):
    """Bad input from the client: answered with 400 and this message."""


def _iso(ms: float | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# -- parameters --------------------------------------------------------------------------------------------

def check_params(request: web.Request, allowed: set[str]) -> None:
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(unknown)}; this endpoint takes "
                         f"{', '.join(sorted(allowed)) or 'none'}")
    for name in request.query:
        if len(request.query.getall(name)) > 1:
            raise BadRequest(f"parameter {name} given more than once")


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit() or len(text) > 9:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}, got {text[:40]!r}")
    value = int(text)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be from {low} to {high}, got {value}")
    return value


async def pair_param(request: web.Request) -> tuple[str, str]:
    symbol, interval = request.query.get("symbol"), request.query.get("interval")
    if not symbol or not interval:
        raise BadRequest("symbol and interval are required, e.g. ?symbol=BTCUSDT&interval=1h")
    pairs = await request.app["source"].pairs()
    pair = (symbol.upper(), interval)
    if pair not in pairs:
        known = ", ".join(f"{s}/{i}" for s, i in pairs) or "none yet"
        raise BadRequest(f"unknown pair {symbol[:20]}/{interval[:10]}; the pairs are {known}")
    return pair


# -- queries (pure functions of a DuckDB connection) ---------------------------------------------------------

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


def forecast_from_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The MQTT payload in the shape of query_forecast (what the live stream sends pages)."""
    def seconds(iso: str) -> int:
        return int(datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())

    close = {name: payload[name]["close"] for name in ("p10", "p50", "p90", "mean")}
    return {"symbol": payload["symbol"], "interval": payload["interval"],
            "origin_time": seconds(payload["origin_time"]), "model_version": payload["model_version"],
            "issued_at": payload["issued_at"], "last_close": payload["last_close"],
            "sample_paths": payload["sample_paths"],
            "steps": [{"time": seconds(t), "p10": close["p10"][k], "p50": close["p50"][k], "p90": close["p90"][k],
                       "mean": close["mean"][k], "prob_up": payload["prob_up"][k]}
                      for k, t in enumerate(payload["timestamps"])]}


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


def _alias(root: Path, name: str) -> str | None:
    link = root / name
    if not link.is_symlink():
        return None
    target = os.readlink(link)
    return target if VERSION_PATTERN.fullmatch(target) else None


def registry_versions(state_dir: Path) -> dict[str, Any]:
    """Versions, aliases and manifests of the model registry, read without touching it (no recovery, no
    directory creation: this may be a copy of a server's state)."""
    root = state_dir / "models"
    if not root.is_dir():
        return {"current": None, "previous": None, "versions": []}
    versions = []
    for path in sorted(root.iterdir()):
        if path.is_symlink() or not path.is_dir() or not VERSION_PATTERN.fullmatch(path.name):
            continue
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError):
            manifest = {}
        data = manifest.get("data") if isinstance(manifest.get("data"), dict) else {}
        versions.append({"version": path.name, "origin": manifest.get("origin", "fine-tune"),
                         "data_last": data.get("last"), "metrics": manifest.get("metrics", {})})
    return {"current": _alias(root, "current"), "previous": _alias(root, "previous"), "versions": versions}


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """Loss records of one run (train_log.jsonl), thinned evenly when the file is large."""
    size = path.stat().st_size
    stride = max(1, math.ceil(size / MAX_LOG_BYTES))
    records = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle):
            if number % stride and b"val_loss" not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if not isinstance(record, dict) or "stage" not in record:
                continue
            entry = {k: _finite(record.get(k)) for k in ("stage", "epoch", "step", "loss", "val_loss")
                     if record.get(k) is not None}
            if "loss" in entry or "val_loss" in entry:
                records.append(entry)
    return records


def finetune_runs(state_dir: Path, limit: int) -> list[dict[str, Any]]:
    runs_dir = state_dir / "finetune"
    if not runs_dir.is_dir():
        return []
    runs = []
    for run in sorted((p for p in runs_dir.iterdir() if p.is_dir()), reverse=True)[:limit]:
        log_path = run / "out" / "train_log.jsonl"
        runs.append({"run_id": run.name, "records": read_train_log(log_path) if log_path.is_file() else []})
    return runs


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


# -- handlers ----------------------------------------------------------------------------------------------

async def pairs_handler(request: web.Request) -> web.Response:
    check_params(request, set())
    source = request.app["source"]
    return web.json_response({"mode": source.mode, "horizon": source.horizon(),
                              "pairs": [{"symbol": s, "interval": i} for s, i in await source.pairs()]})


async def candles_handler(request: web.Request) -> web.Response:
    check_params(request, {"symbol", "interval", "limit"})
    symbol, interval = await pair_param(request)
    limit = int_param(request, "limit", 500, 1, MAX_CANDLES)
    rows = await request.app["source"].read(lambda con: query_candles(con, symbol, interval, limit))
    return web.json_response({"symbol": symbol, "interval": interval, "candles": rows})


async def forecast_handler(request: web.Request) -> web.Response:
    check_params(request, {"symbol", "interval"})
    symbol, interval = await pair_param(request)
    forecast = await request.app["source"].read(lambda con: query_forecast(con, symbol, interval))
    return web.json_response({"symbol": symbol, "interval": interval, "forecast": forecast})


async def track_handler(request: web.Request) -> web.Response:
    check_params(request, {"symbol", "interval", "step", "limit"})
    symbol, interval = await pair_param(request)
    step = int_param(request, "step", 1, 1, 10_000)
    limit = int_param(request, "limit", 500, 1, MAX_TRACK)
    rows = await request.app["source"].read(lambda con: query_track(con, symbol, interval, step, limit))
    return web.json_response({"symbol": symbol, "interval": interval, "step": step, "points": rows})


async def ledger_handler(request: web.Request) -> web.Response:
    check_params(request, {"symbol", "interval", "limit"})
    symbol, interval = await pair_param(request)
    limit = int_param(request, "limit", 500, 1, MAX_EVENTS)
    rows = await request.app["source"].read(lambda con: query_ledger(con, symbol, interval, limit))
    return web.json_response({"symbol": symbol, "interval": interval, "scores": rows})


async def models_handler(request: web.Request) -> web.Response:
    check_params(request, {"limit"})
    limit = int_param(request, "limit", 200, 1, MAX_EVENTS)
    source = request.app["source"]
    registry = registry_versions(source.state_dir)
    events = await source.read(lambda con: query_model_events(con, limit))
    return web.json_response({**registry, "events": events})


async def finetune_handler(request: web.Request) -> web.Response:
    check_params(request, {"limit"})
    limit = int_param(request, "limit", 10, 1, MAX_RUNS)
    runs = await asyncio.to_thread(finetune_runs, request.app["source"].state_dir, limit)  # files, not the store
    return web.json_response({"runs": runs})


async def ingest_handler(request: web.Request) -> web.Response:
    check_params(request, {"symbol", "interval"})
    symbol, interval = await pair_param(request)
    source = request.app["source"]
    stored = await source.read(lambda con: query_gaps(con, symbol, interval))
    live = next((p for p in source.status()["pairs"] if (p["symbol"], p["interval"]) == (symbol, interval)), None)
    return web.json_response({"symbol": symbol, "interval": interval, **stored, "live": live,
                              **source.ingest_counts().get((symbol, interval), {}),
                              "ws_reconnects": source.reconnects()})


async def status_handler(request: web.Request) -> web.Response:
    check_params(request, set())
    source = request.app["source"]
    status = source.status()
    if status.get("model_version") is None:
        status["model_version"] = registry_versions(source.state_dir)["current"]
    return web.json_response(status)


def add_routes(app: web.Application) -> None:
    for path, handler in (("/api/pairs", pairs_handler), ("/api/status", status_handler),
                          ("/api/candles", candles_handler), ("/api/forecast", forecast_handler),
                          ("/api/track", track_handler), ("/api/ledger", ledger_handler),
                          ("/api/models", models_handler), ("/api/finetune", finetune_handler),
                          ("/api/ingest", ingest_handler)):
        app.router.add_get(path, handler)
