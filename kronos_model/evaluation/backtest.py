"""A long/flat backtest of forecast signals with exchange fees, against buy-and-hold over the same candles.

At each origin the strategy is long for the holding period if the forecast close at the end of the period is
above the last close, flat otherwise. Periods are taken in order as if back to back (with stride = horizon
they are), so a position that stays long across two periods pays no fee; every change of position pays
`fee` (0.1 % per side by default, Binance spot's base rate) on the equity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BINANCE_SPOT_FEE = 0.001


@dataclass
class BacktestResult:
    total_return: float
    sharpe: float  # annualised, from per-period net returns
    max_drawdown: float  # worst peak-to-trough loss of the equity curve, as a positive fraction
    hit_rate: float  # share of long periods with a positive gross return (NaN if never long)
    turnover: float  # position changes per period (1 = enter or leave every period)
    long_share: float  # share of periods spent long
    trades: int  # number of entries
    equity: np.ndarray  # equity after each period, starting from 1

    def to_dict(self) -> dict[str, float | int]:
        return {"total_return": self.total_return, "sharpe": self.sharpe, "max_drawdown": self.max_drawdown,
                "hit_rate": self.hit_rate, "turnover": self.turnover, "long_share": self.long_share,
                "trades": self.trades}


def long_flat_backtest(go_long: np.ndarray, period_return: np.ndarray, periods_per_year: float,
                       fee: float = BINANCE_SPOT_FEE) -> BacktestResult:
    """Run the strategy; `period_return` is close(end of period) / close(origin) - 1 per origin."""
    position = np.asarray(go_long, dtype=np.float64)
    period_return = np.asarray(period_return, dtype=np.float64)
    if position.shape != period_return.shape or position.ndim != 1 or not len(position):
        raise ValueError("go_long and period_return must be non-empty 1-D arrays of the same length")
    # Trades happen at the start of each period, plus closing whatever is held at the very end.
    changes = np.abs(np.diff(np.r_[0.0, position, 0.0]))
    entry_cost = changes[:-1] * fee
    exit_cost = np.zeros_like(position)
    exit_cost[-1] = changes[-1] * fee
    net = (1 - entry_cost) * (1 + position * period_return) * (1 - exit_cost) - 1
    equity = np.cumprod(1 + net)
    peaks = np.maximum.accumulate(np.r_[1.0, equity])
    drawdown = 1 - np.r_[1.0, equity] / peaks
    deviation = net.std(ddof=1) if len(net) > 1 else 0.0
    sharpe = float(net.mean() / deviation * math.sqrt(periods_per_year)) if deviation > 0 else float("nan")
    held = position > 0
    return BacktestResult(
        total_return=float(equity[-1] - 1),
        sharpe=sharpe,
        max_drawdown=float(drawdown.max()),
        hit_rate=float((period_return[held] > 0).mean()) if held.any() else float("nan"),
        turnover=float(changes.sum() / len(position)),
        long_share=float(held.mean()),
        trades=int(np.sum(np.diff(np.r_[0.0, position]) > 0)),
        equity=equity,
    )


def buy_and_hold(period_return: np.ndarray, periods_per_year: float, fee: float = BINANCE_SPOT_FEE) -> BacktestResult:
    """Long in every period: one entry and one exit fee."""
    return long_flat_backtest(np.ones(len(period_return), dtype=bool), period_return, periods_per_year, fee)
