// Chart helpers on top of Lightweight Charts: a common look, and the forecast fan band (p10..p90) as a
// custom series, since the library has no band series of its own.
"use strict";

(function () {
  const LWC = window.LightweightCharts;

  const theme = {
    layout: { background: { type: "solid", color: "#171d24" }, textColor: "#d6dde4", attributionLogo: true },
    grid: { vertLines: { color: "#222a33" }, horzLines: { color: "#222a33" } },
    rightPriceScale: { borderColor: "#2a323c" },
    timeScale: { borderColor: "#2a323c", timeVisible: true, secondsVisible: false },
    crosshair: { mode: 0 },
    autoSize: true,
  };

  // Draws a filled polygon between each item's `lo` and `hi`.
  class BandRenderer {
    constructor() { this.data = null; this.options = null; }
    draw(target, priceToCoordinate) {
      const data = this.data;
      if (!data || data.bars.length < 1) return;
      target.useBitmapCoordinateSpace((scope) => {
        const ctx = scope.context;
        const h = scope.horizontalPixelRatio, v = scope.verticalPixelRatio;
        const points = [];
        for (const bar of data.bars) {
          const d = bar.originalData;
          if (d.lo === undefined || d.hi === undefined) continue;
          const hi = priceToCoordinate(d.hi), lo = priceToCoordinate(d.lo);
          if (hi === null || lo === null) continue;
          points.push([bar.x * h, hi * v, lo * v]);
        }
        if (!points.length) return;
        ctx.beginPath();
        ctx.moveTo(points[0][0], points[0][1]);
        for (const p of points) ctx.lineTo(p[0], p[1]);
        for (let i = points.length - 1; i >= 0; i--) ctx.lineTo(points[i][0], points[i][2]);
        ctx.closePath();
        ctx.fillStyle = this.options.fillColor;
        ctx.fill();
        ctx.strokeStyle = this.options.edgeColor;
        ctx.lineWidth = Math.max(1, h);
        ctx.stroke();
      });
    }
  }

  class BandSeries {
    constructor() { this._renderer = new BandRenderer(); }
    priceValueBuilder(item) { return [item.lo, item.hi, (item.lo + item.hi) / 2]; }
    isWhitespace(item) { return item.lo === undefined || item.hi === undefined; }
    renderer() { return this._renderer; }
    update(data, options) { this._renderer.data = data; this._renderer.options = options; }
    defaultOptions() {
      return Object.assign({}, LWC.customSeriesDefaultOptions, {
        fillColor: "rgba(111, 179, 255, 0.18)", edgeColor: "rgba(111, 179, 255, 0.55)",
        lastValueVisible: false, priceLineVisible: false,
      });
    }
  }

  function chart(element, extra) {
    const options = Object.assign({}, theme, extra || {});
    return LWC.createChart(element, options);
  }

  // Lightweight Charts needs strictly increasing times: sort, keep the last item of each time.
  function ordered(items) {
    const byTime = new Map();
    for (const item of items) byTime.set(item.time, item);
    return Array.from(byTime.values()).sort((a, b) => a.time - b.time);
  }

  window.KronosCharts = {
    LWC, chart, ordered,
    band: (c, options) => c.addCustomSeries(new BandSeries(), options || {}),
  };
})();
