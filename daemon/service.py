"""`kronosd run`: one asyncio process wiring the store, live ingest, forecasting, MQTT and continual
fine-tuning. `storage` and `kronos_model` know nothing about it.

Signals: SIGHUP reloads config.yaml (an invalid file keeps the running config) and re-resolves the
`current` model; SIGTERM/SIGINT stop within 10 s: stop the trainer, stop ingest, flush the writer (and
publish the final snapshot), publish `offline`. systemd hears READY, RELOADING (+ MONOTONIC_USEC), STOPPING
and, while healthy, WATCHDOG.

Supervision (the README's policy): every subsystem runs as a named task; one that dies of an unexpected
error, or ends when it should not, is logged (`subsystem_failed`), counted and started again in-process
after a backoff (1 s doubling to 60 s, back to 1 s once it has run a minute; an IP ban waits until the
ban ends). Inside ingestion a failing pair is retried or paused alone, and a forecast that fails is
logged and skipped, so one pair never stops the others. The process exits non-zero only for what it
cannot recover from: the store cannot be written (exit 1), or the config is invalid at start (exit 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from daemon.config import KronosConfig, load_config
from daemon.continual import ContinualTrainer
from daemon.forecaster import ForecastService
from daemon.health import readiness, status_line
from daemon.http.api import forecast_from_payload
from daemon.http.events import EventHub
from daemon.http.metrics import DaemonMetrics
from daemon.http.server import HttpServer, build_app
from daemon.http.source import LiveSource
from daemon.ledger import overall_errors
from daemon.market.counters import IngestCounters
from daemon.market.live import LiveIngestor
from daemon.market.rejects import RejectLog
from daemon.market.rest import BinanceRestClient, IpBannedError
from daemon.mqtt import Publisher
from daemon.notify import Notifier
from daemon.registry import ModelRegistry
from daemon.wiring import open_writer, rest_settings, stream_settings
from kronos_model import Kronos, KronosTokenizer
from kronos_model.finetune.config import TINY_PREDICTOR, TINY_TOKENIZER
from storage.forecasts import insert_model_event
from storage.views import query_candles
from storage.writer import StoreWriter

log = structlog.get_logger("daemon.service")

RESTART_BACKOFF_S = (1.0, 60.0)  # first delay, ceiling
HEALTHY_RUN_S = 60.0  # a task that ran this long before failing starts again from the first delay
STATUS_EVERY_S = 5.0  # how often systemd's STATUS= line and the dashboards' status are refreshed
STATE_DIR_MODE = 0o750  # the service's group may read the store and the snapshot (README: systemd)


class StoreUnwritableError(RuntimeError):
    """The writer thread is gone: nothing the daemon does can be kept, so it exits for systemd to restart."""


def warn_about_exposed_secrets(config: KronosConfig, config_path: Path | None) -> bool:
    """A config file holding the MQTT password that other users can read gets a warning (it still starts)."""
    if config_path is None or not (config.mqtt.password or config.http.token):
        return False
    try:
        mode = config_path.stat().st_mode
    except OSError:
        return False
    if mode & stat.S_IROTH:
        log.warning("config_world_readable", path=str(config_path), mode=oct(stat.S_IMODE(mode)),
                    hint=f"it holds a secret (MQTT password or HTTP token); chmod 640 {config_path} (or 600)")
        return True
    return False


def bootstrap_champion(registry: ModelRegistry, config: KronosConfig) -> str:
    """The `current` version, registering the configured starting model when the registry is empty."""
    current = registry.resolve("current")
    if current is not None:
        return current
    model_cfg = config.model
    if model_cfg.predictor == "scratch":
        torch.manual_seed(config.forecast.seed)
        tokenizer, model = KronosTokenizer(**TINY_TOKENIZER), Kronos(**TINY_PREDICTOR)
    else:
        tokenizer = KronosTokenizer.from_pretrained(model_cfg.tokenizer, revision=model_cfg.revision)
        model = Kronos.from_pretrained(model_cfg.predictor, revision=model_cfg.revision)
    manifest = {"base": {"tokenizer": model_cfg.tokenizer, "predictor": model_cfg.predictor,
                         "revision": model_cfg.revision}, "origin": "bootstrap"}
    version = registry.add_pair(tokenizer, model, manifest)
    registry.promote(version)
    log.info("model_bootstrapped", model_version=version, predictor=model_cfg.predictor)
    return version


class LoopLagMonitor:
    """How late the event loop wakes a 50 ms ticker: the cost of anything that blocks it."""

    def __init__(self, period_s: float = 0.05, keep: int = 100_000):
        self.period_s = period_s
        self.samples: deque[tuple[float, float]] = deque(maxlen=keep)  # (monotonic time, lag in ms)
        self.listeners: list[Callable[[float], None]] = []  # each sample in ms (metrics)

    async def run(self) -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(self.period_s)
            now = time.monotonic()
            lag = max(0.0, (now - start - self.period_s) * 1000)
            self.samples.append((now, lag))
            for listener in self.listeners:
                listener(lag)

    def since(self, moment: float) -> list[float]:
        return [lag for at, lag in self.samples if at >= moment]

    def percentile(self, q: float, since: float = 0.0) -> float | None:
        lags = self.since(since)
        return float(np.percentile(lags, q)) if lags else None


class Daemon:
    def __init__(self, config: KronosConfig, config_path: Path | None = None, notifier: Notifier | None = None):
        self.config, self.config_path = config, config_path
        self.notifier = notifier or Notifier()
        self.state_dir = Path(config.storage.state_dir)
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}
        self._factories: dict[str, Callable[[], Coroutine[Any, Any, Any]]] = {}
        self._started_at: dict[str, float] = {}
        self._failures: Counter[str] = Counter()
        self.restarts: Counter[str] = Counter()
        self.rejects = RejectLog()
        self.lag = LoopLagMonitor()
        self.started_candles = 0
        self.reloads = 0
        self.ingest_counters = IngestCounters()  # outlives each ingestor, so /metrics only ever grows
        self.hub = EventHub()
        self.metrics = DaemonMetrics(self)
        self.lag.listeners.append(self.metrics.on_loop_lag)
        self.http: HttpServer | None = None
        self._status_text = ""
        self._background: set[asyncio.Task] = set()

    # -- building blocks -------------------------------------------------------------------------

    def _writer(self) -> StoreWriter:
        return open_writer(self.config)

    def _on_stored(self, pair: tuple[str, str], newest_open_time: int) -> None:
        self.forecaster.on_candle(pair, newest_open_time, self.ingestor.close_seen.get(pair))
        self.continual.on_candle(pair, newest_open_time)
        if self.hub.clients:
            task = asyncio.get_running_loop().create_task(self._push_candles(pair))
            self._background.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._background.discard)

    async def _push_candles(self, pair: tuple[str, str]) -> None:
        """The newest candles of a pair to the open dashboards (read once, whatever their number)."""
        try:
            candles = await self.writer.run(lambda store: query_candles(store.con, *pair, 3))
        except Exception as exc:  # a dashboard update is never worth more than a log line
            log.warning("dashboard_push_failed", error=str(exc))
            return
        self.hub.publish("candles", {"symbol": pair[0], "interval": pair[1], "candles": candles})

    def _on_forecast(self, record: dict[str, Any]) -> None:
        self.metrics.on_forecast(record)
        payload = record["payload"]
        self.hub.publish("forecast", {"symbol": payload["symbol"], "interval": payload["interval"],
                                      "forecast": forecast_from_payload(payload)})

    def _start_http(self) -> None:
        config = self.config.http
        if not config.enabled:
            self.http = None
            return
        app = build_app(LiveSource(self), self.hub, token=config.token, metrics=self.metrics.render,
                        readiness=lambda: readiness(self))
        self.http = HttpServer(app, config.host, config.port)
        self._start("http", self.http.run)

    async def _stop_http(self) -> None:
        task = self._tasks.pop("http", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _status(self) -> None:
        """systemd's STATUS= (what `systemctl status` shows) and the dashboards' status, kept current."""
        while True:
            text = status_line(self)
            if text != self._status_text:
                self._status_text = text
                self.notifier.status(text)
            if self.hub.clients:
                self.hub.publish("status", LiveSource(self).status())
            await asyncio.sleep(STATUS_EVERY_S)

    def _start(self, name: str, factory: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run `factory()` as the supervised task `name` (see the module docstring for the policy)."""
        self._factories[name] = factory
        self._started_at[name] = time.monotonic()
        task = asyncio.create_task(factory(), name=name)
        task.add_done_callback(self._task_done)
        self._tasks[name] = task

    def _task_done(self, task: asyncio.Task) -> None:
        name = task.get_name()
        if task.cancelled() or self._stop.is_set() or self._tasks.get(name) is not task:
            return
        error = task.exception()
        if not self.writer.alive or isinstance(error, StoreUnwritableError):
            # Nothing can be stored: a zombie daemon that still pings the watchdog would be worse than none.
            log.error("store_unwritable", task=name, error=repr(error))
            self.exit_code = 1
            self._stop.set()
            return
        if time.monotonic() - self._started_at.get(name, 0.0) >= HEALTHY_RUN_S:
            self._failures[name] = 0
        self._failures[name] += 1
        self.restarts[name] += 1
        first, ceiling = RESTART_BACKOFF_S
        delay = min(ceiling, first * 2 ** (self._failures[name] - 1))
        if isinstance(error, IpBannedError):
            delay = max(delay, error.until_s - time.time())
        log.error("subsystem_failed", task=name, error=repr(error) if error else "ended unexpectedly",
                  restart_in_s=round(delay, 1), restarts=self.restarts[name])
        asyncio.get_running_loop().call_later(delay, self._restart, name, task)

    def _restart(self, name: str, failed: asyncio.Task) -> None:
        if self._stop.is_set() or self._tasks.get(name) is not failed:
            return  # stopping, or replaced meanwhile (a reload restarted it)
        log.info("subsystem_restarted", task=name, restarts=self.restarts[name])
        self._start(name, self._factories[name])

    async def _start_ingest(self) -> None:
        pairs = self.config.markets.pairs
        for symbol, interval in pairs:
            await self.rest.validate(symbol, interval)  # unknown symbol/interval: a clear error, nothing fetched
        await self.rest.sync_time()
        self._start("ingest", self._ingest)
        log.info("ingest_started", pairs=[f"{s}/{i}" for s, i in pairs])

    async def _ingest(self) -> None:
        """One life of live ingestion; a fresh ingestor each time the supervisor starts it again."""
        if not self.writer.alive:
            raise StoreUnwritableError("the store writer has stopped")
        history_ms = int(self.config.markets.history_days * 86_400_000)
        self.ingestor = LiveIngestor(self.writer, self.rest, self.config.markets.pairs, stream_settings(self.config),
                                     initial_start_ms=lambda: self.rest.server_now_ms() - history_ms,
                                     on_stored=self._on_stored, rejects=self.rejects, counters=self.ingest_counters,
                                     listing_check_s=self.config.exchange.listing_check_s)
        await self.ingestor.run()

    async def _stop_ingest(self) -> None:
        task = self._tasks.pop("ingest", None)
        if task is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ingestor.stop(), timeout=3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    def _start_publisher(self) -> None:
        self.publisher = Publisher(self.config.mqtt) if self.config.mqtt.enabled else None
        if self.publisher is not None:
            self._start("mqtt", self.publisher.run)

    async def _stop_publisher(self) -> None:
        task = self._tasks.pop("mqtt", None)
        if self.publisher is None or task is None:
            return
        self.publisher.stop()
        try:
            await asyncio.wait_for(task, timeout=3)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()

    async def _load_champion(self, version: str) -> None:
        tokenizer, model = await asyncio.to_thread(self.registry.load, version)
        self.forecaster.set_champion(version, tokenizer, model)
        structlog.contextvars.bind_contextvars(model_version=version)
        log.info("champion_loaded", model_version=version)

    # -- lifecycle -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask a running daemon to stop (what SIGTERM does)."""
        self._stop.set()

    async def run(self) -> dict[str, Any]:
        self.exit_code = 0
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        warn_about_exposed_secrets(self.config, self.config_path)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):  # not ours to change (e.g. a shared directory)
            os.chmod(self.state_dir, STATE_DIR_MODE)
        self.writer = await asyncio.to_thread(self._writer().start)
        self.writer.on_snapshot = self.metrics.on_snapshot
        try:
            self.started_candles = await self.writer.run(
                lambda store: store.count_candles())
            self.registry = ModelRegistry(self.state_dir / "models", self.config.model.keep_versions)
            self._start_publisher()
            self.forecaster = ForecastService(self.writer, self.config.forecast, self.config.model, self.publisher)
            self.forecaster.listeners.append(self._on_forecast)
            self.forecaster.score_listeners.append(lambda scores: self.hub.publish("ledger", {"scores": len(scores)}))
            version = await asyncio.to_thread(bootstrap_champion, self.registry, self.config)
            await self._load_champion(version)
            await self.forecaster.load_newest_origins()
        except BaseException:
            # e.g. the starting model cannot be loaded: close the store cleanly, say nothing is running
            await self._stop_publisher()
            await asyncio.to_thread(self.writer.close)
            raise
        self.continual = ContinualTrainer(self.writer, self.config, self.registry, self.forecaster,
                                          self.publisher, self.state_dir)
        self.continual.lag_monitor = self.lag
        self.continual.listeners.append(lambda event: self.hub.publish("model", event))
        self._start("loop_lag", self.lag.run)
        # Before ingest starts: /healthz and /readyz (503 until the streams are live) answer during the backfill.
        self._start_http()
        self._start("status", self._status)
        self._start("forecast", self.forecaster.run)
        self._start("ledger", self.forecaster.score_loop)
        self._start("continual", self.continual.run)
        self._start("store_watch", self._watch_store)
        try:
            settings = rest_settings(self.config, self.config.storage.snapshot_path)
            async with BinanceRestClient(settings, rejects=self.rejects) as self.rest:
                await self._start_ingest()
                self.notifier.ready(f"forecasting {len(self.config.markets.pairs)} pairs with {version}")
                if self.notifier.watchdog_interval_s:
                    self._start("watchdog", self._watchdog)
                log.info("daemon_ready", model_version=version, state_dir=str(self.state_dir))
                while not self._stop.is_set():
                    waiters = [asyncio.create_task(self._stop.wait()), asyncio.create_task(self._reload.wait())]
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    for waiter in waiters:
                        waiter.cancel()
                    if self._reload.is_set() and not self._stop.is_set():
                        self._reload.clear()
                        await self.reload()
                return await self._shutdown()
        except BaseException:
            if not self._stop.is_set():
                self._stop.set()
                with contextlib.suppress(Exception):
                    await self._shutdown()
            raise

    async def _watch_store(self) -> None:
        """The writer thread dying (disk gone, database broken) is the one failure nothing here can heal."""
        while self.writer.alive:
            await asyncio.sleep(1.0)
        raise StoreUnwritableError("the store writer has stopped")

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s or 10
        while True:
            # The loop turns and the store takes writes; failed subsystems are the supervisor's business
            # (a restart after an IP ban can wait longer than WatchdogSec).
            if self.writer.alive:
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def reload(self) -> None:
        """SIGHUP: apply a valid new config (pairs, schedule, gate, forecast, MQTT), re-resolve `current`."""
        self.notifier.reloading()
        self.reloads += 1
        try:
            new = load_config(self.config_path)
        except (ValueError, FileNotFoundError) as exc:
            log.error("reload_rejected", reason=str(exc), path=str(self.config_path))
            self.notifier.ready("reload rejected: kept the running config")
            return
        old, self.config = self.config, new
        self.forecaster.forecast_config = new.forecast
        if new.forecast.worker != old.forecast.worker:
            self.forecaster.use_worker(new.forecast.worker)
        self.continual.config = new
        if new.http != old.http:
            await self._stop_http()
            self._start_http()
        if new.mqtt != old.mqtt:
            await self._stop_publisher()
            self._start_publisher()
            self.forecaster.publisher = self.continual.publisher = self.publisher
        if new.markets.pairs != old.markets.pairs or new.exchange != old.exchange:
            await self._stop_ingest()
            try:
                await self._start_ingest()
            except (ValueError, OSError, RuntimeError) as exc:
                log.error("reload_rejected", reason=f"new pairs not usable: {exc}")
                self.config = old
                self.forecaster.forecast_config, self.continual.config = old.forecast, old
                await self._start_ingest()
        current = self.registry.resolve("current")
        if current and (self.forecaster.champion is None or current != self.forecaster.champion.version):
            await self._swap_to(current, reason="current changed on disk")
        log.info("reloaded", pairs=[f"{s}/{i}" for s, i in self.config.markets.pairs])
        self.notifier.ready(f"reloaded; forecasting {len(self.config.markets.pairs)} pairs")

    async def _swap_to(self, version: str, reason: str) -> None:
        try:
            tokenizer, model = await asyncio.to_thread(self.registry.load, version)  # hashes verified
            self.forecaster.set_champion(version, tokenizer, model)
            await self.writer.run(lambda store: insert_model_event(store.con, "swapped", version, None, None,
                                                                   {"reason": reason}))
            log.info("champion_swapped", model_version=version, reason=reason)
        except Exception as exc:
            log.error("champion_swap_failed", model_version=version, error=str(exc))

    async def _shutdown(self) -> dict[str, Any]:
        self.notifier.stopping()
        log.info("daemon_stopping")
        await self.continual.stop_training()
        await self._stop_ingest()
        for name in ("continual", "forecast", "ledger", "watchdog", "store_watch", "status"):
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.forecaster.close()
        summary = await self.summary()
        await self._stop_http()  # before the writer closes: the live API reads through it
        await asyncio.to_thread(self.writer.close)  # flush, final snapshot, checkpoint
        await self._stop_publisher()
        for task in self._tasks.values():
            task.cancel()
        log.info("daemon_stopped", **summary)
        return summary

    async def summary(self) -> dict[str, Any]:
        total = await self.writer.run(lambda store: store.count_candles())
        errors = await self.writer.run(lambda store: overall_errors(store.con))
        lat, since_close = self.forecaster.latencies_ms, self.forecaster.since_close_ms
        ingestor = getattr(self, "ingestor", None)
        return {
            "candles_ingested": int(total - self.started_candles),
            "gaps_backfilled": ingestor.resyncs if ingestor else 0,
            "forecasts_published": self.forecaster.published,
            "finetune_runs": self.continual.runs,
            "promotions": self.continual.promotions,
            "rejections": self.continual.rejections,
            "model_version": self.forecaster.champion.version if self.forecaster.champion else None,
            "forecast_mae": errors["mae"], "random_walk_mae": errors["mae_random_walk"],
            "direction_accuracy": errors["direction_accuracy"], "scored_steps": errors["scored_steps"],
            # as subscribers got them (calibrated where published calibrated) and raw
            **{key: errors[key] for key in ("coverage_80", "coverage_80_raw", "brier_prob_up", "brier_prob_up_raw",
                                            "calibrated_share")},
            "forecast_latency_ms_p50": float(np.percentile(lat, 50)) if lat else None,
            "forecast_latency_ms_p99": float(np.percentile(lat, 99)) if lat else None,
            "forecast_since_close_ms_p50": float(np.percentile(since_close, 50)) if since_close else None,
            "forecast_batches": self.forecaster.batches,
            "loop_lag_ms_p99": self.lag.percentile(99),
            "mqtt_published": self.publisher.published if self.publisher else 0,
            "rejected_inputs": self.rejects.summary(),
            "subsystem_restarts": dict(self.restarts),
            "stale_candles_skipped": self.forecaster.skipped_stale,
        }
