"""Writing the daemon's forecasts and model events, and the simplest score of forecasts so far."""

from __future__ import annotations

import json
from typing import Any

import duckdb
import polars as pl

FORECAST_COLUMNS = ("open", "high", "low", "close", "volume", "amount")
# The quantile levels the forecasts table keeps, by column suffix; everything that writes or scores the
# table takes them from here.
STORED_QUANTILES: dict[float, str] = {0.1: "p10", 0.5: "p50", 0.9: "p90"}
FORECAST_STATS = ("mean", *STORED_QUANTILES.values())


def insert_forecasts(con: duckdb.DuckDBPyConnection, frame: pl.DataFrame) -> int:
    """Insert one forecast's rows (one per step); re-issuing the same (pair, origin, model) replaces them.

    `frame` has the table's columns with times as integer milliseconds.
    """
    con.register("incoming_forecast", frame)
    try:
        columns = ", ".join(frame.columns)
        select = ", ".join(
            f"make_timestamptz({c}::BIGINT * 1000) AS {c}" if c in ("origin_time", "target_time", "issued_at") else c
            for c in frame.columns
        )
        con.execute(f"INSERT OR REPLACE INTO forecasts ({columns}) SELECT {select} FROM incoming_forecast")
    finally:
        con.unregister("incoming_forecast")
    return frame.height


def newest_forecast_origins(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], int]:
    """The newest forecast origin (ms) per (symbol, interval)."""
    rows = con.execute(
        "SELECT symbol, interval, epoch_ms(max(origin_time)) FROM forecasts GROUP BY symbol, interval"
    ).fetchall()
    return {(symbol, interval): int(newest) for symbol, interval, newest in rows}


def insert_model_event(con: duckdb.DuckDBPyConnection, kind: str, model_version: str | None = None,
                       champion_version: str | None = None, run_id: str | None = None,
                       details: dict[str, Any] | None = None) -> None:
    con.execute(
        "INSERT INTO model_events VALUES (now(), ?, ?, ?, ?, ?)",
        [kind, model_version, champion_version, run_id, json.dumps(details or {}, default=str)],
    )


def forecasts_with_outcomes(con: duckdb.DuckDBPyConnection, *, symbol: str | None = None,
                            interval: str | None = None, model_version: str | None = None,
                            since_ms: int | None = None) -> pl.DataFrame:
    """Every stored forecast step with the close that followed (`actual`, null while the target is open).

    Columns: symbol, interval, model_version, origin_ms, step, last_close, close_<quantile>…, (schema >= 3:
    close_p10_cal, close_p50_cal, close_p90_cal, prob_up_cal, schema >= 4: grid_levels, close_grid,
    close_grid_cal,) prob_up, actual;
    ordered by pair, model version, origin and step. The one join of forecasts with candles: the ledger and
    the daemon's summary both score from it.
    """
    conditions, params = ["TRUE"], []
    for column, value in (("symbol", symbol), ("interval", interval), ("model_version", model_version)):
        if value is not None:
            conditions.append(f"f.{column} = ?")
            params.append(value)
    if since_ms is not None:
        conditions.append("f.origin_time >= make_timestamptz(?::BIGINT * 1000)")
        params.append(int(since_ms))
    quantile_columns = ", ".join(f"f.close_{name}" for name in STORED_QUANTILES.values())
    try:
        calibrated = has_calibrated_columns(con)
    except duckdb.Error:
        calibrated = False
    if calibrated:  # what was published calibrated, beside the raw model output (schema >= 3)
        quantile_columns += ", " + ", ".join(f"f.{column}" for column in CALIBRATED_COLUMNS)
        if has_grid_columns(con):  # the whole close quantile grid (schema >= 4)
            quantile_columns += ", " + ", ".join(f"f.{column}" for column in GRID_COLUMNS)
    query = f"""
        SELECT f.symbol, f.interval, f.model_version, epoch_ms(f.origin_time) AS origin_ms, f.step,
               f.last_close, {quantile_columns}, f.prob_up, c.close AS actual
        FROM forecasts f LEFT JOIN candles c
          ON c.symbol = f.symbol AND c.interval = f.interval AND c.open_time = f.target_time
        WHERE {" AND ".join(conditions)}
        ORDER BY f.symbol, f.interval, f.model_version, f.origin_time, f.step
    """
    try:
        return con.sql(query, params=params).pl()
    except duckdb.CatalogException as exc:
        raise ValueError(f"this database has no forecasts to score ({str(exc).splitlines()[0]}); it was written by "
                         "a kronosd without forecasts (schema < 2): run the daemon with this version first") from exc


# The raw close p05/p95 of schema 3, beside p10/p50/p90: the 90 % band for readers of the fixed columns.
BAND_QUANTILES: dict[float, str] = {0.05: "p05", 0.95: "p95"}
CALIBRATED_COLUMNS = ("close_p10_cal", "close_p50_cal", "close_p90_cal", "prob_up_cal")
# Schema 4: the close quantile grid per step (levels, raw values, calibrated values or NULL), as DOUBLE[].
GRID_COLUMNS = ("grid_levels", "close_grid", "close_grid_cal")


def calibration_history(con: duckdb.DuckDBPyConnection, symbol: str, interval: str, model_version: str,
                        levels: tuple[float, ...], since_ms: int | None = None) -> pl.DataFrame:
    """One pair's stored forecasts of one model version, as the calibrator is warmed from them: every step with
    the raw close quantile grid (`close_grid`, one value per level of `levels`), the raw prob_up and the close that
    followed (`actual`, null while the target is open or not stored). Rows stored with another grid, or before
    schema 4 (no grid), are left out: a calibrator works on one grid.

    Columns: origin_ms, step, last_close, close_grid (list), prob_up, actual; ordered by origin and step.
    """
    conditions = ["f.symbol = ?", "f.interval = ?", "f.model_version = ?", "f.grid_levels = ?::DOUBLE[]"]
    params: list[Any] = [symbol, interval, model_version, [float(level) for level in levels]]
    if since_ms is not None:
        conditions.append("f.origin_time >= make_timestamptz(?::BIGINT * 1000)")
        params.append(int(since_ms))
    query = f"""
        SELECT epoch_ms(f.origin_time) AS origin_ms, f.step, f.last_close, f.close_grid, f.prob_up,
               c.close AS actual
        FROM forecasts f LEFT JOIN candles c
          ON c.symbol = f.symbol AND c.interval = f.interval AND c.open_time = f.target_time
        WHERE {" AND ".join(conditions)}
        ORDER BY f.origin_time, f.step
    """
    return con.sql(query, params=params).pl()


def _has_columns(con: duckdb.DuckDBPyConnection, columns: tuple[str, ...]) -> bool:
    placeholders = ", ".join("?" for _ in columns)
    found = con.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'forecasts' "
                        f"AND column_name IN ({placeholders})", list(columns)).fetchall()[0][0]
    return int(found) == len(columns)


def has_grid_columns(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the forecasts table has the quantile grid (schema >= 4; a read-only older store has not)."""
    return _has_columns(con, GRID_COLUMNS)


def has_calibrated_columns(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the forecasts table has the calibrated columns (schema >= 3; a read-only older store has not)."""
    return _has_columns(con, CALIBRATED_COLUMNS)
