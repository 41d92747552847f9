"""Schemas 3 and 4: a store written before calibration (schema 2) opens with the calibrated columns and the
quantile grid added, its old forecasts intact (raw, no calibrated values, no grid), and the calibration history
left out of what cannot warm."""

from __future__ import annotations

import duckdb
import polars as pl
import pytest

from daemon.ledger import overall_errors
from storage.candles import candles_from_rows
from storage.forecasts import (
    CALIBRATED_COLUMNS,
    GRID_COLUMNS,
    calibration_history,
    forecasts_with_outcomes,
    insert_forecasts,
)
from storage.schema import LATEST_VERSION, MIGRATIONS
from storage.store import CandleStore

HOUR = 3_600_000
GRID = (0.05, 0.1, 0.5, 0.9, 0.95)
T0 = 1_717_200_000_000  # 2024-06-01 00:00 UTC


def write_v2_store(path) -> None:
    """What a kronosd of schema 2 left behind: its two migrations and one forecast of two steps."""
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description VARCHAR NOT NULL, "
                "applied_at TIMESTAMPTZ NOT NULL)")
    for version, description, statements in MIGRATIONS[:2]:
        for statement in statements:
            con.execute(statement)
        con.execute("INSERT INTO schema_version VALUES (?, ?, now())", [version, description])
    for step in (1, 2):
        con.execute("INSERT INTO forecasts (symbol, interval, origin_time, model_version, step, target_time, "
                    "issued_at, sample_paths, last_close, close_p10, close_p50, close_p90, prob_up) VALUES "
                    "('BTCUSDT', '1h', make_timestamptz(?::BIGINT * 1000), 'v1', ?, "
                    "make_timestamptz(?::BIGINT * 1000), now(), 4, 100, 99, 100, 101, 0.5)",
                    [T0, step, T0 + step * HOUR])
    con.close()


def candle(t: int, close: float) -> dict:
    return {"symbol": "BTCUSDT", "interval": "1h", "open_time": t, "close_time": t + HOUR - 1, "open": close,
            "high": close, "low": close, "close": close, "volume": 1.0, "is_closed": True, "source": "rest"}


def test_a_schema_2_store_gains_the_calibrated_columns_and_grid_and_keeps_its_forecasts_raw(tmp_path):
    path = tmp_path / "old.duckdb"
    write_v2_store(path)
    store = CandleStore(path, memory_limit="256MB", threads=1)
    try:
        con = store.con
        assert con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0] == LATEST_VERSION >= 4
        columns = {row[0] for row in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'forecasts'").fetchall()}
        assert {"close_p05", "close_p95", *CALIBRATED_COLUMNS, *GRID_COLUMNS} <= columns
        store.upsert(candles_from_rows([candle(T0 + HOUR, 102.0)]))
        old = forecasts_with_outcomes(con)
        assert old.height == 2 and old["close_p50"].to_list() == [100.0, 100.0]  # raw, as written
        assert old["close_p10_cal"].null_count() == 2 and old["prob_up_cal"].null_count() == 2
        assert old["actual"].to_list() == [102.0, None]
        assert old["close_grid"].null_count() == 2
        # no grid: nothing to warm a calibrator with
        assert calibration_history(con, "BTCUSDT", "1h", "v1", GRID).is_empty()

        # a forecast written now carries raw p05/p95 and the grid and, when published calibrated, the calibrated
        # values
        origin = T0 + HOUR
        frame = pl.DataFrame({
            "symbol": ["BTCUSDT"] * 2, "interval": ["1h"] * 2, "origin_time": [origin] * 2, "model_version": ["v1"] * 2,
            "step": [1, 2], "target_time": [origin + HOUR, origin + 2 * HOUR], "issued_at": [origin + HOUR] * 2,
            "sample_paths": [4, 4], "last_close": [102.0, 102.0], "close_p05": [97.0, 96.0],
            "close_p10": [98.0, 97.0], "close_p50": [102.0, 102.0], "close_p90": [104.0, 105.0],
            "close_p95": [105.0, 106.0], "prob_up": [0.5, 0.5], "close_p10_cal": [96.5, 95.0],
            "close_p50_cal": [102.0, 102.0], "close_p90_cal": [106.0, 107.0], "prob_up_cal": [0.5, 0.49],
            "grid_levels": [list(GRID)] * 2, "close_grid": [[97.0, 98.0, 102.0, 104.0, 105.0],
                                                            [96.0, 97.0, 102.0, 105.0, 106.0]],
            "close_grid_cal": [[96.0, 96.5, 102.0, 106.0, 107.0], [94.0, 95.0, 102.0, 107.0, 108.0]]})
        insert_forecasts(con, frame)
        store.upsert(candles_from_rows([candle(origin + HOUR, 104.5)]))  # above the raw p90, inside the calibrated
        history = calibration_history(con, "BTCUSDT", "1h", "v1", GRID)
        assert history["origin_ms"].to_list() == [origin, origin]
        assert history["close_grid"].to_list()[1] == [96.0, 97.0, 102.0, 105.0, 106.0]
        assert history["actual"].to_list() == [104.5, None]
        # stored with another grid: not replayed by a calibrator working on this one
        assert calibration_history(con, "BTCUSDT", "1h", "v1", (0.1, 0.5, 0.9)).is_empty()
        new = forecasts_with_outcomes(con).filter(pl.col("origin_ms") == origin)
        assert new["close_p10_cal"].to_list() == [96.5, 95.0] and new["close_p10"].to_list() == [98.0, 97.0]
        assert new["close_grid_cal"].to_list()[0] == [96.0, 96.5, 102.0, 106.0, 107.0]
        assert new["grid_levels"].to_list()[0] == list(GRID)
        # the daemon's summary: coverage as published (calibrated where it went out calibrated) and raw
        errors = overall_errors(con)
        # three realised steps, all outside their raw band; one was published calibrated, inside its band
        assert errors["scored_steps"] == 3 and errors["calibrated_share"] == pytest.approx(1 / 3)
        assert errors["coverage_80"] == pytest.approx(1 / 3) and errors["coverage_80_raw"] == 0.0
        assert errors["brier_prob_up"] == errors["brier_prob_up_raw"] == 0.25
    finally:
        store.close()
