"""Table definitions and forward-only migrations of the candle store.

Every migration is a list of SQL statements applied in one transaction, and the version it reaches
is recorded in `schema_version`. Later issues append migrations (forecasts, models); never edit one
that has shipped, since existing stores have already run it.
"""

from __future__ import annotations

import duckdb

# Column order shared by the table, the writer's staging frames and the exporters.
CANDLE_VALUE_COLUMNS = (
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "taker_buy_base",
    "taker_buy_quote",
)

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "candles, gaps and ingest batches",
        [
            """
            CREATE TABLE candles (
                symbol VARCHAR NOT NULL,
                interval VARCHAR NOT NULL,
                open_time TIMESTAMPTZ NOT NULL,
                close_time TIMESTAMPTZ NOT NULL,
                open DOUBLE NOT NULL,
                high DOUBLE NOT NULL,
                low DOUBLE NOT NULL,
                close DOUBLE NOT NULL,
                volume DOUBLE NOT NULL,
                quote_volume DOUBLE,
                taker_buy_base DOUBLE,
                taker_buy_quote DOUBLE,
                trades BIGINT,
                source VARCHAR NOT NULL,
                ingested_at TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (symbol, interval, open_time)
            )
            """,
            """
            CREATE TABLE gaps (
                symbol VARCHAR NOT NULL,
                interval VARCHAR NOT NULL,
                gap_start TIMESTAMPTZ NOT NULL,
                gap_end TIMESTAMPTZ NOT NULL,
                status VARCHAR NOT NULL,
                reason VARCHAR,
                checked_at TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (symbol, interval, gap_start)
            )
            """,
            """
            CREATE TABLE ingest_batches (
                batch_id BIGINT PRIMARY KEY,
                committed_at TIMESTAMPTZ NOT NULL,
                rows_in BIGINT NOT NULL,
                rows_changed BIGINT NOT NULL
            )
            """,
        ],
    ),
    (
        2,
        "forecasts and model events",
        [
            # One row per forecast step. Quantiles come from the sample paths; prob_up is the share of paths
            # whose close at that step is above the origin's close (last_close).
            """
            CREATE TABLE forecasts (
                symbol VARCHAR NOT NULL,
                interval VARCHAR NOT NULL,
                origin_time TIMESTAMPTZ NOT NULL,
                model_version VARCHAR NOT NULL,
                step INTEGER NOT NULL,
                target_time TIMESTAMPTZ NOT NULL,
                issued_at TIMESTAMPTZ NOT NULL,
                sample_paths INTEGER NOT NULL,
                last_close DOUBLE NOT NULL,
                open_mean DOUBLE, open_p10 DOUBLE, open_p50 DOUBLE, open_p90 DOUBLE,
                high_mean DOUBLE, high_p10 DOUBLE, high_p50 DOUBLE, high_p90 DOUBLE,
                low_mean DOUBLE, low_p10 DOUBLE, low_p50 DOUBLE, low_p90 DOUBLE,
                close_mean DOUBLE, close_p10 DOUBLE, close_p50 DOUBLE, close_p90 DOUBLE,
                volume_mean DOUBLE, volume_p10 DOUBLE, volume_p50 DOUBLE, volume_p90 DOUBLE,
                amount_mean DOUBLE, amount_p10 DOUBLE, amount_p50 DOUBLE, amount_p90 DOUBLE,
                prob_up DOUBLE NOT NULL,
                PRIMARY KEY (symbol, interval, origin_time, model_version, step)
            )
            """,
            """
            CREATE TABLE model_events (
                event_time TIMESTAMPTZ NOT NULL,
                kind VARCHAR NOT NULL,
                model_version VARCHAR,
                champion_version VARCHAR,
                run_id VARCHAR,
                details JSON
            )
            """,
        ],
    ),
    (
        3,
        "forecasts: raw close p05/p95 and the calibrated close quantiles and P(up)",
        [
            # The existing columns stay the model's raw output, so every reader written before calibration
            # keeps scoring what the model said. close_p05/close_p95 (raw) give the calibrator the 90 % band
            # when it is warmed from the table; the *_cal columns hold what was published when the forecast was
            # published calibrated (NULL: published raw, or written before this version).
            "ALTER TABLE forecasts ADD COLUMN close_p05 DOUBLE",
            "ALTER TABLE forecasts ADD COLUMN close_p95 DOUBLE",
            "ALTER TABLE forecasts ADD COLUMN close_p10_cal DOUBLE",
            "ALTER TABLE forecasts ADD COLUMN close_p50_cal DOUBLE",
            "ALTER TABLE forecasts ADD COLUMN close_p90_cal DOUBLE",
            "ALTER TABLE forecasts ADD COLUMN prob_up_cal DOUBLE",
        ],
    ),
    (
        4,
        "forecasts: the dense close quantile grid per step, raw and calibrated",
        [
            # The whole grid (default 5 %...95 % in 5 % steps), so the ledger scores a true CRPS by quantile
            # decomposition and the calibrator is warmed on every level, not three. The levels are kept per row:
            # a row stays readable after forecast.quantile_grid changes. close_grid_cal is NULL where the
            # forecast was published raw.
            "ALTER TABLE forecasts ADD COLUMN grid_levels DOUBLE[]",
            "ALTER TABLE forecasts ADD COLUMN close_grid DOUBLE[]",
            "ALTER TABLE forecasts ADD COLUMN close_grid_cal DOUBLE[]",
        ],
    ),
]

LATEST_VERSION = MIGRATIONS[-1][0]


def current_version(con: duckdb.DuckDBPyConnection) -> int:
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchall()[0]
    if not exists or not exists[0]:
        return 0
    row = con.execute("SELECT max(version) FROM schema_version").fetchall()[0]
    return int(row[0]) if row and row[0] is not None else 0


def migrate(con: duckdb.DuckDBPyConnection) -> list[int]:
    """Bring the database up to LATEST_VERSION; returns the versions applied (empty when current).

    A store written by a newer kronosd is refused rather than guessed at.
    """
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, description VARCHAR NOT NULL, applied_at TIMESTAMPTZ NOT NULL)"
    )
    version = current_version(con)
    if version > LATEST_VERSION:
        raise ValueError(
            f"this store has schema version {version}, newer than this kronosd understands "
            f"({LATEST_VERSION}); upgrade kronosd"
        )
    applied = []
    for target, description, statements in MIGRATIONS:
        if target <= version:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            for statement in statements:
                con.execute(statement)
            con.execute("INSERT INTO schema_version VALUES (?, ?, now())", [target, description])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        applied.append(target)
    return applied
