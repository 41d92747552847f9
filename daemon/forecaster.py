"""A forecast for every closed candle: read the look-back from the store, sample paths off the event loop,
persist to `forecasts`, publish over MQTT.

The champion (version + predictor) is one attribute read once per batch, so a hot-swap never changes
the model under a running forecast: in-flight forecasts finish on the old model. Generations run in the model
worker (daemon/model_worker.py: a child process by default, one generation at a time, so a core stays free for
ingest and for a fine-tune); when candles arrive faster than forecasts, only the newest closed candle of a pair
is forecast.

Batches: the pairs and intervals of one tick are gathered (until no close arrived for 50 ms, at most 0.3 s)
and forecast in batched generations of up to `forecast.batch_size` pairs: look-backs read in one writer call,
one generation, one insert, then each pair is published. The batches of a tick are pipelined: while one is
generated in the model worker, the next one's look-backs are read and the previous one is calibrated, stored
and published, so the model runs back to back. Each pair keeps its own seed (`seed + origin // interval`) and its
own random stream (KronosPredictor.forecast_batch), so its forecast is the one it would get alone. A batch
that fails is forecast again pair by pair, so one bad pair fails alone.

Latency (the `forecast_published` log, /metrics, the summary): `latency_ms` runs from the moment the closing
candle reached the daemon (the closing kline message, or the REST answer of a resync) to the forecast being
stored and handed to MQTT; live, the closing message arrives at the close plus the exchange's and the
network's delay. `since_close_ms` runs from the close itself (open time + interval, exchange time) and is
given only while the exchange's clock agrees with ours (daemon/market/live.py `CloseSeen`): an accelerated
simulator clock has no wall-clock close to measure from.

Forecasts only move forward: a candle at or before the newest origin already forecast for its pair (a
duplicate, a re-sent older close, a candle forecast before a restart) is skipped, so neither the
`forecasts` table nor the retained MQTT topic ever goes back to an older origin. The newest origins are
read from the store at start (`load_newest_origins`).

Calibration (daemon/calibration.py): before a pair is forecast, the closed candles read for its look-back are
fed to its calibrator (outcomes of earlier forecasts); the forecast's close quantiles and P(up) are then
calibrated. The payload and the `*_cal` columns carry the calibrated close p10/p50/p90 and P(up) once every
step is calibrated; until then the raw values are published with `calibrated: false`. The raw model output is
always kept (the table's existing columns, the payload's `raw`). A calibration error never stops a forecast:
it is logged and counted, and the forecast goes out raw.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import structlog
import torch

from daemon.calibration import PairCalibrators
from daemon.config import ForecastConfig, ModelConfig
from daemon.ledger import rolling_scores
from daemon.model_worker import Champion, ModelWorker, build_predictor
from daemon.mqtt import Publisher
from kronos_model import Forecast, Kronos, KronosTokenizer
from kronos_model.calibration import DEFAULT_LEVELS, CalibratedForecast, RawForecast
from kronos_model.data import candles_to_frames
from storage.forecasts import (
    BAND_QUANTILES,
    CALIBRATED_COLUMNS,
    FORECAST_COLUMNS,
    GRID_COLUMNS,
    STORED_QUANTILES,
    calibration_history,
    insert_forecasts,
    insert_model_event,
    newest_forecast_origins,
)
from storage.intervals import format_ms, interval_ms
from storage.writer import StoreWriter

if TYPE_CHECKING:
    from daemon.market.live import CloseSeen

log = structlog.get_logger("daemon.forecaster")
Pair = tuple[str, str]
GATHER_QUIET_S = 0.05  # a tick's closes are gathered until none arrived for this long ...
GATHER_MAX_S = 0.3  # ... or for at most this long


@dataclass
class PendingForecast:
    """A pair's newest closed candle, waiting to be forecast."""

    pair: Pair
    origin_ms: int
    noticed: float  # time.monotonic() when its storing was reported
    seen: CloseSeen | None = None  # how and when the closing candle reached the daemon (live ingestion)


@dataclass
class PreparedBatch:
    """A batch whose look-backs are read: what the model needs, and when reading began and ended."""

    champion: Champion
    ready: list[PendingForecast]
    inputs: list[tuple[pl.DataFrame, int, int]]  # (Kronos frame of the look-back, step ms, seed) per pair
    began: float
    read_done: float
    model_began: float = 0.0  # when its generation started (after the batch before it: pipelined) ...
    model_done: float = 0.0  # ... and ended

    @property
    def pairs(self) -> set[Pair]:
        return {pending.pair for pending in self.ready}


