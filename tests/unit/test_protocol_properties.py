"""Property tests: whatever a client sends, the parsers answer with a command or a FrameError."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.protocol import Auth, FrameError, Login, Ping, Subscribe, Unsubscribe, parse_command, parse_login
from shared.tick import is_symbol

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
ops = st.sampled_from(["subscribe", "unsubscribe", "ping", "auth", "", "SUBSCRIBE", None])
frames = st.fixed_dictionaries(
    {"op": ops},
    optional={"symbols": json_values | st.lists(st.text(max_size=8), max_size=8), "id": json_values,
              "key": json_values, "since": json_values},
)


def _check_native(data: bytes | str) -> None:
    try:
        cmd = parse_command(data, max_symbols=10)
    except FrameError as exc:
        assert exc.message and exc.code
        return
    assert isinstance(cmd, Subscribe | Unsubscribe | Ping | Auth)
    if isinstance(cmd, Subscribe | Unsubscribe):
        assert 0 < len(cmd.symbols) <= 10 and all(is_symbol(s) for s in cmd.symbols)
        assert len(set(cmd.symbols)) == len(cmd.symbols)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_native_parser(data: bytes) -> None:
    _check_native(data)


@settings(max_examples=500)
@given(json_values)
def test_arbitrary_json_never_crashes_the_native_parser(value: object) -> None:
    _check_native(json.dumps(value))


@settings(max_examples=500)
@given(frames)
def test_near_valid_frames_parse_or_are_refused_precisely(frame: dict[str, object]) -> None:
    _check_native(json.dumps(frame))


@settings(max_examples=300)
@given(st.binary(max_size=200) | json_values.map(json.dumps)
       | st.fixed_dictionaries({"userKey": json_values, "symbol": json_values}).map(json.dumps))
def test_arbitrary_input_never_crashes_the_tradermade_parser(data: bytes) -> None:
    try:
        login = parse_login(data, max_symbols=10)
    except FrameError:
        return
    assert isinstance(login, Login) and login.key and all(is_symbol(s) for s in login.symbols)
