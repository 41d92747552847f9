"""A calibration that cannot work never stops a forecast: the forecaster (real store, real model) meets a stored
calibration history it cannot replay, counts and logs it, publishes and stores the forecast raw, and warms a new
calibrator from what it stores next."""

from __future__ import annotations

import asyncio

import polars as pl
import pytest

from daemon.config import KronosConfig
from daemon.forecaster import ForecastService
from daemon.market.kline_files import read_kline_file
from kronos_model.checkpoint import load_pair
from storage.forecasts import insert_forecasts
from storage.writer import StoreWriter
from tests.eval_helpers import TINY

BTC = "daemon/assets/data/BTCUSDT_1h.parquet"
HOUR = 3_600_000
GRID = [0.05, 0.1, 0.5, 0.9, 0.95]


def corrupt_history(origins: list[int], grid_values: list[float]) -> pl.DataFrame:
    """Stored forecasts of version v1 whose quantile grid does not hold one value per level (a hand-edited or
    damaged table)."""
    rows = []
    for origin in origins:
        for step in range(1, 5):
            rows.append({"symbol": "BTCUSDT", "interval": "1h", "origin_time": origin, "model_version": "v1",
                         "step": step, "target_time": origin + step * HOUR, "issued_at": origin + HOUR,
                         "sample_paths": 4, "last_close": 100.0, "close_p10": 99.0, "close_p50": 100.0,
                         "close_p90": 101.0, "prob_up": 0.5, "grid_levels": GRID, "close_grid": grid_values})
    return pl.DataFrame(rows, schema_overrides={"grid_levels": pl.List(pl.Float64),
                                                "close_grid": pl.List(pl.Float64)})


@pytest.mark.parametrize("grid_values", [[99.0, 100.0, 101.0],  # three values for five levels
                                         [float("nan")] * 5],  # not a quantile forecast at all
                         ids=["short-grid", "nan-grid"])
def test_an_unreplayable_calibration_history_publishes_raw_and_loses_nothing(tmp_path, grid_values):
    config = KronosConfig.model_validate({
        "storage": {"state_dir": str(tmp_path)}, "mqtt": {"enabled": False},
        "forecast": {"lookback": 48, "horizon": 4, "sample_paths": 4, "quantile_grid": GRID,
                     "calibration": {"min_history": 5, "window": 40}}})
    candles, _ = read_kline_file(BTC, symbol="BTCUSDT", interval="1h")
    candles = candles.tail(200)
    times = candles["open_time"].to_list()

    async def run() -> tuple[list[dict], ForecastService, pl.DataFrame]:
        with StoreWriter(tmp_path / "live.duckdb") as writer:
            await writer.upsert(candles)
            await writer.run(lambda s: insert_forecasts(s.con, corrupt_history(times[-60:-50], grid_values)))
            forecaster = ForecastService(writer, config.forecast, config.model, None)
            forecaster.set_champion("v1", *load_pair(TINY))
            published: list[dict] = []
            forecaster.listeners.append(lambda event: published.append(event["payload"]))
            assert await forecaster.forecast_pair(("BTCUSDT", "1h"), times[-10])
            assert await forecaster.forecast_pair(("BTCUSDT", "1h"), times[-9])
            stored = await writer.run(lambda s: s.con.sql(
                "SELECT epoch_ms(origin_time) AS origin, count(*) AS steps, count(close_p10_cal) AS calibrated, "
                "count(close_grid) AS grids FROM forecasts WHERE origin_time > make_timestamptz(?::BIGINT * 1000) "
                "GROUP BY ALL ORDER BY origin", params=[times[-50]]).pl())
            return published, forecaster, stored

    published, forecaster, stored = asyncio.run(run())
    assert len(published) == 2 and not any(p["calibrated"] for p in published)
    assert published[0]["p10"]["close"] == published[0]["raw"]["p10"]["close"]  # raw, as flagged
    assert forecaster.calibrators.failures == 1  # counted once; the cold calibrator then carries on
    assert forecaster.calibrators.get(("BTCUSDT", "1h")) is not None
    assert stored["steps"].to_list() == [4, 4] and stored["calibrated"].to_list() == [0, 0]
    assert stored["grids"].to_list() == [4, 4]  # both forecasts stored whole, with their raw grid