@dataclass
class FinishedForecast:
    """One generated forecast on its way out: the raw close quantile grid (computed once for the table, the
    payload and the calibrator), the calibrated forecast, and what is published (calibrated only when every step
    is)."""

    pending: PendingForecast
    result: Forecast
    raw_grid: np.ndarray  # (levels, steps)
    calibrated: CalibratedForecast | None
    published: CalibratedForecast | None


def target_times_ms(origin_ms: int, interval: str, steps: int) -> list[int]:
    """The open times the forecast steps stand for, straight from the origin: times stay integer ms from the
    store to the table and the payload (the model's calendar features are its own business)."""
    step_ms = interval_ms(interval)
    return [origin_ms + step_ms * k for k in range(1, steps + 1)]


def forecast_rows(result: Forecast, symbol: str, interval: str, origin_ms: int, version: str,
                  issued_ms: int, calibrated: CalibratedForecast | None = None,
                  grid: tuple[float, ...] = DEFAULT_LEVELS, raw_grid: np.ndarray | None = None) -> pl.DataFrame:
    """The forecasts table's rows: the raw model output, the raw close p05/p95 and quantile `grid` (what the
    ledger's CRPS and the calibrator's warm-up read), and (when `calibrated`, i.e. it was published calibrated)
    the calibrated close quantiles, grid and P(up). `calibrated` must hold the levels of `grid`; `raw_grid`, the
    raw close quantiles at `grid` (levels, steps), is computed from the paths when not given."""
    steps = len(result.timestamps)
    data: dict[str, Any] = {
        "symbol": [symbol] * steps, "interval": [interval] * steps, "origin_time": [origin_ms] * steps,
        "model_version": [version] * steps, "step": list(range(1, steps + 1)),
        "target_time": target_times_ms(origin_ms, interval, steps), "issued_at": [issued_ms] * steps,
        "sample_paths": [len(result.paths)] * steps, "last_close": [result.last_close] * steps,
    }
    for j, column in enumerate(FORECAST_COLUMNS):
        data[f"{column}_mean"] = result.mean[:, j]
        for q, name in STORED_QUANTILES.items():
            data[f"{column}_{name}"] = result.quantiles[q][:, j]
    data["prob_up"] = result.prob_up
    for level, name in BAND_QUANTILES.items():
        data[f"close_{name}"] = result.close_quantile(level)
    nothing = [None] * steps  # published raw: no calibrated values (NULL)
    for level, name in STORED_QUANTILES.items():
        data[f"close_{name}_cal"] = nothing if calibrated is None else calibrated.quantile(level)
    data["prob_up_cal"] = nothing if calibrated is None else calibrated.prob_up
    data["grid_levels"] = [list(grid)] * steps
    if raw_grid is None:
        raw_grid = np.quantile(result.close_paths, grid, axis=0)
    data["close_grid"] = raw_grid.T.tolist()  # (steps, levels)
    data["close_grid_cal"] = nothing if calibrated is None else np.stack(
        [calibrated.quantile(level) for level in grid], axis=1).tolist()
    grid_type = pl.List(pl.Float64)
    return pl.DataFrame(data, schema_overrides={**dict.fromkeys(CALIBRATED_COLUMNS, pl.Float64),
                                                **dict.fromkeys(GRID_COLUMNS, grid_type)})


