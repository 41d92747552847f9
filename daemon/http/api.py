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

from aiohttp import web

from daemon.registry import VERSION_PATTERN
from storage.views import (
    query_candles,
    query_forecast,
    query_gaps,
    query_ledger,
    query_model_events,
    query_track,
)

MAX_CANDLES = 5000
MAX_TRACK = 5000
MAX_EVENTS = 1000
MAX_RUNS = 50
MAX_LOG_BYTES = 8 * 1024 * 1024  # a train_log.jsonl larger than this is thinned, never read whole per request


class BadRequest(ValueError):
    """Bad input from the client: answered with 400 and this message."""


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


# -- the live stream's forecast in the API's shape ----------------------------------------------------------

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
