"""Many pairs end to end: 16 synthetic 1m pairs on our exchange simulator close together every few seconds;
the daemon (a real `kronosd run`) streams them over one websocket connection, stores every candle gap-free,
forecasts every pair of every tick it keeps up with (none starved), publishes on MQTT, and scores the ledger
once per tick rather than once per pair."""

from __future__ import annotations

import time

from daemon_helpers import Daemon, Simulator, Subscriber, daemon_config, snapshot_rows, wait_for

from daemon.simulator.synthetic import synthetic_symbol

PAIRS = 16
MINUTE_MS = 60_000


def test_sixteen_pairs_closing_together_are_all_stored_forecast_and_scored(tmp_path, broker):
    # 1m candles every 6 s of wall time: room for 16 tiny-model forecasts per tick on a loaded CI machine
    simulator = Simulator("2026-01-01T00:00", 10.0, "--pairs", str(PAIRS), "--pairs-interval", "1m",
                          "--pairs-history", "200", "--pairs-future", "600")
    symbols = [synthetic_symbol(i) for i in range(PAIRS)]
    subscriber = Subscriber(broker.port)
    config = daemon_config(tmp_path, simulator, broker.port, symbols=symbols,
                           markets={"intervals": ["1m"], "history_days": 0.1},
                           forecast={"lookback": 48, "horizon": 6, "sample_paths": 4, "score_every": PAIRS})
    daemon = Daemon(config)
    try:
        daemon.wait_event("daemon_ready", 90)

        def ticks_with_every_pair() -> list[str]:
            origins = [{f["origin_time"] for f in subscriber.forecasts(s, "1m")} for s in symbols]
            return sorted(set.intersection(*origins))

        common = wait_for(lambda: len(ticks_with_every_pair()) >= 4 and ticks_with_every_pair(), 150,
                          what="four ticks forecast for every pair")
        assert len(common) >= 4
        time.sleep(2)  # a snapshot after the last of them
        assert daemon.stop() == 0
    finally:
        daemon.finish()
        subscriber.close()
        stats = simulator.stats()
        simulator.close()
    assert stats["ws_connections"] == 1  # 16 streams share one connection (Binance allows 1024)
    snapshot = tmp_path / "state" / "kronos.duckdb"
    per_pair = snapshot_rows(snapshot, "SELECT symbol, count(*), epoch_ms(min(open_time)), epoch_ms(max(open_time)) "
                                       "FROM candles WHERE interval = '1m' GROUP BY symbol ORDER BY symbol")
    assert [row[0] for row in per_pair] == symbols
    for symbol, count, first, last in per_pair:
        assert count == (last - first) // MINUTE_MS + 1, f"{symbol} has holes"  # gap-free
    forecast_pairs = snapshot_rows(snapshot, "SELECT count(DISTINCT symbol) FROM forecasts WHERE interval = '1m'")
    assert forecast_pairs[0][0] == PAIRS
    # every stored forecast of a tick used its own pair's candles: last_close is that pair's close at the origin
    mismatched = snapshot_rows(snapshot, "SELECT count(*) FROM forecasts f JOIN candles c ON c.symbol = f.symbol "
                                         "AND c.interval = f.interval AND c.open_time = f.origin_time "
                                         "WHERE f.step = 1 AND abs(f.last_close - c.close) > 1e-9 * c.close")
    assert mismatched[0][0] == 0
    # ledger scoring is coalesced: one scoring round (one row per pair and version) per `score_every` forecasts
    # at most, not one per forecast
    forecasts = snapshot_rows(snapshot, "SELECT count(DISTINCT (symbol, origin_time)) FROM forecasts")[0][0]
    rounds = snapshot_rows(snapshot, "SELECT max(n) FROM (SELECT count(*) AS n FROM model_events "
                                     "WHERE kind = 'ledger_scores' GROUP BY details->>'symbol')")[0][0]
    assert 1 <= rounds <= forecasts // PAIRS + 1
