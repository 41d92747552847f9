"""`/metrics`: the daemon's state in the Prometheus text format, through prometheus_client.

Two kinds of numbers: what happens at a moment (a forecast's latency, an inference, a loop-lag sample, a
snapshot publish) is observed into Histograms as it happens, through listeners the service registers; what
the daemon already counts (candles, reconnects, REST answers, fine-tune outcomes, MQTT state, ledger scores)
is read at scrape time by a collector, so nothing is counted twice and nothing drifts. Each daemon has its own
registry (never the process-global one), so two daemons in one process, as in tests, do not collide.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

from daemon.health import pair_health

if TYPE_CHECKING:
    from daemon.service import Daemon

# `_created` timestamps double the series count and say nothing a restart counter would not.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = openmetrics.CONTENT_TYPE_LATEST
PAIR = ("symbol", "interval")
# Seconds; forecasts of the tiny demo model take ~0.1 s, Kronos-small on a CPU about 1 s.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class DaemonMetrics:
    def __init__(self, daemon: Daemon):
        self.registry = CollectorRegistry(auto_describe=False)
        self.forecast_latency = Histogram(
            "kronosd_forecast_latency_seconds",
            "closing candle received (kline message, or REST answer) -> forecast stored and handed to MQTT",
            PAIR, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.since_close = Histogram(
            "kronosd_forecast_since_close_seconds", "candle close (exchange time) -> forecast handed to MQTT, "
            "while the exchange clock agrees with ours", PAIR, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inference = Histogram("kronosd_model_inference_seconds", "sampling the forecast paths (model only)",
                                   PAIR, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.loop_lag = Histogram("kronosd_event_loop_lag_seconds", "how late the event loop wakes a 50 ms ticker",
                                  buckets=LAG_BUCKETS, registry=self.registry)
        self.snapshot_publish = Histogram("kronosd_snapshot_publish_seconds",
                                          "copying the live store to the published snapshot",
                                          buckets=LATENCY_BUCKETS, registry=self.registry)
        self.forecasts = Counter("kronosd_forecasts_published", "forecasts stored and published", PAIR,
                                 registry=self.registry)
        self.registry.register(StateCollector(daemon))

    def on_forecast(self, record: dict[str, Any]) -> None:
        payload = record["payload"]
        labels = (payload["symbol"], payload["interval"])
        self.forecasts.labels(*labels).inc()
        self.inference.labels(*labels).observe(record["model_s"])
        if record["latency_s"] is not None:
            self.forecast_latency.labels(*labels).observe(record["latency_s"])
        if record.get("since_close_s") is not None:
            self.since_close.labels(*labels).observe(record["since_close_s"])

    def on_loop_lag(self, lag_ms: float) -> None:
        self.loop_lag.observe(lag_ms / 1000)

    def on_snapshot(self, seconds: float) -> None:
        self.snapshot_publish.observe(seconds)  # called in the writer thread; prometheus_client locks

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The body and its content type: OpenMetrics when the scraper asks for it (Prometheus does; it keeps
        the info and counter types), the classic text format otherwise."""
        if "application/openmetrics-text" in accept:
            return openmetrics.generate_latest(self.registry), OPENMETRICS_TYPE
        return generate_latest(self.registry), CONTENT_TYPE


