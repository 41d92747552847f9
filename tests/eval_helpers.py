"""Builds a candle store holding real candles and real KronosPredictor forecasts, as the daemon's would.

Used by the ledger tests and runnable by hand to make a demo database:
    python -m tests.eval_helpers OUT.duckdb [CHECKPOINT_DIR]
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from daemon.forecaster import forecast_rows
from daemon.market.kline_files import read_kline_file
from kronos_model import KronosPredictor
from kronos_model.checkpoint import load_pair
from storage.forecasts import insert_forecasts
from storage.store import CandleStore

ROOT = Path(__file__).resolve().parent.parent
ETH = ROOT / "daemon" / "assets" / "data" / "ETHUSDT_1h.parquet"
TINY = ROOT / "daemon" / "assets" / "checkpoints" / "tiny-random"


def kronosd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`kronosd` as users run it: a real subprocess."""
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def build_forecast_store(path: Path, checkpoint: Path = TINY, candles: int = 300, lookback: int = 48,
                         horizon: int = 6, origins: int = 60, pending: int = 3, samples: int = 8,
                         versions: dict[str, float] | None = None) -> Path:
    """Store the last `candles` ETHUSDT 1h candles and forecasts from every one of the last `origins` + `pending`
    candles (the last `pending` origins' targets are partly in the future) for each model version, where a
    version is a sampling temperature of the same checkpoint."""
    versions = versions or {"tiny-v1": 1.0, "tiny-v2": 0.3}
    batch, _ = read_kline_file(ETH, symbol="ETHUSDT", interval="1h")
    batch = batch.tail(candles)
    store = CandleStore(path)
    try:
        store.upsert(batch)
        tokenizer, model = load_pair(checkpoint)
        predictor = KronosPredictor(model, tokenizer, device="cpu")
        times = batch["open_time"].to_numpy()
        values = batch.select("open", "high", "low", "close", "volume", pl.col("quote_volume").alias("amount"))
        values = values.to_pandas()
        step_ms = int(times[1] - times[0])
        ends = np.arange(len(times) - origins - pending, len(times))  # origin = last look-back candle
        frames = [values.iloc[e - lookback + 1 : e + 1].reset_index(drop=True) for e in ends]
        x_times = [pd.to_datetime(times[e - lookback + 1 : e + 1], unit="ms") for e in ends]
        y_times = [pd.to_datetime(times[e] + step_ms * np.arange(1, horizon + 1), unit="ms") for e in ends]
        for version, temperature in versions.items():
            forecasts = predictor.forecast_batch(frames, x_times, y_times, horizon, T=temperature,
                                                 sample_count=samples, seed=7)
            rows = [forecast_rows(f, "ETHUSDT", "1h", int(times[e]), version, int(times[e]) + step_ms)
                    for e, f in zip(ends, forecasts, strict=True)]
            insert_forecasts(store.con, pl.concat(rows))
    finally:
        store.close()
    return path


def latest_candle(path: Path) -> datetime:
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        ms = con.execute("SELECT epoch_ms(max(open_time)) FROM candles").fetchall()[0][0]
    finally:
        con.close()
    return datetime.fromtimestamp(ms / 1000, UTC)


if __name__ == "__main__":
    target = Path(sys.argv[1])
    checkpoint = Path(sys.argv[2]) if len(sys.argv) > 2 else TINY
    print(build_forecast_store(target, checkpoint, candles=1000, lookback=96, horizon=12, origins=500,
                               samples=20, versions={"demo-v1": 1.0, "demo-v1-T0.5": 0.5}))
