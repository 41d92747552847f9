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


def forecast_error_summary(con: duckdb.DuckDBPyConnection) -> dict[str, float | int | None]:
    """MAE of the median forecast close vs the random walk (last close), over every realised step."""
    row = con.execute(
        """
        SELECT count(*), avg(abs(f.close_p50 - c.close)), avg(abs(f.last_close - c.close)),
               avg(CASE WHEN sign(f.close_p50 - f.last_close) = sign(c.close - f.last_close) THEN 1 ELSE 0 END)
        FROM forecasts f JOIN candles c
          ON c.symbol = f.symbol AND c.interval = f.interval AND c.open_time = f.target_time
        """
    ).fetchall()[0]
    count, mae, mae_rw, direction = row
    return {"scored_steps": int(count), "mae": mae, "mae_random_walk": mae_rw, "direction_accuracy": direction}
