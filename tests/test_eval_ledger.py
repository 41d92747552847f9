"""The forecast ledger on a store holding real ETHUSDT candles and real KronosPredictor forecasts."""

from __future__ import annotations

import json
import math
from datetime import timedelta

import duckdb
import numpy as np
import pytest

from daemon.ledger import format_table, parse_window, rolling_scores, score_ledger
from tests.eval_helpers import build_forecast_store, kronosd, latest_candle

ORIGINS, PENDING, HORIZON = 60, 3, 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_forecast_store(tmp_path_factory.mktemp("ledger") / "kronos.duckdb", origins=ORIGINS,
                                pending=PENDING, horizon=HORIZON)


@pytest.fixture
def con(store):
    connection = duckdb.connect(str(store), read_only=True)
    connection.execute("SET TimeZone = 'UTC'")
    yield connection
    connection.close()


def test_scores_match_a_join_done_by_hand(con):
    forecasts = con.execute("SELECT model_version, epoch_ms(target_time), close_p50, close_p10, close_p90, last_close "
                            "FROM forecasts WHERE model_version = 'tiny-v1'").fetchall()
    closes = dict(con.execute("SELECT epoch_ms(open_time), close FROM candles").fetchall())
    realised = [(p50, p10, p90, last, closes[t]) for _, t, p50, p10, p90, last in forecasts if t in closes]
    p50, p10, p90, last, actual = map(np.array, zip(*realised, strict=True))
    scores = {s.model_version: s for s in score_ledger(con)}
    assert set(scores) == {"tiny-v1", "tiny-v2"}
    v1 = scores["tiny-v1"]
    assert v1.scored_steps == len(realised)
    assert v1.pending_steps == len(forecasts) - len(realised) == sum(range(1, HORIZON + 1))
    assert v1.origins == ORIGINS + PENDING - 1  # the newest origin has no closed target yet
    assert v1.mae == pytest.approx(np.abs(p50 - actual).mean())
    assert v1.mae_random_walk == pytest.approx(np.abs(last - actual).mean())
    assert v1.coverage_80 == pytest.approx(((actual >= p10) & (actual <= p90)).mean())
    assert 0 <= v1.dm_pvalue_mae <= 1 and 0 <= v1.brier_prob_up <= 1
    assert v1.symbol == "ETHUSDT" and v1.interval == "1h" and v1.window == "all"


def test_rolling_window_counts_origins_up_to_the_latest_candle(con, store):
    day = rolling_scores(con, window=timedelta(hours=24))
    assert {s.window for s in day} == {"1d"}
    # origins whose open time lies within 24 h of the newest candle, minus the one with nothing realised
    assert all(s.origins == 24 for s in day)
    now = latest_candle(store)
    assert rolling_scores(con, window=timedelta(hours=24), now=now + timedelta(days=30)) == []
    only = score_ledger(con, model_version="tiny-v2", symbol="ETHUSDT", interval="1h")
    assert [s.model_version for s in only] == ["tiny-v2"]
    assert score_ledger(con, symbol="BTCUSDT") == []


def test_scores_are_json_ready_and_print_as_a_table(con):
    scores = score_ledger(con)
    payload = json.loads(json.dumps([s.to_dict() for s in scores]))
    assert payload[0]["beats_random_walk"] in (True, False)
    assert all(v is None or not isinstance(v, float) or math.isfinite(v) for v in payload[0].values())
    assert "tiny-v1" in format_table(scores)


def test_windows_parse():
    assert parse_window("all") is None
    assert parse_window("7d") == timedelta(days=7) and parse_window("90m") == timedelta(minutes=90)
    with pytest.raises(ValueError, match="duration"):
        parse_window("soon")


def test_ledger_command(store):
    result = kronosd("ledger", "--db", str(store), "--json", "--window", "all", "--window", "12h")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {(r["model_version"], r["window"]) for r in rows} == {
        ("tiny-v1", "all"), ("tiny-v2", "all"), ("tiny-v1", "12h"), ("tiny-v2", "12h")}
    table = kronosd("ledger", "--db", str(store), "--symbol", "ethusdt")
    assert table.returncode == 0 and "MAE/RW" in table.stdout and "7d" in table.stdout
    bad = kronosd("ledger", "--db", str(store), "--window", "soon")
    assert bad.returncode == 2 and "duration" in bad.stderr
