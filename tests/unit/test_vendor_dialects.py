"""Both vendor dialects without sockets: kabu board pushes (the bid/ask inversion), times, REST
answers and errors; TraderMade catalogue notices; the code@exchange symbol rule."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from ingestor.vendors.base import VendorError
from ingestor.vendors.kabu import (
    REGISTER_LIMIT,
    SYMBOL_NOT_FOUND,
    TOKEN_MISMATCH,
    MalformedPush,
    check,
    parse_push,
    parse_registered,
    parse_time,
    parse_token,
    push_url,
    split_symbol,
    symbols_body,
    token_body,
)
from ingestor.vendors.tradermade import UNKNOWN_PREFIX, unknown_symbols
from shared.tick import is_symbol

# The BoardSuccess example of the kabuステーション API reference (5401 on market 1), trimmed to the
# fields a quote needs plus the ten-deep board's first level, which shows what the names mean.
REFERENCE_BOARD = {
    "Symbol": "5401", "SymbolName": "新日鐵住金", "Exchange": 1, "ExchangeName": "東証１部",
    "CurrentPrice": 2408.0, "CurrentPriceTime": "2020-07-22T15:00:00+09:00",
    "BidQty": 100.0, "BidPrice": 2408.5, "BidTime": "2020-07-22T14:59:59+09:00", "BidSign": "0101",
    "Sell1": {"Time": "2020-07-22T14:59:59+09:00", "Sign": "0101", "Price": 2408.5, "Qty": 100.0},
    "AskQty": 200.0, "AskPrice": 2407.5, "AskTime": "2020-07-22T14:59:59+09:00", "AskSign": "0101",
    "Buy1": {"Time": "2020-07-22T14:59:59+09:00", "Sign": "0101", "Price": 2407.5, "Qty": 200.0},
}


def test_kabu_board_maps_bidprice_to_ask_and_askprice_to_bid() -> None:
    quote = parse_push(orjson.dumps(REFERENCE_BOARD))
    assert quote is not None
    assert quote.symbol == "5401@1"
    # BidPrice is the best SELL quote (Sell1), so it is what a buyer pays: the ask.
    assert quote.ask == REFERENCE_BOARD["Sell1"]["Price"] == REFERENCE_BOARD["BidPrice"]  # type: ignore[index]
    assert quote.bid == REFERENCE_BOARD["Buy1"]["Price"] == REFERENCE_BOARD["AskPrice"]  # type: ignore[index]
    assert quote.bid < quote.ask
    assert quote.mid == (2407.5 + 2408.5) / 2
    # The latest of the quote's times: CurrentPriceTime, 15:00:00 in Tokyo.
    assert quote.ts == int(datetime(2020, 7, 22, 6, 0, 0, tzinfo=UTC).timestamp() * 1000)


def test_kabu_board_without_a_two_sided_quote_is_no_quote() -> None:
    for side in ("BidPrice", "AskPrice"):
        board = dict(REFERENCE_BOARD, **{side: None})
        assert parse_push(orjson.dumps(board)) is None


@pytest.mark.parametrize("raw", [
    b"{oops", b"[1,2]", orjson.dumps(dict(REFERENCE_BOARD, Symbol=None)),
    orjson.dumps(dict(REFERENCE_BOARD, Exchange="1")), orjson.dumps(dict(REFERENCE_BOARD, BidPrice="x")),
    orjson.dumps(dict(REFERENCE_BOARD, AskPrice=True)),
    orjson.dumps({k: v for k, v in REFERENCE_BOARD.items() if not k.endswith("Time")}),
])
def test_kabu_pushes_that_are_not_boards_are_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedPush):
        parse_push(raw)


def test_kabu_times_are_tokyo_time_unless_they_say_otherwise() -> None:
    tokyo = parse_time("2020-07-22T09:00:00+09:00")
    assert tokyo == int(datetime(2020, 7, 22, 0, 0, tzinfo=UTC).timestamp() * 1000)
    assert parse_time("2020-07-22T09:00:00") == tokyo
    assert parse_time("2020-07-22T00:00:00Z") == tokyo
    assert parse_time("not a time") is None and parse_time(None) is None


def test_kabu_errors_carry_the_vendors_code_and_message() -> None:
    body = orjson.dumps({"Code": TOKEN_MISMATCH, "Message": "APIキー不一致"})
    with pytest.raises(VendorError) as info:
        check(401, body)
    assert (info.value.status, info.value.code) == (401, TOKEN_MISMATCH)
    assert "APIキー不一致" in str(info.value)
    for status, code in ((400, SYMBOL_NOT_FOUND), (400, REGISTER_LIMIT)):
        with pytest.raises(VendorError) as info:
            check(status, orjson.dumps({"Code": code, "Message": "x"}))
        assert info.value.code == code
    with pytest.raises(VendorError) as info:
        check(500, b"<html>oops</html>")
    assert info.value.code is None and "oops" in str(info.value)


def test_kabu_requests_and_answers() -> None:
    assert orjson.loads(token_body("pw")) == {"APIPassword": "pw"}
    assert orjson.loads(symbols_body(["9433@1", "7203@3"])) == {  # in priority order, not sorted
        "Symbols": [{"Symbol": "9433", "Exchange": 1}, {"Symbol": "7203", "Exchange": 3}]}
    assert parse_token(check(200, b'{"ResultCode":0,"Token":"abc"}')) == "abc"
    with pytest.raises(VendorError):
        parse_token({"ResultCode": 4, "Token": ""})
    listed = {"RegistList": [{"Symbol": "9433", "Exchange": 1}, {"Symbol": "165060019", "Exchange": 2}]}
    assert parse_registered(listed) == {"9433@1", "165060019@2"}
    with pytest.raises(VendorError):
        parse_registered({"Code": 1})
    assert push_url("http://10.0.0.5:18080/kabusapi") == "ws://10.0.0.5:18080/kabusapi/websocket"
    assert push_url("https://h/kabusapi/") == "wss://h/kabusapi/websocket"


def test_kabu_refused_token_answer_is_told_by_its_result_code_never_its_token() -> None:
    with pytest.raises(VendorError) as info:
        parse_token({"ResultCode": 4001013, "Token": "f5e3a1c0ffee", "Message": "APIパスワード不正"})
    text = str(info.value)
    assert "f5e3a1c0ffee" not in text and "Token" not in text
    assert "4001013" in text and "APIパスワード不正" in text and info.value.code == 4001013
    with pytest.raises(VendorError) as info:
        parse_token({"ResultCode": 9, "Token": "f5e3a1c0ffee"})
    assert "f5e3a1c0ffee" not in str(info.value) and "ResultCode 9" in str(info.value)


def test_symbol_rule_accepts_code_at_exchange_and_forex_pairs() -> None:
    for good in ("9433@1", "165060019@2", "EURUSD", "XAUUSD", "BTCUSDT"):
        assert is_symbol(good), good
    for bad in ("9433", "9433@", "@1", "9433@x", "9433@123", "eurusd", "EU", "94@1", "9433@1 "):
        assert not is_symbol(bad), bad
    assert split_symbol("9433@1") == ("9433", 1)
    with pytest.raises(ValueError):
        split_symbol("EURUSD")


def test_tradermade_catalogue_notice_names_the_unknown_symbols() -> None:
    assert unknown_symbols(UNKNOWN_PREFIX + "NOSUCH, FOOBAR") == ["NOSUCH", "FOOBAR"]
    assert unknown_symbols("User Key Used to many times") == []
