"""Where the champion's generations run: a child process (`forecast.worker: process`, the default) or a worker
thread of the daemon (`thread`).

Why a process: a forecast is thousands of small torch ops, and between two of them the worker thread must take
the GIL back from the event loop (calibration, payloads, MQTT, logs) and the store writer (look-backs, inserts,
snapshots). Measured with 64 pairs closing together (tiny model, 2 cores): a 16-pair batch took 0.7-0.9 s in the
daemon's thread, its thread waiting ~45 % of that time, against 0.31 s alone. In its own process the model
runs back to back on one core while the daemon does the rest on the other.

The child is spawned (never forked: the daemon runs threads) on first use and holds the predictors of the
newest KEEP_VERSIONS champions, sent to it pickled once per version, so a hot-swap mid-batch finishes the batch
on the model it started with. It ignores SIGINT (a Ctrl-C stops the daemon, which then stops it) and exits
with the daemon, also when the daemon is killed with -9 (it checks its parent every second). A child that
dies (killed, out of memory) fails the batch it was running, which is logged; the next batch starts a new
child. Results are identical in either mode: same code, same seeds, same threads.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Literal

import polars as pl
import structlog
import torch

from daemon.config import ForecastConfig, ModelConfig
from kronos_model import Forecast, Kronos, KronosPredictor, KronosTokenizer
from kronos_model.data import FEATURES

log = structlog.get_logger("daemon.model_worker")

KEEP_VERSIONS = 2  # the champion and the one before it: a batch started before a swap finishes on its model
PARENT_CHECK_S = 1.0  # how often the child checks that the daemon still runs
Window = tuple[pl.DataFrame, int, int]  # (Kronos frame of a look-back, step ms, seed)


@dataclass(frozen=True)
class Champion:
    version: str
    predictor: KronosPredictor


def build_predictor(tokenizer: KronosTokenizer, model: Kronos, config: ModelConfig) -> KronosPredictor:
    device = None if config.device == "auto" else config.device
    dtype = getattr(torch, config.dtype)
    return KronosPredictor(model.to(dtype), tokenizer.to(dtype), device=device, max_context=config.max_context)


def forecast_windows(champion: Champion, windows: list[Window],
                     config: ForecastConfig) -> list[Forecast]:
    """Forecast the `config.horizon` candles after each (frame, step_ms, seed) in one batched generation; each
    frame is a Kronos frame of a look-back, oldest first. Each result equals forecasting its window alone."""
    futures = []
    for frame, step_ms, _ in windows:
        last = int(frame["timestamps"].dt.epoch("ms")[-1])
        futures.append(pl.from_epoch(pl.Series([last + step_ms * k for k in range(1, config.horizon + 1)]),
                                     time_unit="ms"))
    return champion.predictor.forecast_batch(
        [frame.select(FEATURES) for frame, _, _ in windows], [frame["timestamps"] for frame, _, _ in windows],
        futures, config.horizon, T=config.temperature, top_k=config.top_k, top_p=config.top_p,
        sample_count=config.sample_paths, seed=[seed for _, _, seed in windows], quantiles=config.quantiles,
        anchor=config.anchor)


def forecast_window(champion: Champion, frame: pl.DataFrame, step_ms: int, config: ForecastConfig,
                    seed: int) -> Forecast:
    """Forecast the `config.horizon` candles after `frame` (a Kronos frame of the look-back, oldest first)."""
    return forecast_windows(champion, [(frame, step_ms, seed)], config)[0]


def forecast_each(champion: Champion, windows: list[Window],
                  config: ForecastConfig) -> list[Forecast | Exception]:
    """`forecast_windows`, and when the batch fails, each window alone (same results), so a window that
    cannot be forecast fails alone: its place holds the error."""
    try:
        return list(forecast_windows(champion, windows, config))
    except Exception as exc:
        if len(windows) == 1:
            return [exc]
        log.warning("forecast_batch_failed", series=len(windows), error=repr(exc), retry="one by one")
    results: list[Forecast | Exception] = []
    for window in windows:
        try:
            results.append(forecast_windows(champion, [window], config)[0])
        except Exception as exc:
            results.append(exc)
    return results




# -- the child process -------------------------------------------------------------------------------------------

_PREDICTORS: dict[str, KronosPredictor] = {}  # in the child: version -> predictor, oldest first


def _start_child(threads: int, json_logs: bool) -> None:
    from daemon.logs import configure_service_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_service_logging("warning", json_lines=json_logs)
    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="parent-watch").start()


def _exit_with_parent(parent: int) -> None:
    """A daemon killed with -9 cannot stop its worker: the worker notices it was orphaned and exits."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _install(version: str, predictor: KronosPredictor) -> None:
    _PREDICTORS[version] = predictor
    while len(_PREDICTORS) > KEEP_VERSIONS:
        _PREDICTORS.pop(next(iter(_PREDICTORS)))


def _forecast(version: str, windows: list[Window], config: ForecastConfig) -> list[Forecast | Exception]:
    return forecast_each(Champion(version, _PREDICTORS[version]), windows, config)


class ModelWorker:
    """Runs `forecast_each` for the forecaster, in a child process or a thread (see the module docstring)."""

    def __init__(self, mode: Literal["process", "thread"], threads: int):
        self.mode, self.threads = mode, threads
        self._pool: ProcessPoolExecutor | None = None
        self._installed: list[str] = []  # what the child holds, oldest first (mirrors _install)
        self.child_failures = 0

    async def forecast(self, champion: Champion, windows: list[Window],
                       config: ForecastConfig) -> list[Forecast | Exception]:
        """Each window's forecast, or the error it failed with (a dead child fails the whole batch)."""
        if self.mode == "thread":
            return await asyncio.to_thread(forecast_each, champion, windows, config)
        loop = asyncio.get_running_loop()
        pool = self._child()
        try:
            if champion.version not in self._installed:
                await loop.run_in_executor(pool, _install, champion.version, champion.predictor)
                self._installed = [*self._installed, champion.version][-KEEP_VERSIONS:]
            return await loop.run_in_executor(pool, _forecast, champion.version, windows, config)
        except BrokenProcessPool as exc:
            self.child_failures += 1
            self.close()
            log.error("model_worker_died", failures=self.child_failures, error=repr(exc),
                      effect=f"{len(windows)} forecasts lost; the next batch starts a new worker")
            return [RuntimeError(f"the forecast worker process died: {exc}")] * len(windows)

    def _child(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_child,
                                             initargs=(self.threads, not sys.stdout.isatty()))
            self._installed = []
        return self._pool

    def close(self) -> None:
        """Stop the child (a batch it is running is abandoned)."""
        pool, self._pool, self._installed = self._pool, None, []
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
