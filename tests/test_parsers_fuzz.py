"""Property-based tests of every parser that reads exchange bytes: whatever comes in, a valid candle row or a
counted rejection comes out, never an exception; and whatever is accepted obeys the candle rules."""

from __future__ import annotations

import io
import json
import math
import zipfile

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.market.kline_files import BadKlineFile, read_archive_zip
from daemon.market.klines import RestPage, parse_rest_klines, parse_rest_row, parse_ws_message
from daemon.market.rejects import Rejection, RejectLog
from storage.intervals import INTERVAL_MS, is_on_grid

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HOUR = 3_600_000
T0 = 1_709_251_200_000  # 2024-03-01, on every grid but the weekly one

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5),
    max_leaves=20,
)


def good_kline(**overrides) -> dict:
    k = {"t": T0, "T": T0 + HOUR - 1, "s": "BTCUSDT", "i": "1h", "o": "100.0", "h": "110.0", "l": "90.0",
         "c": "105.0", "v": "12.5", "n": 42, "x": True, "q": "1300.0", "V": "6.0", "Q": "600.0"}
    k.update(overrides)
    return {"e": "kline", "E": T0 + HOUR, "s": "BTCUSDT", "k": k}


def assert_valid_row(row: dict) -> None:
    assert row["interval"] in INTERVAL_MS and is_on_grid(row["open_time"], row["interval"])
    assert row["open_time"] <= row["close_time"] < row["open_time"] + INTERVAL_MS[row["interval"]]
    prices = [row[name] for name in ("open", "high", "low", "close")]
    assert all(math.isfinite(p) and p > 0 for p in prices)
    assert row["low"] <= min(row["open"], row["close"]) <= max(row["open"], row["close"]) <= row["high"]
    assert row["volume"] >= 0 and math.isfinite(row["volume"])


# -- websocket ----------------------------------------------------------------------------------------------
@FUZZ
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_any_frame_is_understood_or_rejected_never_raises(frame):
    message = parse_ws_message(frame, {("BTCUSDT", "1h")})
    assert message.kind in {"kline", "shutdown", "control", "rejected"}
    if message.kind == "rejected":
        assert isinstance(message.rejection, Rejection) and message.rejection.reason
    if message.row is not None:
        assert_valid_row(message.row)


@FUZZ
@given(st.sampled_from(["t", "T", "s", "i", "o", "h", "l", "c", "v", "n", "x", "q", "V", "Q", "E", "e", "k"]),
       json_values, st.booleans())
def test_a_kline_event_with_any_field_replaced_is_valid_or_rejected(field, value, combined):
    event = good_kline()
    if field in ("E", "e", "k"):
        event[field] = value
    else:
        event["k"][field] = value
    text = json.dumps({"stream": "btcusdt@kline_1h", "data": event} if combined else event)
    message = parse_ws_message(text, {("BTCUSDT", "1h")})
    assert message.kind in {"kline", "rejected", "shutdown", "control"}
    if message.row is not None:
        assert_valid_row(message.row)


@pytest.mark.parametrize(("change", "reason"), [
    ({"c": "NaN"}, "not_finite"), ({"h": "Infinity"}, "not_finite"), ({"o": "1e5x"}, "not_a_number"),
    ({"l": "-1"}, "non_positive_price"), ({"o": "0"}, "non_positive_price"),
    ({"h": "80.0"}, "high_below_low"), ({"c": "120.0"}, "ohlc_inconsistent"), ({"v": "-0.1"}, "negative_volume"),
    ({"t": T0 + 1, "T": T0 + HOUR}, "off_grid"), ({"T": T0 + HOUR}, "close_time_mismatch"),
    ({"t": str(T0)}, "mistyped_field"), ({"x": "true"}, "mistyped_field"), ({"s": "ETHUSDT"}, "unsubscribed"),
    ({"i": "1m"}, "unsubscribed"), ({"t": 17}, "time_out_of_range"),
])
def test_each_broken_rule_is_rejected_with_its_own_reason(change, reason):
    message = parse_ws_message(json.dumps(good_kline(**change)), {("BTCUSDT", "1h")})
    assert message.kind == "rejected" and message.rejection.reason == reason, message


def test_frames_that_are_not_klines():
    subscribed = {("BTCUSDT", "1h")}
    assert parse_ws_message(json.dumps(good_kline()), subscribed).row["close"] == 105.0
    assert parse_ws_message(b"\x00", subscribed).rejection.reason == "binary_frame"
    assert parse_ws_message("{oops", subscribed).rejection.reason == "not_json"
    assert parse_ws_message("[1, 2]", subscribed).rejection.reason == "not_an_object"
    assert parse_ws_message('{"e": "trade", "E": 1}', subscribed).rejection.reason == "unexpected_event"
    assert parse_ws_message("x" * 70_000, subscribed).rejection.reason == "frame_too_large"
    assert parse_ws_message('{"result": null, "id": 1}', subscribed).kind == "control"
    assert parse_ws_message('{"e": "serverShutdown", "E": 5}', subscribed).kind == "shutdown"
    missing = good_kline()
    del missing["k"]["c"]
    assert parse_ws_message(json.dumps(missing), subscribed).rejection.reason == "missing_field"


# -- REST ---------------------------------------------------------------------------------------------------
def rest_row(open_time: int, close: str = "105.0") -> list:
    return [open_time, "100.0", "110.0", "90.0", close, "12.5", open_time + HOUR - 1, "1300.0", 42, "6.0", "600.0",
            "0"]


