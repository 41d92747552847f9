"""Quality report of a candle series: coverage, gaps, duplicates, OHLC sanity, returns."""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from storage.intervals import format_ms, grid_offset_ms, interval_ms

_YEAR_MS = 365.25 * 24 * 3600 * 1000


def candle_report(frame: pl.DataFrame, symbol: str, interval: str) -> dict[str, Any]:
    """Everything `kronosd stats` prints, as plain data (times as ms and as readable UTC)."""
    step = interval_ms(interval)
    report: dict[str, Any] = {"symbol": symbol, "interval": interval, "rows": frame.height}
    if frame.is_empty():
        report.update(first=None, last=None, expected=0, present=0, missing=0, gaps=[])
        return report
    frame = frame.sort("open_time")
    first, last = int(frame["open_time"][0]), int(frame["open_time"][-1])
    on_grid = frame.filter((pl.col("open_time") - grid_offset_ms(interval)) % step == 0)
    expected = (last - first) // step + 1
    gaps = (
        frame.select(
            pl.col("open_time").alias("before"),
            pl.col("open_time").shift(-1).alias("after"),
        )
        .filter(pl.col("after") - pl.col("before") > step)
        .rows()
    )
    report.update(
        first=first,
        first_utc=format_ms(first),
        last=last,
        last_utc=format_ms(last),
        expected=expected,
        present=on_grid.height,
        missing=expected - on_grid.unique("open_time").height,
        gaps=[
            {
                "from": before + step,
                "until": after,
                "from_utc": format_ms(before + step),
                "until_utc": format_ms(after),
                # whole candles: an off-grid neighbour (a shortened candle) does not make half a candle missing
                "missing_candles": (after - before - 1) // step,
            }
            for before, after in gaps
        ],
        duplicates=frame.height - frame.unique("open_time").height,
        off_grid=frame.height - on_grid.height,
        ohlc_violations=frame.filter(
            (pl.col("low") > pl.min_horizontal("open", "close")) | (pl.col("high") < pl.max_horizontal("open", "close"))
        ).height,
        zero_volume=frame.filter(pl.col("volume") == 0).height,
    )
    consecutive = frame.select(
        (pl.col("close") / pl.col("close").shift(1)).log().alias("log_return"),
        (pl.col("open_time") - pl.col("open_time").shift(1)).alias("step"),
    ).filter(pl.col("step") == step)
    returns = consecutive["log_return"].drop_nulls()
    if returns.len() > 1:
        std = float(returns.std())
        report["returns"] = {
            "count": returns.len(),
            "mean": float(returns.mean()),
            "std": std,
            "min": float(returns.min()),
            "max": float(returns.max()),
            "annualized_volatility": std * math.sqrt(_YEAR_MS / step),
        }
    report["volume"] = {
        "mean": float(frame["volume"].mean()),
        "median": float(frame["volume"].median()),
        "max": float(frame["volume"].max()),
    }
    return report


def format_report(report: dict[str, Any], max_gaps: int = 50) -> str:
    lines = [f"{report['symbol']} {report['interval']}: {report['rows']} rows"]
    if not report["rows"]:
        return lines[0] + " (nothing stored)"
    lines += [
        f"  first {report['first_utc']}, last {report['last_utc']}",
        f"  expected {report['expected']} on the grid, present {report['present']}, missing {report['missing']}",
        f"  duplicates {report['duplicates']}, off-grid rows {report['off_grid']}, "
        f"OHLC violations {report['ohlc_violations']}, zero-volume candles {report['zero_volume']}",
        f"  gaps: {len(report['gaps'])}",
    ]
    for gap in report["gaps"][:max_gaps]:
        lines.append(f"    {gap['from_utc']} .. {gap['until_utc']} ({gap['missing_candles']} candles)")
    if len(report["gaps"]) > max_gaps:
        lines.append(f"    … {len(report['gaps']) - max_gaps} more (use --json for all)")
    if "returns" in report:
        r = report["returns"]
        lines.append(
            f"  log returns: mean {r['mean']:.6f}, std {r['std']:.6f}, min {r['min']:.4f}, max {r['max']:.4f}, "
            f"annualized volatility {r['annualized_volatility']:.1%}"
        )
    v = report["volume"]
    lines.append(f"  volume: mean {v['mean']:.4f}, median {v['median']:.4f}, max {v['max']:.4f}")
    return "\n".join(lines)
