"""The dashboard in a real browser: Debian's Chromium (headless, through selenium and chromium-driver) loads the
page of a daemon running against the exchange simulator, and the test reads back through the page what the
charts hold: candles and a forecast fan for each pair, a new forecast arriving live (no reload), the same
forecast MQTT carried, and no console error. A screenshot is kept in the test's temporary directory."""

from __future__ import annotations

import itertools
import time

import pytest
from browser_helpers import CHROMEDRIVER, CHROMIUM, browser, console_errors
from daemon_helpers import Daemon, Simulator, Subscriber, daemon_config, free_port, wait_for

SYMBOLS = ("BTCUSDT", "ETHUSDT")
HORIZON = 6

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                              ".ci/run installs them)"),
]

# What each pair's charts hold, read from the chart objects themselves (series.data()).
READ_CHARTS = """
const out = {};
for (const [id, c] of Object.entries(window.kronos.charts)) {
  const newest = window.kronos.lastForecast[id];
  out[id] = {candles: c.candles.data(), band: c.band.data(), p50: c.p50.data(), prob: c.prob.data(),
             track: c.track.data(), origin: newest && newest.origin_time};
}
return out;
"""


def iso(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def test_dashboard_draws_candles_and_fans_and_updates_live(tmp_path, broker):
    # 1800x: a candle every 2 s, so forecasts keep coming while the page is open
    simulator = Simulator("2024-06-01", 1800)
    subscriber = Subscriber(broker.port)
    port = free_port()
    config = daemon_config(tmp_path, simulator, broker.port, symbols=SYMBOLS, forecast={"score_every": 4},
                           http={"port": port})
    daemon = Daemon(config)
    driver = None
    try:
        daemon.wait_event("forecast_published", 60, count=2 * len(SYMBOLS))
        driver = browser()
        driver.get(f"http://127.0.0.1:{port}/")
        wait_for(lambda: driver.execute_script("return Boolean(window.kronos && window.kronos.loaded)"), 60,
                 what="the dashboard's first load")
        driver.execute_script("window.__sameDocument = 'yes'")  # gone if anything reloads the page

        charts = wait_for(lambda: (c := driver.execute_script(READ_CHARTS)) and
                          all(c[f"{s}/1h"]["band"] for s in SYMBOLS) and c, 30, what="a fan on every chart")
        assert set(charts) == {f"{s}/1h" for s in SYMBOLS}
        for pair, chart in charts.items():
            candles = chart["candles"]
            assert len(candles) >= 100, pair  # the backfilled history
            assert all(a["time"] < b["time"] for a, b in itertools.pairwise(candles))
            assert all(c["low"] <= min(c["open"], c["close"]) <= max(c["open"], c["close"]) <= c["high"]
                       for c in candles)
            # the fan: p10..p90 band and the p50 line over the horizon after the origin candle
            steps = [b for b in chart["band"] if b["time"] > chart["origin"]]
            assert len(steps) == HORIZON, (pair, chart["band"])
            assert all(b["lo"] <= b["hi"] for b in chart["band"])
            assert [p["time"] for p in chart["p50"]] == [b["time"] for b in chart["band"]]
            assert all(b["lo"] <= p["value"] <= b["hi"] for b, p in zip(chart["band"], chart["p50"], strict=True))
            assert len(chart["prob"]) == HORIZON and all(0 <= p["value"] <= 100 for p in chart["prob"])
            assert chart["track"], "earlier forecasts' p50 drawn against the candles"
            # what the page drew is what MQTT carried
            assert iso(chart["origin"]) in [f["origin_time"] for f in subscriber.forecasts(pair.split("/")[0])]

        # a new forecast arrives live, for every pair, without a reload
        received = driver.execute_script("return window.kronos.forecastsReceived")
        before = {pair: chart["origin"] for pair, chart in charts.items()}
        later = wait_for(lambda: (c := driver.execute_script(READ_CHARTS)) and
                         all(c[p]["origin"] > before[p] for p in before) and c, 60, what="live forecasts")
        assert driver.execute_script("return window.kronos.forecastsReceived") > received
        assert driver.execute_script("return window.__sameDocument") == "yes"
        for pair, chart in later.items():
            newest = [b["time"] for b in chart["band"] if b["time"] > chart["origin"]]
            assert len(newest) == HORIZON and newest[0] > before[pair]
            assert len(chart["candles"]) >= len(charts[pair]["candles"])  # candles kept coming too
            wait_for(lambda p=pair, o=chart["origin"]: iso(o) in [f["origin_time"] for f in
                                                                 subscriber.forecasts(p.split("/")[0])],
                     10, what="the live forecast on MQTT")

        assert driver.execute_script("return document.getElementById('live').textContent") == "live updates"
        assert driver.execute_script("return window.kronos.errors") == []
        assert console_errors(driver) == []
        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        print(f"screenshot: {shot}")
        assert daemon.stop() == 0
    except BaseException:
        daemon.dump()
        raise
    finally:
        if driver is not None:
            driver.quit()
        if daemon.process.poll() is None:
            daemon.kill()
        subscriber.close()
        simulator.close()