@FUZZ
@given(json_values)
def test_any_rest_body_gives_rows_inside_the_request_or_rejections(body):
    page = parse_rest_klines(body, "BTCUSDT", "1h", T0, T0 + 10 * HOUR, server_now_ms=T0 + 100 * HOUR)
    assert isinstance(page, RestPage)
    assert page.candles.height == 0 or page.candles["open_time"].is_sorted()


@FUZZ
@given(st.lists(st.one_of(st.integers(min_value=-3, max_value=14).map(lambda i: rest_row(T0 + i * HOUR)),
                          st.lists(json_values, max_size=13)), max_size=25))
def test_rest_pages_with_garbage_overlap_and_disorder_keep_only_valid_rows_in_range(rows):
    start, end = T0, T0 + 10 * HOUR
    page = parse_rest_klines(rows, "BTCUSDT", "1h", start, end, server_now_ms=T0 + 100 * HOUR)
    times = page.candles["open_time"].to_list()
    assert times == sorted(set(times)) and all(start <= t <= end for t in times)
    assert page.newest_open_ms == (max(times) if times else None)
    for row in page.candles.iter_rows(named=True):
        assert_valid_row(row)
    # every row in the body is either kept once or rejected (duplicates and disorder are counted too)
    assert len(times) + len(page.rejections) >= len(rows)


def test_rest_rows_outside_the_request_and_out_of_order_are_counted():
    rows = [rest_row(T0 + 2 * HOUR), rest_row(T0 + HOUR), rest_row(T0 - HOUR), rest_row(T0 + 30 * HOUR),
            rest_row(T0 + HOUR), ["garbage"]]
    page = parse_rest_klines(rows, "BTCUSDT", "1h", T0, T0 + 10 * HOUR, server_now_ms=T0 + 100 * HOUR)
    assert page.candles["open_time"].to_list() == [T0 + HOUR, T0 + 2 * HOUR]
    reasons = sorted(r.reason for r in page.rejections)
    assert reasons == ["duplicate_row", "malformed_row", "out_of_order", "outside_request", "outside_request"]
    # the still-open candle is marked open, so it is never stored
    assert parse_rest_row(rest_row(T0), "BTCUSDT", "1h", server_now_ms=T0 + 10)["is_closed"] is False


# -- archive ------------------------------------------------------------------------------------------------
def zipped(text: str, name: str = "BTCUSDT-1h-2024-03.csv") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, text)
    return buffer.getvalue()


def archive_line(open_time: int) -> str:
    return ",".join(str(v) for v in rest_row(open_time))


@FUZZ
@given(st.binary(max_size=500))
def test_any_bytes_as_an_archive_give_candles_or_a_bad_file_error(data):
    try:
        frame, _ = read_archive_zip(data, "BTCUSDT-1h-2024-03.zip", "BTCUSDT", "1h")
    except BadKlineFile:
        return
    assert isinstance(frame, pl.DataFrame)


@FUZZ
@given(st.lists(st.one_of(st.integers(min_value=0, max_value=20).map(lambda i: archive_line(T0 + i * HOUR)),
                          st.integers(min_value=0, max_value=20).map(lambda i: archive_line((T0 + i * HOUR) * 1000)),
                          st.just("open_time,open,high,low,close,volume,close_time,quote_volume,count,a,b,ignore"),
                          st.text(max_size=60)), min_size=1, max_size=20),
       st.integers(min_value=0, max_value=400))
def test_archive_csvs_with_header_rows_microseconds_garbage_or_truncation_never_raise_anything_else(lines, cut):
    data = zipped("\n".join(lines) + "\n")
    if cut:
        data = data[: max(1, len(data) - cut)]  # a truncated download
    try:
        frame, _ = read_archive_zip(data, "BTCUSDT-1h-2024-03.zip", "BTCUSDT", "1h")
    except BadKlineFile as exc:
        assert str(exc)
        return
    times = frame["open_time"].to_list()
    assert all(T0 <= t <= T0 + 20 * HOUR for t in times), "µs times are converted to ms"


def test_a_month_of_microsecond_and_millisecond_rows_reads_as_milliseconds():
    text = "\n".join([archive_line(T0), archive_line((T0 + HOUR) * 1000)])
    frame, check = read_archive_zip(zipped(text), "BTCUSDT-1h-2024-03.zip", "BTCUSDT", "1h")
    assert frame["open_time"].to_list() == [T0, T0 + HOUR] and check.converted_microseconds == 1


# -- the rejection log ---------------------------------------------------------------------------------------
def test_rejections_are_counted_every_time_but_logged_once_per_reason_and_period(capsys):
    import structlog

    structlog.configure(processors=[structlog.processors.JSONRenderer()],
                        logger_factory=structlog.PrintLoggerFactory())
    try:
        rejects = RejectLog(log_every_s=3600)
        for _ in range(1000):
            rejects.reject("websocket", Rejection("not_json", "garbage"))
        rejects.reject("rest", Rejection("not_json", "garbage"))
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "input_rejected" in line]
    finally:
        structlog.reset_defaults()
    assert rejects.summary() == {"rest:not_json": 1, "websocket:not_json": 1000}
    assert [(line["boundary"], line["count"]) for line in lines] == [("websocket", 1), ("rest", 1)]
