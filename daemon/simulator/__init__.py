"""The exchange simulator: a Binance-compatible server on 127.0.0.1 that serves real candles on an
accelerated clock, with scripted faults and a hostile profile. `kronosd simulate` and `kronosd demo` run it,
and the tests use it in place of the internet.

It is a separate package from `daemon.market` (our clients) on purpose: it is the other side of the wire,
so it shares no parsing code with the clients it tests, only the candle files it serves.
"""

from daemon.simulator.data import CandleBook, SimClock
from daemon.simulator.faults import FaultPlan
from daemon.simulator.hostile import HostileProfile
from daemon.simulator.server import ExchangeSimulator

__all__ = ["CandleBook", "ExchangeSimulator", "FaultPlan", "HostileProfile", "SimClock"]