class StateCollector(Collector):
    """Reads the daemon's own counters at scrape time (in the event loop, where they change)."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        yield from self._ingest()
        yield from self._rest()
        yield from self._model()
        yield from self._mqtt()
        yield from self._ledger()

    def _ingest(self) -> Iterator[Metric]:
        daemon = self.daemon
        counters = daemon.ingest_counters
        stored = CounterMetricFamily("kronosd_candles_stored", "closed candles written to the store (websocket and "
                                     "REST backfill)", labels=PAIR)
        gaps = CounterMetricFamily("kronosd_gaps_backfilled", "REST backfills after a (re)connect or a gap",
                                   labels=PAIR)
        age = GaugeMetricFamily("kronosd_candle_age_seconds", "exchange seconds since the newest stored closed "
                                "candle closed", labels=PAIR)
        connected = GaugeMetricFamily("kronosd_stream_connected", "1 while the pair's websocket is open",
                                      labels=PAIR)
        for health in pair_health(daemon):
            pair = (health.symbol, health.interval)
            stored.add_metric(list(pair), counters.candles[pair])
            gaps.add_metric(list(pair), counters.resyncs[pair])
            if health.age_s is not None:
                age.add_metric(list(pair), health.age_s)
            connected.add_metric(list(pair), 1.0 if health.connected else 0.0)
        reconnects = CounterMetricFamily("kronosd_ws_reconnects", "websocket reconnects by what ended the "
                                         "connection", labels=["reason"])
        for reason, count in sorted(counters.reconnects.items()):
            reconnects.add_metric([reason], count)
        rejected = CounterMetricFamily("kronosd_input_rejections", "exchange input refused by the parsers",
                                       labels=["boundary", "reason"])
        for (boundary, reason), count in sorted(daemon.rejects.counts.items()):
            rejected.add_metric([boundary, reason], count)
        restarts = CounterMetricFamily("kronosd_subsystem_restarts", "supervised tasks started again after a "
                                       "failure", labels=["task"])
        for task, count in sorted(daemon.restarts.items()):
            restarts.add_metric([task], count)
        yield from (stored, gaps, age, connected, reconnects, rejected, restarts)

    def _rest(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("kronosd_rest_requests", "exchange REST answers by HTTP status ('error': "
                                       "no answer)", labels=["status"])
        used = GaugeMetricFamily("kronosd_rest_weight_used", "request weight used in the exchange's current window")
        limit = GaugeMetricFamily("kronosd_rest_weight_limit", "request weight the daemon allows itself per window")
        rest = getattr(self.daemon, "rest", None)
        if rest is not None:
            for status, count in sorted(rest.stats.statuses.items()):
                requests.add_metric([status], count)
            rest.budget._roll()  # a window that has passed counts nothing any more
            used.add_metric([], rest.budget.used)
            limit.add_metric([], rest.budget.limit * rest.budget.share)
        yield from (requests, used, limit)

    def _model(self) -> Iterator[Metric]:
        daemon = self.daemon
        continual = getattr(daemon, "continual", None)
        runs = CounterMetricFamily("kronosd_finetune_runs", "finished fine-tune runs by outcome", labels=["outcome"])
        promotions = CounterMetricFamily("kronosd_model_promotions", "challengers promoted to champion")
        rejections = CounterMetricFamily("kronosd_model_rejections", "challengers rejected (gate, failure, smoke)")
        running = GaugeMetricFamily("kronosd_finetune_running", "1 while a fine-tune runs")
        if continual is not None:
            runs.add_metric(["promoted"], continual.promotions)
            runs.add_metric(["rejected"], continual.rejections)
            promotions.add_metric([], continual.promotions)
            rejections.add_metric([], continual.rejections)
            running.add_metric([], 1.0 if continual.running else 0.0)
        info = InfoMetricFamily("kronosd_model", "the champion model forecasting now")
        forecaster = getattr(daemon, "forecaster", None)
        if forecaster is not None and forecaster.champion is not None:
            info.add_metric([], {"version": forecaster.champion.version})
        yield from (runs, promotions, rejections, running, info)

    def _mqtt(self) -> Iterator[Metric]:
        publisher = getattr(self.daemon, "publisher", None)
        connected = GaugeMetricFamily("kronosd_mqtt_connected", "1 while connected to the MQTT broker")
        queued = GaugeMetricFamily("kronosd_mqtt_queued_messages", "forecasts and events waiting for the broker")
        connected.add_metric([], 1.0 if publisher is not None and publisher.connected else 0.0)
        queued.add_metric([], publisher.queued if publisher is not None else 0)
        yield from (connected, queued)

    def _ledger(self) -> Iterator[Metric]:
        labels = [*PAIR, "model_version"]
        relative = GaugeMetricFamily("kronosd_ledger_relative_mae", "rolling MAE of the median forecast / MAE of "
                                     "the random walk (< 1 beats it)", labels=labels)
        coverage = GaugeMetricFamily("kronosd_ledger_coverage_80", "rolling share of closes inside p10..p90",
                                     labels=labels)
        forecaster = getattr(self.daemon, "forecaster", None)
        for score in forecaster.latest_scores if forecaster is not None else []:
            key = [score["symbol"], score["interval"], score["model_version"]]
            if score.get("relative_mae") is not None:
                relative.add_metric(key, score["relative_mae"])
            if score.get("coverage_80") is not None:
                coverage.add_metric(key, score["coverage_80"])
        yield from (relative, coverage)