def forecast_payload(result: Forecast, symbol: str, interval: str, origin_ms: int, version: str,
                     issued_ms: int, calibrated: CalibratedForecast | None = None,
                     calibration: dict[str, Any] | None = None,
                     grid: tuple[float, ...] = DEFAULT_LEVELS, raw_grid: np.ndarray | None = None) -> dict[str, Any]:
    """The MQTT payload (documented in the README). With `calibrated` (every step calibrated), the close
    p10/p50/p90, the close quantile grid and prob_up are the calibrated ones; the raw ones are always under
    `raw`."""
    columns = list(FORECAST_COLUMNS)
    payload = {
        "symbol": symbol, "interval": interval, "issued_at": format_ms(issued_ms), "origin_time": format_ms(origin_ms),
        "model_version": version, "last_close": result.last_close, "sample_paths": len(result.paths),
        "timestamps": [format_ms(t) for t in target_times_ms(origin_ms, interval, len(result.timestamps))],
        "mean": {c: np.round(result.mean[:, j], 8).tolist() for j, c in enumerate(columns)},
        **{name: {c: np.round(result.quantiles[q][:, j], 8).tolist() for j, c in enumerate(columns)}
           for q, name in STORED_QUANTILES.items()},
        "prob_up": np.round(result.prob_up, 4).tolist(),
    }
    if raw_grid is None:
        raw_grid = np.quantile(result.close_paths, grid, axis=0)  # (levels, steps)
    payload["close_grid"] = {"levels": list(grid), "values": np.round(raw_grid, 8).tolist()}
    payload["raw"] = {**{name: {"close": np.round(result.close_quantile(q), 8).tolist()}
                         for q, name in STORED_QUANTILES.items()},
                      "prob_up": np.round(result.prob_up, 4).tolist(),
                      "close_grid": {"levels": list(grid), "values": np.round(raw_grid, 8).tolist()}}
    if calibrated is not None:
        for q, name in STORED_QUANTILES.items():
            payload[name]["close"] = np.round(calibrated.quantile(q), 8).tolist()
        payload["prob_up"] = np.round(calibrated.prob_up, 4).tolist()
        payload["close_grid"]["values"] = [np.round(calibrated.quantile(level), 8).tolist() for level in grid]
    payload["calibrated"] = calibrated is not None
    payload["calibration"] = calibration or {"method": None, "coverage_80": None, "coverage_90": None,
                                             "outcomes": 0}
    return payload


def read_lookbacks(store: Any, batch: list[PendingForecast], lookback: int) -> list[pl.DataFrame]:
    """Each pending pair's `lookback` newest stored candles up to its origin, in one query; read over twice the
    look-back in time, so a few missing candles still leave a full window. Runs in the writer thread."""
    windows = []
    for pending in batch:
        (symbol, interval), step = pending.pair, interval_ms(pending.pair[1])
        windows.append((symbol, interval, pending.origin_ms - 2 * lookback * step, pending.origin_ms + step, lookback))
    return store.read_newest_candles(windows)


