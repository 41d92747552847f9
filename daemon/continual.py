"""Continual fine-tuning: export the rolling window, train in a subprocess, gate, promote or reject.

- Trigger: every `finetune.every_candles` new closed candles of the training pairs and/or every
  `finetune.every_hours`; never two runs at once.
- The newest `holdout_candles` of each pair are kept out of the exported training data: the gate scores
  challenger and champion on them, with the same inputs and sampling seeds.
- The trainer runs as `python -m kronos_model.finetune` (never a fork of this process, which holds torch
  and DuckDB), niced, with its own log file, starting from the champion's weights; it gets a Parquet
  export, not a handle on the store.
- Promotion only when the challenger is finite and its `gate.metric` beats the champion's by the margin
  (by default the CRPS of what would be published: the calibrated quantile grid, see
  kronos_model.finetune.gate; or the raw sample paths' CRPS, or the median's MAE). Every training pair is
  gated on its own held-out candles and the per-origin losses are pooled. The
  pair is copied into the registry, loaded back with its hashes verified, given a smoke forecast, and only
  then swapped in, with each pair's calibrator warmed from the challenger's held-out forecasts of that pair
  (so a promotion does not restart calibration from nothing). The
  pair is copied into the registry, loaded back with its hashes verified, given a smoke forecast, and only
  then swapped in. Every decision lands in `model_events`, the log, and MQTT events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import structlog
import yaml

from daemon.config import KronosConfig
from daemon.forecaster import ForecastService
from daemon.model_worker import Champion, build_predictor, forecast_window
from daemon.mqtt import Publisher
from daemon.registry import ModelRegistry
from kronos_model.checkpoint import load_pair
from kronos_model.data import candles_to_frame
from kronos_model.finetune.gate import GateResult, evaluate_pair, pool
from kronos_model.hub import CheckpointError
from storage.forecasts import insert_model_event
from storage.intervals import interval_ms
from storage.writer import StoreWriter

log = structlog.get_logger("daemon.continual")
Pair = tuple[str, str]


class ContinualTrainer:
    def __init__(self, writer: StoreWriter, config: KronosConfig, registry: ModelRegistry,
                 forecaster: ForecastService, publisher: Publisher | None, state_dir: Path):
        self.writer, self.config, self.registry = writer, config, registry
        self.forecaster, self.publisher = forecaster, publisher
        self.runs_dir = Path(state_dir) / "finetune"
        self.new_candles = 0
        self.last_run_started = time.monotonic()
        self.process: asyncio.subprocess.Process | None = None
        self.running = False
        self.runs = self.promotions = self.rejections = 0
        self._seen: dict[Pair, int] = {}
        self._wake = asyncio.Event()
        self.lag_monitor = None  # the service's LoopLagMonitor, when it has one
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # every model event (dashboard)

    # -- triggering ------------------------------------------------------------------------------

    def pairs(self) -> list[Pair]:
        chosen = self.config.finetune.pairs
        if not chosen:
            return self.config.markets.pairs
        return [(p.split("/")[0].upper(), p.split("/")[1]) for p in chosen]

    def on_candle(self, pair: Pair, open_time_ms: int) -> None:
        if pair not in self.pairs():
            return
        previous = self._seen.get(pair)
        if previous is not None and open_time_ms > previous:
            self.new_candles += (open_time_ms - previous) // interval_ms(pair[1])
        self._seen[pair] = max(previous or open_time_ms, open_time_ms)
        self._wake.set()

    def due(self) -> bool:
        schedule = self.config.finetune
        if not schedule.enabled or self.running:
            return False
        by_candles = schedule.every_candles is not None and self.new_candles >= schedule.every_candles
        by_time = schedule.every_hours is not None and \
            time.monotonic() - self.last_run_started >= schedule.every_hours * 3600
        return by_candles or by_time

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=60)
            self._wake.clear()
            if self.due():
                await self.run_once()

    # -- one fine-tune ---------------------------------------------------------------------------

    async def _event(self, kind: str, version: str | None = None, run_id: str | None = None, **details: Any) -> None:
        champion = self.forecaster.champion.version if self.forecaster.champion else None
        await self.writer.run(lambda store: insert_model_event(store.con, kind, version, champion, run_id, details))
        if self.publisher is not None:
            self.publisher.publish_event(kind, model_version=version, champion_version=champion, run_id=run_id,
                                         **details)
        log.info(kind, model_version=version, champion_version=champion, run_id=run_id, **details)
        for listener in self.listeners:
            listener({"kind": kind, "model_version": version, "champion_version": champion, "run_id": run_id})

    async def _export(self, run_dir: Path) -> tuple[Path, dict[Pair, pl.DataFrame]]:
        """The training Parquet file, and each pair's held-out frame for the gate."""
        schedule, forecast = self.config.finetune, self.config.forecast
        train_parts, gate_frames = [], {}
        for symbol, interval in self.pairs():
            step = interval_ms(interval)
            last = await self.writer.run(lambda store, s=symbol, i=interval: store.last_open_time(s, i))
            if last is None:
                continue
            span = schedule.window_candles + schedule.holdout_candles
            begin, end = last - span * step, last + step
            candles = await self.writer.run(
                lambda store, s=symbol, i=interval, a=begin, b=end: store.read_candles(s, i, a, b))
            cut = last - schedule.holdout_candles * step  # candles after `cut` are held out
            train_parts.append(candles_to_frame(candles.filter(pl.col("open_time") <= cut)))
            gate_from = cut - forecast.lookback * step  # the held-out targets need a look-back before them
            gate_frames[(symbol, interval)] = candles_to_frame(candles.filter(pl.col("open_time") > gate_from))
        if not train_parts:
            raise ValueError("no stored candles for the training pairs yet")
        data_path = run_dir / "data.parquet"
        pl.concat(train_parts).write_parquet(data_path)
        return data_path, gate_frames

    def _trainer_config(self, run_dir: Path, data_path: Path, champion_dir: Path) -> Path:
        forecast, model = self.config.forecast, self.config.model
        values: dict[str, Any] = {
            "data_path": str(data_path), "output_dir": str(run_dir / "out"),
            "base_model": str(champion_dir / "model"), "tokenizer_id": str(champion_dir / "tokenizer"),
            "lookback_window": forecast.lookback, "predict_window": forecast.horizon,
            "device": model.device, "progress": False, "resume": False,
        }
        values.update(self.config.finetune.overrides)
        path = run_dir / "finetune.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return path

    async def run_once(self) -> str:
        """One fine-tune → gate → promotion or rejection. Returns the outcome."""
        self.running, self.new_candles = True, 0
        self.last_run_started = time.monotonic()
        run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        run_dir = self.runs_dir / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        self.runs += 1
        structlog.contextvars.bind_contextvars(run_id=run_id)
        started = time.monotonic()
        try:
            champion_version = self.registry.resolve("current")
            if champion_version is None:
                raise RuntimeError("no champion model to fine-tune")
            data_path, gate_frames = await self._export(run_dir)
            config_path = self._trainer_config(run_dir, data_path, self.registry.path(champion_version))
            await self._event("finetune_started", run_id=run_id, rows=pl.scan_parquet(data_path).select(
                pl.len()).collect().item())
            code = await self._train(config_path, run_dir / "train.log")
            if code != 0:
                self.rejections += 1
                tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-3:]
                await self._event("rejected", run_id=run_id, reason=f"fine-tune exited with {code}", log_tail=tail)
                return "rejected"
            return await self._gate(run_id, run_dir / "out" / "best", gate_frames)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed run must never take the service down
            self.rejections += 1
            log.exception("finetune_failed")
            await self._event("rejected", run_id=run_id, reason=f"{type(exc).__name__}: {exc}")
            return "rejected"
        finally:
            self.running = False
            lags = np.asarray(self.lag_monitor.since(started) if self.lag_monitor is not None else [])
            if lags.size:
                # what the fine-tune cost the event loop (ingest, forecasts and MQTT all run on it)
                log.info("finetune_loop_lag", run_id=run_id, samples=len(lags),
                         p50_ms=round(float(np.percentile(lags, 50)), 2),
                         p99_ms=round(float(np.percentile(lags, 99)), 2))
            structlog.contextvars.unbind_contextvars("run_id")

    async def _train(self, config_path: Path, log_path: Path) -> int:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) - 1)), "PYTHONUNBUFFERED": "1"}
        with log_path.open("ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kronos_model.finetune", "--config", str(config_path),
                stdout=log_file, stderr=log_file, env=env, start_new_session=True)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, self.process.pid, self.config.finetune.nice)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout=self.config.finetune.timeout_minutes * 60)
        except TimeoutError:
            await self.stop_training()
            return -1
        finally:
            self.process = None

    async def stop_training(self, grace_s: float = 7.0) -> None:
        """SIGTERM the trainer (it saves last/ at the next step and exits), then SIGKILL after the grace."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def _gate(self, run_id: str, candidate: Path, gate_frames: dict[Pair, pl.DataFrame]) -> str:
        gate, forecast = self.config.gate, self.config.forecast
        champion_version = self.registry.resolve("current")
        try:
            challenger_pair = await asyncio.to_thread(load_pair, candidate, True)
        except (CheckpointError, OSError) as exc:
            self.rejections += 1
            await self._event("rejected", run_id=run_id, reason=f"challenger checkpoint unusable: {exc}")
            return "rejected"
        champion_pair = await asyncio.to_thread(self.registry.load, champion_version)
        calibrate = forecast.calibration.enabled
        metric = gate.metric if calibrate or gate.metric != "crps_calibrated" else "crps"

        def measure(pair) -> dict[Pair, GateResult]:
            return {key: evaluate_pair(*pair, frame, forecast.lookback, forecast.horizon, origins=gate.origins,
                                       sample_count=gate.sample_paths, seed=gate.seed,
                                       max_context=self.config.model.max_context,
                                       device=None if self.config.model.device == "auto" else self.config.model.device,
                                       calibration=self.forecaster.calibrators.config(key[1]) if calibrate else None,
                                       anchor=forecast.anchor)
                    for key, frame in gate_frames.items()}

        challenger_pairs = await asyncio.to_thread(measure, challenger_pair)
        champion_pairs = await asyncio.to_thread(measure, champion_pair)
        challenger, champion = pool(list(challenger_pairs.values())), pool(list(champion_pairs.values()))
        comparison = challenger.compare_with(champion, metric=metric)  # same frames, origins and seeds
        scores = {"challenger": challenger.to_dict(), "champion": champion.to_dict(),
                  "comparison": comparison.to_dict(), "margin": gate.margin}
        better = challenger.finite and comparison.passes(gate.margin, gate.alpha, gate.require_significance)
        if not better:
            self.rejections += 1
            reason = ("non-finite scores" if not challenger.finite else
                      f"{metric} not lower than the champion's by the margin"
                      + (f" with DM p < {gate.alpha}" if gate.require_significance else ""))
            await self._event("rejected", run_id=run_id, reason=reason, **scores)
            return "rejected"
        version = await asyncio.to_thread(self.registry.add, candidate)
        tokenizer, model = await asyncio.to_thread(self.registry.load, version)  # hashes verified again
        if not await self._smoke(version, tokenizer, model, next(iter(gate_frames.values()))):
            self.rejections += 1
            await self._event("rejected", version, run_id, reason="smoke forecast failed", **scores)
            return "rejected"
        self.registry.promote(version)
        warm = {key: result.held_out for key, result in challenger_pairs.items() if result.held_out}
        self.forecaster.set_champion(version, tokenizer, model, warm=warm)
        self.promotions += 1
        await self._event("promoted", version, run_id, previous=champion_version, **scores)
        return "promoted"

    async def _smoke(self, version: str, tokenizer, model, frame: pl.DataFrame) -> bool:
        forecast = self.config.forecast
        window = frame.tail(forecast.lookback)
        step = int(np.diff(window["timestamps"].dt.epoch("ms").to_numpy()[-2:])[0])
        champion = Champion(version, build_predictor(tokenizer, model, self.config.model))
        try:
            result = await asyncio.to_thread(forecast_window, champion, window, step, forecast, 0)
        except Exception:
            log.exception("smoke_forecast_failed", model_version=version)
            return False
        return bool(np.isfinite(result.paths).all())
