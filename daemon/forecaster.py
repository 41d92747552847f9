"""A forecast for every closed candle: read the look-back from the store, sample paths off the event loop,
persist to `forecasts`, publish over MQTT.

The champion (version + predictor) is one attribute read once per forecast, so a hot-swap never changes
the model under a running forecast: in-flight forecasts finish on the old model. Forecasts run one at a
time in a worker thread (torch releases the GIL; a single thread keeps the CPU free for ingest and for a
fine-tune); when candles arrive faster than forecasts, only the newest closed candle of a pair is
forecast.

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
from typing import Any

import numpy as np
import polars as pl
import structlog
import torch

from daemon.calibration import LEVELS, PairCalibrators
from daemon.config import ForecastConfig, ModelConfig
from daemon.ledger import rolling_scores
from daemon.mqtt import Publisher
from kronos_model import Forecast, Kronos, KronosPredictor, KronosTokenizer
from kronos_model.calibration import CalibratedForecast, RawForecast
from kronos_model.data import FEATURES, candles_to_frame
from storage.forecasts import (
    CALIBRATED_COLUMNS,
    CALIBRATION_QUANTILES,
    FORECAST_COLUMNS,
    STORED_QUANTILES,
    calibration_history,
    insert_forecasts,
    insert_model_event,
    newest_forecast_origins,
)
from storage.intervals import format_ms, interval_ms
from storage.writer import StoreWriter

log = structlog.get_logger("daemon.forecaster")
Pair = tuple[str, str]


@dataclass(frozen=True)
class Champion:
    version: str
    predictor: KronosPredictor


def build_predictor(tokenizer: KronosTokenizer, model: Kronos, config: ModelConfig) -> KronosPredictor:
    device = None if config.device == "auto" else config.device
    dtype = getattr(torch, config.dtype)
    return KronosPredictor(model.to(dtype), tokenizer.to(dtype), device=device, max_context=config.max_context)


def forecast_window(champion: Champion, frame: pl.DataFrame, step_ms: int, config: ForecastConfig,
                    seed: int) -> Forecast:
    """Forecast the `config.horizon` candles after `frame` (a Kronos frame of the look-back, oldest first)."""
    last = int(frame["timestamps"].dt.epoch("ms")[-1])
    future = pl.from_epoch(pl.Series([last + step_ms * k for k in range(1, config.horizon + 1)]), time_unit="ms")
    return champion.predictor.forecast(frame.select(FEATURES), frame["timestamps"], future, config.horizon,
                                       T=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                       sample_count=config.sample_paths, seed=seed, quantiles=config.quantiles,
                                       anchor=config.anchor)


def target_times_ms(origin_ms: int, interval: str, steps: int) -> list[int]:
    """The open times the forecast steps stand for, straight from the origin: times stay integer ms from the
    store to the table and the payload (the model's calendar features are its own business)."""
    step_ms = interval_ms(interval)
    return [origin_ms + step_ms * k for k in range(1, steps + 1)]


def forecast_rows(result: Forecast, symbol: str, interval: str, origin_ms: int, version: str,
                  issued_ms: int, calibrated: CalibratedForecast | None = None) -> pl.DataFrame:
    """The forecasts table's rows: the raw model output, the raw close p05/p95 the calibrator is warmed from,
    and (when `calibrated`, i.e. it was published calibrated) the calibrated close quantiles and P(up)."""
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
    for level in (0.05, 0.95):
        data[f"close_{CALIBRATION_QUANTILES[level]}"] = result.close_quantile(level)
    nothing = [None] * steps  # published raw: no calibrated values (NULL)
    for level, name in STORED_QUANTILES.items():
        data[f"close_{name}_cal"] = nothing if calibrated is None else calibrated.quantile(level)
    data["prob_up_cal"] = nothing if calibrated is None else calibrated.prob_up
    return pl.DataFrame(data, schema_overrides=dict.fromkeys(CALIBRATED_COLUMNS, pl.Float64))


def forecast_payload(result: Forecast, symbol: str, interval: str, origin_ms: int, version: str,
                     issued_ms: int, calibrated: CalibratedForecast | None = None,
                     calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """The MQTT payload (documented in the README). With `calibrated` (every step calibrated), the close
    p10/p50/p90 and prob_up are the calibrated ones; the raw ones are always under `raw`."""
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
    payload["raw"] = {**{name: {"close": np.round(result.close_quantile(q), 8).tolist()}
                         for q, name in STORED_QUANTILES.items()},
                      "prob_up": np.round(result.prob_up, 4).tolist()}
    if calibrated is not None:
        for q, name in STORED_QUANTILES.items():
            payload[name]["close"] = np.round(calibrated.quantile(q), 8).tolist()
        payload["prob_up"] = np.round(calibrated.prob_up, 4).tolist()
    payload["calibrated"] = calibrated is not None
    payload["calibration"] = calibration or {"method": None, "coverage_80": None, "coverage_90": None,
                                             "outcomes": 0}
    return payload


class ForecastService:
    def __init__(self, writer: StoreWriter, forecast: ForecastConfig, model: ModelConfig,
                 publisher: Publisher | None):
        self.writer, self.forecast_config, self.model_config = writer, forecast, model
        self.publisher = publisher
        self.champion: Champion | None = None
        self._pending: dict[Pair, tuple[int, float]] = {}
        self.newest_origin: dict[Pair, int] = {}  # the newest origin forecast (or being forecast) per pair
        self.skipped_stale = 0
        self._wake = asyncio.Event()
        self._scores_due = asyncio.Event()
        self.published = 0
        self.latencies_ms: list[float] = []
        self.latest_scores: list[dict[str, Any]] = []  # the newest rolling ledger scores (/metrics)
        # Called after each forecast is stored and handed to MQTT (dashboard, metrics); must not block.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.score_listeners: list[Callable[[list[dict[str, Any]]], None]] = []
        self.calibrators = PairCalibrators(forecast.calibration, forecast.horizon)
        torch.set_num_threads(model.threads)

    def set_champion(self, version: str, tokenizer: KronosTokenizer, model: Kronos) -> None:
        """Swap the model. Calibrators belong to a model version: each pair's is rebuilt from the new
        version's stored forecasts before its next forecast (see daemon/calibration.py)."""
        self.champion = Champion(version, build_predictor(tokenizer, model, self.model_config))

    async def load_newest_origins(self) -> None:
        """The newest forecast origin per pair in the store: the floor for every later forecast."""
        self.newest_origin.update(await self.writer.run(lambda store: newest_forecast_origins(store.con)))

    def on_candle(self, pair: Pair, open_time_ms: int) -> None:
        """Called when closed candles of `pair` were stored; the newest one is forecast."""
        if open_time_ms <= self.newest_origin.get(pair, -1):
            self.skipped_stale += 1
            log.info("forecast_skipped", symbol=pair[0], interval=pair[1], origin=open_time_ms,
                     reason="not newer than the newest forecast origin", newest=self.newest_origin[pair])
            return
        current = self._pending.get(pair)
        if current is None or open_time_ms > current[0]:
            self._pending[pair] = (open_time_ms, time.monotonic())
            self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                pair = next(iter(self._pending))
                origin, noticed = self._pending.pop(pair)
                try:
                    await self.forecast_pair(pair, origin, noticed)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("forecast_failed", symbol=pair[0], interval=pair[1], origin=origin)

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
        symbol, interval = pair
        champion = self.champion  # read once: a swap during this forecast does not affect it
        if champion is None:
            return False
        if origin_ms <= self.newest_origin.get(pair, -1):
            return False
        config, step = self.forecast_config, interval_ms(interval)
        # twice the look-back in time, so a few missing candles still leave a full window
        start = origin_ms - 2 * config.lookback * step
        began = time.monotonic()
        candles = await self.writer.run(lambda store: store.read_candles(symbol, interval, start, origin_ms + step))
        candles = candles.tail(config.lookback)
        read_done = time.monotonic()
        if candles.height < config.lookback:
            log.info("forecast_skipped", symbol=symbol, interval=interval, reason="not enough history",
                     have=candles.height, need=config.lookback)
            return False
        await self._observe(pair, champion.version, origin_ms, candles)  # outcomes first: they precede the origin
        seed = config.seed + origin_ms // step  # reproducible per origin
        result = await asyncio.to_thread(forecast_window, champion, candles_to_frame(candles), step, config, seed)
        model_done = time.monotonic()
        issued = int(time.time() * 1000)
        if origin_ms <= self.newest_origin.get(pair, -1):
            return False  # a newer origin was forecast while this one ran
        self.newest_origin[pair] = origin_ms
        calibrated = self._calibrate(pair, origin_ms, result)
        published = calibrated if calibrated is not None and calibrated.calibrated else None
        rows = forecast_rows(result, symbol, interval, origin_ms, champion.version, issued, published)
        await self.writer.run(lambda store: insert_forecasts(store.con, rows))
        stored = time.monotonic()
        summary = self.calibrators.summary(pair) if calibrated is not None else None
        payload = forecast_payload(result, symbol, interval, origin_ms, champion.version, issued, published, summary)
        if self.publisher is not None:
            self.publisher.publish_forecast(symbol, interval, payload, origin_ms=origin_ms)
        self.published += 1
        latency = (time.monotonic() - noticed) * 1000 if noticed else None
        if latency is not None:
            self.latencies_ms.append(latency)
        for listener in self.listeners:
            listener({"payload": payload, "latency_s": None if latency is None else latency / 1000,
                      "model_s": model_done - read_done})
        if self.published % config.score_every == 0:
            self._scores_due.set()  # scored by score_loop, off the forecast path
        log.info("forecast_published", symbol=symbol, interval=interval, origin=origin_ms,
                 model_version=champion.version, latency_ms=None if latency is None else round(latency, 1),
                 read_ms=round((read_done - began) * 1000, 1), model_ms=round((model_done - read_done) * 1000, 1),
                 store_ms=round((stored - model_done) * 1000, 1),
                 p50_close_next=round(float(result.close_quantile(0.5)[0]), 2), prob_up_next=float(result.prob_up[0]),
                 calibrated=published is not None)
        return True

    async def _observe(self, pair: Pair, version: str, origin_ms: int, candles: pl.DataFrame) -> None:
        """Warm the pair's calibrator if it has none for this model version, then feed it the closed candles."""
        calibrators = self.calibrators
        if not calibrators.settings.enabled:
            return
        try:
            if calibrators.needs_warm(pair, version):
                since = calibrators.warm_since_ms(pair[1], origin_ms)
                history = await self.writer.run(
                    lambda store: calibration_history(store.con, pair[0], pair[1], version, since))
                outcomes = await asyncio.to_thread(calibrators.install, pair, version, history)
                calibrator = calibrators.get(pair)
                log.info("calibration_warmed", symbol=pair[0], interval=pair[1], model_version=version,
                         forecasts=history["origin_ms"].n_unique() if history.height else 0, outcomes=outcomes,
                         history_per_step=None if calibrator is None else calibrator.history())
            calibrators.observe(pair, candles["open_time"].to_numpy(), candles["close"].to_numpy())  # times in ms
        except Exception:
            self._calibration_failed(pair, "observe")

    def _calibrate(self, pair: Pair, origin_ms: int, result: Forecast) -> CalibratedForecast | None:
        if not self.calibrators.settings.enabled:
            return None
        try:
            raw = RawForecast.from_paths(origin_ms, result.last_close, result.close_paths, LEVELS)
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