class ForecastService:
    def __init__(self, writer: StoreWriter, forecast: ForecastConfig, model: ModelConfig,
                 publisher: Publisher | None):
        self.writer, self.forecast_config, self.model_config = writer, forecast, model
        self.publisher = publisher
        self.champion: Champion | None = None
        self._pending: dict[Pair, PendingForecast] = {}
        self.newest_origin: dict[Pair, int] = {}  # the newest origin forecast (or being forecast) per pair
        self.skipped_stale = 0
        self._wake = asyncio.Event()
        self._scores_due = asyncio.Event()
        self.published = 0
        self.latencies_ms: list[float] = []  # closing candle received -> forecast handed to MQTT
        self.since_close_ms: list[float] = []  # candle close -> forecast handed to MQTT (clocks agreeing)
        self.batches = 0  # batched generations run
        self.latest_scores: list[dict[str, Any]] = []  # the newest rolling ledger scores (/metrics)
        # Called after each forecast is stored and handed to MQTT (dashboard, metrics); must not block.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.score_listeners: list[Callable[[list[dict[str, Any]]], None]] = []
        self.grid = tuple(forecast.quantile_grid)
        self.calibrators = PairCalibrators(forecast.calibration, forecast.horizon, self.grid)
        torch.set_num_threads(model.threads)
        self.worker = ModelWorker(forecast.worker, model.threads)

    def set_champion(self, version: str, tokenizer: KronosTokenizer, model: Kronos,
                     warm: dict[Pair, list[tuple[RawForecast, np.ndarray]]] | None = None) -> None:
        """Swap the model. Calibrators belong to a model version: a pair in `warm` (the gate's held-out forecasts
        of the new version, with their outcomes) gets a calibrator warmed from them now; every other pair's is
        rebuilt from the new version's stored forecasts before its next forecast (see daemon/calibration.py)."""
        for pair, forecasts in (warm or {}).items():
            outcomes = self.calibrators.install_forecasts(pair, version, forecasts)
            log.info("calibration_warmed", symbol=pair[0], interval=pair[1], model_version=version,
                     source="gate", forecasts=len(forecasts), outcomes=outcomes)
        self.champion = Champion(version, build_predictor(tokenizer, model, self.model_config))

    def close(self) -> None:
        """Stop the model worker (the daemon is stopping)."""
        self.worker.close()

    def use_worker(self, mode: str) -> None:
        """Switch `forecast.worker` (a reload): a generation running in the old worker still completes."""
        old, self.worker = self.worker, ModelWorker(mode, self.model_config.threads)
        old.close()

    async def load_newest_origins(self) -> None:
        """The newest forecast origin per pair in the store: the floor for every later forecast."""
        self.newest_origin.update(await self.writer.run(lambda store: newest_forecast_origins(store.con)))

    def on_candle(self, pair: Pair, open_time_ms: int, seen: CloseSeen | None = None) -> None:
        """Called when closed candles of `pair` were stored; the newest one is forecast. `seen`: how its
        closing candle reached the daemon (for the latency measured from the close)."""
        if open_time_ms <= self.newest_origin.get(pair, -1):
            self.skipped_stale += 1
            log.info("forecast_skipped", symbol=pair[0], interval=pair[1], origin=open_time_ms,
                     reason="not newer than the newest forecast origin", newest=self.newest_origin[pair])
            return
        current = self._pending.get(pair)
        if current is None or open_time_ms > current.origin_ms:
            self._pending[pair] = PendingForecast(pair, open_time_ms, time.monotonic(), seen)
            self._wake.set()

    async def run(self) -> None:
        """Forecast whatever is pending, `batch_size` pairs per generation, until nothing is; pipelined so the
        model never waits for the store: while batch k is generated, batch k+1's look-backs are read, and batch
        k is stored and published while batch k+1 is generated."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._gather()
            self.writer.hold_snapshots()  # the tick's reads and inserts go first
            finishing: asyncio.Task | None = None
            busy: set[Pair] = set()  # pairs of the batch being finished: a newer origin of one waits for it
            try:
                prepared = await self._prepare_next(busy)
                while prepared is not None:
                    generating = asyncio.create_task(self._generate(prepared))
                    following = await self._prepare_next(busy | prepared.pairs)
                    results = await generating
                    if finishing is not None:
                        await finishing
                    finishing = asyncio.create_task(self._finish(prepared, results))
                    busy = prepared.pairs
                    if following is None and self._pending:
                        await finishing  # what is left is a newer origin of a pair just forecast
                        busy = set()
                        following = await self._prepare_next(busy)
                    prepared = following
                if finishing is not None:
                    await finishing
            finally:
                if finishing is not None and not finishing.done():
                    finishing.cancel()
                self.writer.release_snapshots()

    async def _gather(self) -> None:
        """The closes of one tick reach the daemon over some milliseconds: wait until no pair became pending for
        GATHER_QUIET_S (at most GATHER_MAX_S, or until a batch is full), so the first batch holds them all rather
        than the first pair alone."""
        deadline = time.monotonic() + GATHER_MAX_S
        seen = -1
        while seen != len(self._pending) < self.forecast_config.batch_size and time.monotonic() < deadline:
            seen = len(self._pending)
            await asyncio.sleep(GATHER_QUIET_S)

    async def _prepare_next(self, busy: set[Pair]) -> PreparedBatch | None:
        """Take up to `batch_size` pending pairs (not those in `busy`) and read their look-backs; None when there is
        nothing to take. A batch that fails to read is logged and dropped (the next close forecasts its pairs)."""
        while True:
            pairs = [pair for pair in self._pending if pair not in busy][:self.forecast_config.batch_size]
            if not pairs:
                return None
            batch = [self._pending.pop(pair) for pair in pairs]
            try:
                prepared = await self._prepare(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("forecast_failed", pairs=[f"{p.pair[0]}/{p.pair[1]}" for p in batch],
                              origins=[p.origin_ms for p in batch])
                continue
            if prepared is not None:
                return prepared

    async def score_loop(self) -> None:
        """Rolling ledger scores, off the forecast path: when due, once the forecasts of the current tick are
        out, and once however many forecasts made them due meanwhile (so many pairs closing together cost one
        scoring, not one per `score_every` forecasts)."""
        while True:
            await self._scores_due.wait()
            while self._pending:  # let the tick's forecasts go first
                await asyncio.sleep(0.05)
            self._scores_due.clear()
            try:
                await self.publish_scores()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ledger_scores_failed")

    async def publish_scores(self) -> list[dict[str, Any]]:
        """Rolling ledger scores per pair and model version: stored as a model event, published, logged."""
        window = timedelta(days=self.forecast_config.score_window_days)

        def score(store) -> list[dict[str, Any]]:
            results = [s.to_dict() for s in rolling_scores(store.con, window=window)]
            for result in results:
                insert_model_event(store.con, "ledger_scores", result.get("model_version"), None, None, result)
            return results

        results = await self.writer.run(score)
        self.latest_scores = results
        for listener in self.score_listeners:
            listener(results)
        for result in results:
            if self.publisher is not None:
                self.publisher.publish_event("ledger_scores", **result)
            log.info("ledger_scores", **{k: result[k] for k in ("symbol", "interval", "model_version", "origins",
                                                               "relative_mae", "coverage_80") if k in result})
        return results

    async def forecast_pair(self, pair: Pair, origin_ms: int, noticed: float | None = None) -> bool:
        """Forecast one pair's candle at `origin_ms` now (a batch of one)."""
        pending = PendingForecast(pair, origin_ms, time.monotonic() if noticed is None else noticed)
        return await self.forecast_pairs([pending]) == 1

    async def forecast_pairs(self, batch: list[PendingForecast]) -> int:
        """Forecast a batch of pairs in one generation; returns how many forecasts were published."""
        prepared = await self._prepare(batch)
        if prepared is None:
            return 0
        return await self._finish(prepared, await self._generate(prepared))

    async def _prepare(self, batch: list[PendingForecast]) -> PreparedBatch | None:
        """Read the look-backs of a batch (one writer call) and feed each pair's calibrator its outcomes;
        None when no pair is due or has enough history."""
        champion = self.champion  # read once: a swap during this batch does not affect it
        config = self.forecast_config
        due = [p for p in batch if p.origin_ms > self.newest_origin.get(p.pair, -1)]
        if champion is None or not due:
            return None
        began = time.monotonic()
        windows = await self.writer.run(lambda store: read_lookbacks(store, due, config.lookback))
        read_done = time.monotonic()
        ready: list[tuple[PendingForecast, pl.DataFrame]] = []
        for pending, candles in zip(due, windows, strict=True):
            if candles.height < config.lookback:
                log.info("forecast_skipped", symbol=pending.pair[0], interval=pending.pair[1],
                         reason="not enough history", have=candles.height, need=config.lookback)
                continue
            # outcomes first: they precede the origin
            await self._observe(pending.pair, champion.version, pending.origin_ms, candles)
            ready.append((pending, candles))
        if not ready:
            return None
        inputs = []
        for (pending, _), frame in zip(ready, candles_to_frames([candles for _, candles in ready]), strict=True):
            step = interval_ms(pending.pair[1])
            inputs.append((frame, step, config.seed + pending.origin_ms // step))  # seed per origin
        return PreparedBatch(champion, [pending for pending, _ in ready], inputs, began, read_done)

    async def _generate(self, prepared: PreparedBatch) -> list[Forecast | Exception]:
        """The batch's forecasts, from the model worker (daemon/model_worker.py)."""
        prepared.model_began = time.monotonic()
        results = await self.worker.forecast(prepared.champion, prepared.inputs, self.forecast_config)
        prepared.model_done = time.monotonic()
        self.batches += 1
        return results

    async def _finish(self, prepared: PreparedBatch, results: list[Forecast | Exception]) -> int:
        """Calibrate, store (one insert) and publish a generated batch; returns how many were published. Errors
        are logged here: a batch that cannot be stored is lost alone (the next close forecasts its pairs)."""
        try:
            return await self._store_and_publish(prepared, results)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("forecast_failed", pairs=[f"{p.pair[0]}/{p.pair[1]}" for p in prepared.ready],
                          origins=[p.origin_ms for p in prepared.ready])
            return 0

    async def _store_and_publish(self, prepared: PreparedBatch, results: list[Forecast | Exception]) -> int:
        version = prepared.champion.version
        issued = int(time.time() * 1000)
        done: list[FinishedForecast] = []
        for pending, result in zip(prepared.ready, results, strict=True):
            (symbol, interval), origin = pending.pair, pending.origin_ms
            if isinstance(result, Exception):
                log.error("forecast_failed", symbol=symbol, interval=interval, origin=origin, error=repr(result))
                continue
            if origin <= self.newest_origin.get(pending.pair, -1):
                continue  # a newer origin was forecast while this one ran
            self.newest_origin[pending.pair] = origin
            raw_grid = np.quantile(result.close_paths, self.grid, axis=0)  # (levels, steps), once per forecast
            calibrated = self._calibrate(pending.pair, origin, result, raw_grid)
            done.append(FinishedForecast(pending, result, raw_grid, calibrated,
                                         calibrated if calibrated is not None and calibrated.calibrated else None))
        if not done:
            return 0
        rows = pl.concat([forecast_rows(f.result, *f.pending.pair, f.pending.origin_ms, version, issued, f.published,
                                        self.grid, f.raw_grid) for f in done])
        await self.writer.run(lambda store: insert_forecasts(store.con, rows))
        stored = time.monotonic()
        timings = {"batch": len(prepared.ready), "read_ms": round((prepared.read_done - prepared.began) * 1000, 1),
                   "model_ms": round((prepared.model_done - prepared.model_began) * 1000, 1),
                   "store_ms": round((stored - prepared.model_done) * 1000, 1)}
        for finished in done:
            self._publish(finished, version, issued, prepared.began, timings)
        return len(done)

    def _publish(self, finished: FinishedForecast, version: str, issued: int, began: float,
                 timings: dict[str, Any]) -> None:
        """Hand one stored forecast to MQTT and the listeners; count, measure and log it."""
        pending, result, published = finished.pending, finished.result, finished.published
        (symbol, interval), origin = pending.pair, pending.origin_ms
        summary = self.calibrators.summary(pending.pair) if finished.calibrated is not None else None
        payload = forecast_payload(result, symbol, interval, origin, version, issued, published, summary, self.grid,
                                   finished.raw_grid)
        if self.publisher is not None:
            self.publisher.publish_forecast(symbol, interval, payload, origin_ms=origin)
        self.published += 1
        now, received = time.monotonic(), pending.noticed if pending.seen is None else pending.seen.received
        latency = (now - received) * 1000
        self.latencies_ms.append(latency)
        since_close = None
        if pending.seen is not None and pending.seen.close_wall_ms is not None:
            since_close = time.time() * 1000 - pending.seen.close_wall_ms
            self.since_close_ms.append(since_close)
        for listener in self.listeners:
            listener({"payload": payload, "latency_s": latency / 1000,
                      "since_close_s": None if since_close is None else since_close / 1000,
                      "model_s": timings["model_ms"] / 1000})
        if self.published % self.forecast_config.score_every == 0:
            self._scores_due.set()  # scored by score_loop, off the forecast path
        log.info("forecast_published", symbol=symbol, interval=interval, origin=origin, model_version=version,
                 latency_ms=round(latency, 1), since_close_ms=None if since_close is None else round(since_close, 1),
                 received_by=None if pending.seen is None else pending.seen.source,
                 waited_ms=round((began - received) * 1000, 1), **timings,
                 p50_close_next=round(float(result.close_quantile(0.5)[0]), 2), prob_up_next=float(result.prob_up[0]),
                 calibrated=published is not None)

    async def _observe(self, pair: Pair, version: str, origin_ms: int, candles: pl.DataFrame) -> None:
        """Warm the pair's calibrator if it has none for this model version, then feed it the closed candles."""
        calibrators = self.calibrators
        if not calibrators.settings.enabled:
            return
        try:
            if calibrators.needs_warm(pair, version):
                since = calibrators.warm_since_ms(pair[1], origin_ms)
                history = await self.writer.run(
                    lambda store: calibration_history(store.con, pair[0], pair[1], version, self.grid, since))
                outcomes = await asyncio.to_thread(calibrators.install, pair, version, history)
                calibrator = calibrators.get(pair)
                log.info("calibration_warmed", symbol=pair[0], interval=pair[1], model_version=version,
                         forecasts=history["origin_ms"].n_unique() if history.height else 0, outcomes=outcomes,
                         history_per_step=None if calibrator is None else calibrator.history())
            calibrators.observe(pair, candles["open_time"].to_numpy(), candles["close"].to_numpy())  # times in ms
        except Exception:
            self._calibration_failed(pair, "observe")

    def _calibrate(self, pair: Pair, origin_ms: int, result: Forecast,
                   raw_grid: np.ndarray) -> CalibratedForecast | None:
        if not self.calibrators.settings.enabled:
            return None
        try:
            raw = RawForecast(origin_ms, result.last_close, self.grid, raw_grid, result.prob_up)
            return self.calibrators.calibrate(pair, raw)
        except Exception:
            self._calibration_failed(pair, "calibrate")
            return None

    def _calibration_failed(self, pair: Pair, stage: str) -> None:
        """Counted and logged; the pair's calibrator is dropped, so the next forecast warms a new one."""
        self.calibrators.failures += 1
        self.calibrators.drop(pair)
        log.exception("calibration_failed", symbol=pair[0], interval=pair[1], stage=stage,
                      failures=self.calibrators.failures)
