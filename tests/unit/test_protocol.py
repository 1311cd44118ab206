"""The native and TraderMade frame parsers: every bad input gets a precise error."""

from __future__ import annotations

import pytest

from edge.protocol import (
    Auth,
    ErrorCode,
    FrameError,
    Ping,
    Since,
    Subscribe,
    Unsubscribe,
    error,
    parse_command,
    parse_login,
    text_frame,
)


def parse(data: str | bytes) -> object:
    return parse_command(data, max_symbols=5)


def test_subscribe_with_id_and_since_parses() -> None:
    cmd = parse('{"op":"subscribe","symbols":["EURUSD","GBPUSD"],"id":1,"since":{"EURUSD":12}}')
    assert cmd == Subscribe(("EURUSD", "GBPUSD"), 1, {"EURUSD": Since(None, 12)})
    cmd = parse('{"op":"subscribe","symbols":["EURUSD"],"since":{"EURUSD":{"epoch":"e7","seq":3}}}')
    assert cmd == Subscribe(("EURUSD",), None, {"EURUSD": Since("e7", 3)})


def test_malformed_since_is_refused() -> None:
    for since in ('{"GBPUSD":1}', '{"EURUSD":-1}', '{"EURUSD":true}', '{"EURUSD":{"seq":1}}',
                  '{"EURUSD":{"epoch":"","seq":1}}', '{"EURUSD":{"epoch":"e1","seq":1,"x":2}}',
                  '{"EURUSD":{"epoch":"bad epoch","seq":1}}', '[1]'):
        with pytest.raises(FrameError):
            parse('{"op":"subscribe","symbols":["EURUSD"],"since":' + since + "}")


def test_unsubscribe_ping_auth_parse() -> None:
    assert parse('{"op":"unsubscribe","symbols":["GBPUSD"],"id":"a"}') == Unsubscribe(("GBPUSD",), "a")
    assert parse('{"op":"ping","id":3}') == Ping(3)
    assert parse('{"op":"auth","key":"k"}') == Auth("k")


@pytest.mark.parametrize(
    ("frame", "fragment"),
    [
        ("not json", "not valid JSON"),
        ("[1,2]", "JSON object"),
        ('{"symbols":["EURUSD"]}', "missing op"),
        ('{"op":"fly"}', "unknown op 'fly'"),
        ('{"op":"subscribe"}', "symbols must be a list"),
        ('{"op":"subscribe","symbols":"EURUSD"}', "symbols must be a list"),
        ('{"op":"subscribe","symbols":[]}', "must not be empty"),
        ('{"op":"subscribe","symbols":["A1","B2","C3","D4","E5","F6"]}', "at most 5 symbols"),
        ('{"op":"subscribe","symbols":["eurusd"]}', "malformed symbol"),
        ('{"op":"subscribe","symbols":["EUR/USD"]}', "malformed symbol"),
        ('{"op":"subscribe","symbols":[42]}', "malformed symbol"),
        ('{"op":"subscribe","symbols":["EURUSD","EURUSD"]}', "duplicate symbols"),
        ('{"op":"subscribe","symbols":["EURUSD"],"since":{"GBPUSD":1}}', "since must map"),
        ('{"op":"subscribe","symbols":["EURUSD"],"since":{"EURUSD":-1}}', "since must map"),
        ('{"op":"ping","id":[1]}', "id must be"),
        ('{"op":"ping","id":true}', "id must be"),
        ('{"op":"auth","key":""}', "auth needs a key"),
    ],
)
def test_bad_frames_get_bad_request_with_reason(frame: str, fragment: str) -> None:
    with pytest.raises(FrameError) as info:
        parse(frame)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert fragment in info.value.message


def test_error_keeps_request_id() -> None:
    with pytest.raises(FrameError) as info:
        parse('{"op":"subscribe","symbols":[],"id":9}')
    assert info.value.id == 9


def test_tradermade_login_parses_comma_separated_symbols() -> None:
    login = parse_login('{"userKey":"k","symbol":"EURUSD, GBPUSD"}', max_symbols=5)
    assert login.key == "k" and login.symbols == ("EURUSD", "GBPUSD")


@pytest.mark.parametrize("frame", ['{"symbol":"EURUSD"}', '{"userKey":"k","symbol":["EURUSD"]}',
                                   '{"userKey":"k","symbol":"eurusd"}', '{"userKey":"k","symbol":""}'])
def test_tradermade_bad_login_is_refused(frame: str) -> None:
    with pytest.raises(FrameError):
        parse_login(frame, max_symbols=5)


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_text_frame_header_matches_rfc6455(size: int) -> None:
    from websockets.frames import Frame, Opcode

    payload = b"x" * size
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


def test_error_frame_shape() -> None:
    import orjson

    assert orjson.loads(error(ErrorCode.RATE_LIMITED, "slow down", 4)) == {
        "type": "error", "id": 4, "code": "rate_limited", "message": "slow down"}


def test_max_rate_is_a_positive_number_of_ticks_a_second() -> None:
    cmd = parse('{"op":"subscribe","symbols":["EURUSD"],"max_rate":2}')
    assert isinstance(cmd, Subscribe) and cmd.max_rate == 2.0
    for bad in ("0", "-1", "true", '"2"', "1001"):
        with pytest.raises(FrameError):
            parse('{"op":"subscribe","symbols":["EURUSD"],"max_rate":' + bad + "}")
