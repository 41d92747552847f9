// The kronosd dashboard: loads everything from /api/, then follows /api/stream (server-sent events) so new
// candles and forecasts appear without a reload. `window.kronos` exposes the charts and counters, so a test
// (or a curious person in the console) can read back what is drawn.
"use strict";

(function () {
  const C = window.KronosCharts;
  const state = {
    mode: null, pairs: [], charts: {}, forecastsReceived: 0, candlesReceived: 0, lastForecast: {},
    errors: [], loaded: false, streamOpen: false,
  };
  window.kronos = state;

  const key = (symbol, interval) => `${symbol}/${interval}`;
  const $ = (id) => document.getElementById(id);
  const fmt = (value, digits = 2) => (value === null || value === undefined || Number.isNaN(value)) ? "–"
    : Number(value).toLocaleString("en-US", { maximumFractionDigits: digits });
  const utc = (seconds) => new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 16);

  async function get(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" } });
    const body = await response.json();
    if (!response.ok) throw new Error(`${path}: ${response.status} ${body.error || ""}`);
    return body;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    for (const child of children) node.append(child);
    return node;
  }

  function badge(id, text, good) {
    const node = $(id);
    node.textContent = text;
    node.classList.toggle("ok", good === true);
    node.classList.toggle("bad", good === false);
  }

  // -- one card per pair: candles + fan + track, P(up), ledger, ingest health ------------------------------
  function buildPair(symbol, interval) {
    const id = key(symbol, interval);
    const main = el("div", { class: "chart", "data-pair": id });
    const probUp = el("div", { class: "chart tiny" });
    const ledger = el("div", { class: "chart small" });
    const health = el("div", { class: "health" });
    const ledgerNote = el("div", { class: "muted" });
    const legend = el("div", { class: "legend" },
      el("span", {}, el("span", { class: "swatch", style: "background:#26a69a" }), "candles"),
      el("span", {}, el("span", { class: "swatch", style: "background:rgba(111,179,255,.4)" }), "newest fan p10–p90"),
      el("span", {}, el("span", { class: "swatch", style: "background:#6fb3ff" }), "p50"),
      el("span", {}, el("span", { class: "swatch", style: "background:#f0b429" }), "earlier forecasts' next-step p50"));
    const card = el("section", { class: "panel", id: `pair-${symbol}-${interval}` },
      el("h2", {}, id, el("span", { class: "muted", "data-role": "origin" }, "")),
      health, legend,
      el("div", { class: "pair-grid" }, main,
        el("div", {}, el("div", { class: "muted" }, "P(close above the last close), per step of the newest forecast"),
          probUp, el("div", { class: "muted" }, "rolling MAE / random walk per model version (below 1 beats it)"),
          ledger, ledgerNote)));
    $("pairs").append(card);

    const chart = C.chart(main);
    const candles = chart.addSeries(C.LWC.CandlestickSeries, {
      upColor: "#26a69a", downColor: "#ef5350", borderVisible: false, wickUpColor: "#26a69a",
      wickDownColor: "#ef5350" });
    const band = C.band(chart);
    const p50 = chart.addSeries(C.LWC.LineSeries, { color: "#6fb3ff", lineWidth: 2, priceLineVisible: false,
      lastValueVisible: false });
    const track = chart.addSeries(C.LWC.LineSeries, { color: "#f0b429", lineWidth: 1, lineStyle: 2,
      priceLineVisible: false, lastValueVisible: false, crosshairMarkerVisible: false });
    const probChart = C.chart(probUp, { timeScale: { visible: true, timeVisible: true } });
    const prob = probChart.addSeries(C.LWC.HistogramSeries, { color: "#6fb3ff", priceFormat: { type: "percent" },
      priceLineVisible: false });
    const half = probChart.addSeries(C.LWC.LineSeries, { color: "#8a96a3", lineWidth: 1, lineStyle: 2,
      priceLineVisible: false, lastValueVisible: false, crosshairMarkerVisible: false });
    const ledgerChart = C.chart(ledger);
    state.charts[id] = { symbol, interval, chart, candles, band, p50, track, probChart, prob, half, ledgerChart,
      ledgerSeries: {}, health, ledgerNote, card };
  }

  function showForecast(id, forecast) {
    const c = state.charts[id];
    if (!c || !forecast) return;
    const lastCandle = c.candles.data().slice(-1)[0];
    // The fan starts at the origin candle's close, so it visibly grows out of the last candle.
    const start = lastCandle && lastCandle.time === forecast.origin_time
      ? [{ time: forecast.origin_time, lo: forecast.last_close, hi: forecast.last_close, value: forecast.last_close }]
      : [];
    const steps = forecast.steps.map((s) => ({ time: s.time, lo: s.p10, hi: s.p90, value: s.p50 }));
    c.band.setData(C.ordered([...start, ...steps].map(({ time, lo, hi }) => ({ time, lo, hi }))));
    c.p50.setData(C.ordered([...start, ...steps].map(({ time, value }) => ({ time, value }))));
    c.prob.setData(C.ordered(forecast.steps.map((s) => ({ time: s.time, value: s.prob_up * 100,
      color: s.prob_up >= 0.5 ? "#26a69a" : "#ef5350" }))));
    c.half.setData(C.ordered(forecast.steps.map((s) => ({ time: s.time, value: 50 }))));
    c.probChart.timeScale().fitContent();
    state.lastForecast[id] = forecast;
    c.card.querySelector("[data-role=origin]").textContent =
      `forecast from ${utc(forecast.origin_time)} UTC by ${forecast.model_version} (${forecast.sample_paths} paths)`;
  }

  function showTrack(id, points) {
    state.charts[id].track.setData(C.ordered(points.filter((p) => p.p50 !== null)
      .map((p) => ({ time: p.time, value: p.p50 }))));
  }

  const palette = ["#6fb3ff", "#26a69a", "#f0b429", "#c792ea", "#ff8a65", "#4dd0e1", "#aed581"];

  function showLedger(id, scores) {
    const c = state.charts[id];
    const byVersion = new Map();
    for (const s of scores) {
      if (s.relative_mae === null) continue;
      if (!byVersion.has(s.model_version)) byVersion.set(s.model_version, []);
      byVersion.get(s.model_version).push({ time: s.at, value: s.relative_mae });
    }
    if (!c.ledgerSeries.__rw) {
      c.ledgerSeries.__rw = c.ledgerChart.addSeries(C.LWC.LineSeries, { color: "#8a96a3", lineWidth: 1,
        lineStyle: 2, title: "random walk", priceLineVisible: false, lastValueVisible: false });
    }
    let index = 0;
    for (const [version, points] of byVersion) {
      if (!c.ledgerSeries[version]) {
        c.ledgerSeries[version] = c.ledgerChart.addSeries(C.LWC.LineSeries, {
          color: palette[index % palette.length], lineWidth: 2, title: version.slice(0, 17),
          priceLineVisible: false });
      }
      c.ledgerSeries[version].setData(C.ordered(points));
      index += 1;
    }
    const times = C.ordered(scores.map((s) => ({ time: s.at, value: 1 })));
    c.ledgerSeries.__rw.setData(times);
    c.ledgerChart.timeScale().fitContent();
    const last = scores[scores.length - 1];
    c.ledgerNote.textContent = last
      ? `latest (${last.model_version}, ${last.window}): MAE ${fmt(last.mae)} vs random walk ${fmt(last.mae_random_walk)}`
        + `, 80 % band coverage ${fmt(last.coverage_80 * 100, 1)} %, ${last.origins} forecasts scored`
      : "no rolling scores yet (published every forecast.score_every forecasts)";
  }

  function showIngest(id, info) {
    const c = state.charts[id];
    const live = info.live;
    const parts = [["stored candles", fmt(info.stored_candles, 0)], ["newest", info.newest_open_time || "–"]];
    if (live) {
      parts.push(["candle age", live.age_s === null ? "–" : `${fmt(live.age_s, 0)} s`],
        ["stream", live.connected ? "connected" : "down"], ["backfills", fmt(info.backfills, 0)]);
      const reconnects = Object.values(info.ws_reconnects || {}).reduce((a, b) => a + b, 0);
      parts.push(["reconnects", fmt(reconnects, 0)]);
    }
    const gaps = Object.entries(info.gaps_by_status || {}).map(([s, n]) => `${n} ${s}`).join(", ") || "none";
    parts.push(["gaps", gaps]);
    c.health.replaceChildren(...parts.map(([name, value]) => el("span", {}, `${name} `, el("b", {}, String(value)))));
  }

  // -- models and fine-tuning ------------------------------------------------------------------------------
  const scoreText = (s) => s ? `${fmt(s.crps, 4)} / ${fmt(s.mae, 4)}` : "";

  function showModels(models) {
    $("versions").textContent = models.versions.length
      ? `${models.versions.length} versions · current ${models.current || "–"} · previous ${models.previous || "–"}`
      : "no model registry yet";
    const rows = models.events.map((e) => el("tr", { class: e.kind },
      el("td", {}, e.at ? e.at.replace("T", " ").replace("Z", "") : ""), el("td", {}, e.kind),
      el("td", {}, e.model_version || e.champion_version || ""), el("td", {}, scoreText(e.challenger)),
      el("td", {}, scoreText(e.champion)), el("td", { class: "reason" }, e.reason || (e.previous ? `replaced ${e.previous}` : ""))));
    $("timeline").querySelector("tbody").replaceChildren(...rows);
  }

  let lossChart = null;
  let lossSeries = [];
  let runs = [];

  function showRun(runId) {
    const run = runs.find((r) => r.run_id === runId);
    for (const s of lossSeries) lossChart.removeSeries(s);
    lossSeries = [];
    if (!run) return;
    const colors = { tokenizer: "#f0b429", predictor: "#6fb3ff" };
    for (const stage of ["tokenizer", "predictor"]) {
      for (const field of ["loss", "val_loss"]) {
        const points = run.records.filter((r) => r.stage === stage && r[field] !== undefined && r[field] !== null)
          .map((r) => ({ time: r.step + 1, value: r[field] }));
        if (!points.length) continue;
        const series = lossChart.addSeries(C.LWC.LineSeries, { color: colors[stage], lineWidth: field === "loss" ? 1 : 2,
          lineStyle: field === "loss" ? 0 : 2, title: `${stage} ${field === "loss" ? "train" : "val"}`,
          pointMarkersVisible: field === "val_loss", priceLineVisible: false });
        series.setData(C.ordered(points));
        lossSeries.push(series);
      }
    }
    lossChart.timeScale().fitContent();
    $("loss-note").textContent = `${run.records.length} records from state/finetune/${run.run_id}/out/train_log.jsonl`
      + " (x: optimizer step)";
  }

  function showRuns(list) {
    runs = list;
    if (!lossChart) {
      // x is the optimizer step, carried in the time field; label it as a number, not a date
      lossChart = C.chart($("loss-chart"), {
        timeScale: { tickMarkFormatter: (t) => String(t - 1), timeVisible: false },
        localization: { timeFormatter: (t) => `step ${t - 1}` } });
      state.lossChart = lossChart;
    }
    const select = $("run-select");
    const chosen = state.userRun;
    select.replaceChildren(...list.map((r) => el("option", { value: r.run_id }, r.run_id)));
    if (!list.length) {
      $("loss-note").textContent = "no fine-tune run yet";
      return;
    }
    // keep the reader's choice; otherwise the newest run that has logged anything yet
    const fallback = (list.find((r) => r.records.length) || list[0]).run_id;
    select.value = list.some((r) => r.run_id === chosen) ? chosen : fallback;
    showRun(select.value);
  }

  // -- loading and live updates ----------------------------------------------------------------------------
  function showStatus(status) {
    // a run in progress keeps logging: follow its loss curves while it trains
    if (status.finetune_running && state.loaded) throttle("models", 10000, loadModels);
    state.status = status;
    badge("mode", status.mode === "live" ? "live daemon" : "snapshot (no daemon)");
    badge("model", `model ${status.model_version || "–"}`);
    if (status.mode === "live") {
      const failing = (status.checks || []).filter((c) => !c.ok);
      badge("ready", status.ready ? "ready" : `not ready: ${failing.map((c) => c.check).join(", ")}`, status.ready);
      badge("forecasts", `${fmt(status.forecasts_published, 0)} forecasts`);
      badge("mqtt", `MQTT ${status.mqtt}`, status.mqtt === "up" ? true : status.mqtt === "down" ? false : undefined);
    } else {
      badge("ready", status.snapshot_time ? `snapshot of ${status.snapshot_time}` : "no snapshot");
      $("forecasts").hidden = true;
      $("mqtt").hidden = true;
    }
  }

  async function loadPair(symbol, interval) {
    const id = key(symbol, interval);
    const q = `symbol=${encodeURIComponent(symbol)}&interval=${encodeURIComponent(interval)}`;
    const [candles, forecast, track, ledger, ingest] = await Promise.all([
      get(`/api/candles?${q}&limit=500`), get(`/api/forecast?${q}`), get(`/api/track?${q}&step=1&limit=500`),
      get(`/api/ledger?${q}`), get(`/api/ingest?${q}`)]);
    const c = state.charts[id];
    c.candles.setData(C.ordered(candles.candles));
    showForecast(id, forecast.forecast);
    showTrack(id, track.points);
    showLedger(id, ledger.scores);
    showIngest(id, ingest);
    // The recent past and the fan, not all 500 candles: scroll or zoom for more.
    const bars = candles.candles.length;
    const ahead = forecast.forecast ? forecast.forecast.steps.length : 0;
    if (bars > 150) c.chart.timeScale().setVisibleLogicalRange({ from: bars - 150, to: bars + ahead + 2 });
    else c.chart.timeScale().fitContent();
  }

  async function loadModels() {
    const [models, finetune] = await Promise.all([get("/api/models"), get("/api/finetune")]);
    showModels(models);
    showRuns(finetune.runs);
  }

  async function loadAll() {
    const [pairs, status] = await Promise.all([get("/api/pairs"), get("/api/status")]);
    state.mode = pairs.mode;
    showStatus(status);
    for (const p of pairs.pairs) {
      if (!state.charts[key(p.symbol, p.interval)]) buildPair(p.symbol, p.interval);
    }
    state.pairs = pairs.pairs.map((p) => key(p.symbol, p.interval));
    await Promise.all([...pairs.pairs.map((p) => loadPair(p.symbol, p.interval)), loadModels()]);
    state.loaded = true;
    state.loadedAt = Date.now();
  }

  const throttled = new Map();
  function throttle(name, ms, fn) {
    if (throttled.has(name)) return;
    throttled.set(name, setTimeout(() => { throttled.delete(name); fn().catch(report); }, ms));
  }

  function report(error) {
    state.errors.push(String(error));
    console.warn("kronosd dashboard:", error);
  }

  function follow() {
    const stream = new EventSource("/api/stream");
    stream.addEventListener("open", () => {
      badge("live", "live updates", true);
      if (state.streamOpen === false && state.loaded) loadAll().catch(report);  // catch up after a reconnect
      state.streamOpen = true;
    });
    stream.addEventListener("error", () => { badge("live", "reconnecting…", false); state.streamOpen = false; });
    stream.addEventListener("forecast", (event) => {
      const data = JSON.parse(event.data);
      const id = key(data.symbol, data.interval);
      state.forecastsReceived += 1;
      showForecast(id, data.forecast);
      throttle(`track ${id}`, 3000, async () => {
        const q = `symbol=${data.symbol}&interval=${data.interval}`;
        showTrack(id, (await get(`/api/track?${q}&step=1&limit=500`)).points);
        showIngest(id, await get(`/api/ingest?${q}`));
      });
    });
    stream.addEventListener("candles", (event) => {
      const data = JSON.parse(event.data);
      const c = state.charts[key(data.symbol, data.interval)];
      if (!c) return;
      const last = c.candles.data().slice(-1)[0];
      for (const candle of data.candles) {
        if (!last || candle.time >= last.time) c.candles.update(candle);
      }
      state.candlesReceived += data.candles.length;
    });
    stream.addEventListener("status", (event) => showStatus(JSON.parse(event.data)));
    stream.addEventListener("model", () => throttle("models", 1000, loadModels));
    stream.addEventListener("ledger", () => throttle("ledger", 1000, async () => {
      for (const id of state.pairs) {
        const c = state.charts[id];
        const q = `symbol=${c.symbol}&interval=${c.interval}`;
        showLedger(id, (await get(`/api/ledger?${q}`)).scores);
      }
    }));
    stream.addEventListener("refresh", () => throttle("refresh", 500, loadAll));
    state.stream = stream;
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("run-select").addEventListener("change", (event) => {
      state.userRun = event.target.value;
      showRun(event.target.value);
    });
    loadAll().catch(report).finally(follow);
  });
})();
