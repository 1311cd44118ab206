"""Sans-I/O pieces of a connection: message assembly with UTF-8 checks, and the lag probe."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from edge.lag import LagProbe
from edge.messages import Assembler, InvalidUTF8


def test_fragments_join_into_one_message() -> None:
    a = Assembler()
    assert a.feed(Frame(Opcode.TEXT, b'{"op":', fin=False)) is None
    assert a.feed(Frame(Opcode.CONT, b'"ping"}', fin=True)) == (b'{"op":"ping"}', False)
    assert a.feed(Frame(Opcode.BINARY, b"\xff")) == (b"\xff", True)


def test_invalid_utf8_fails_at_the_fragment_that_breaks_it() -> None:
    a = Assembler()
    a.feed(Frame(Opcode.TEXT, "é".encode()[:1], fin=False))  # a split code point is fine so far
    with pytest.raises(InvalidUTF8):
        a.feed(Frame(Opcode.CONT, b"\xff", fin=False))
    assert a.feed(Frame(Opcode.CONT, b"x", fin=True)) is None  # the rest of it is never delivered


def test_a_message_with_a_refused_fragment_is_never_delivered_in_part() -> None:
    a = Assembler()
    a.feed(Frame(Opcode.TEXT, b'{"op":"sub', fin=False))
    a.drop()  # the middle fragment was over the frame budget
    assert a.feed(Frame(Opcode.CONT, b'scribe"}', fin=True)) is None
    assert a.feed(Frame(Opcode.TEXT, b"{}")) == (b"{}", False)


def test_lag_probe_measures_only_the_answer_to_the_probe_in_flight() -> None:
    probe = LagProbe()
    first = probe.start(10.0)
    assert not probe.overdue(11.9, 2.0) and probe.overdue(12.1, 2.0)
    assert probe.answered(b"", 12.5) is None  # a keepalive pong, not ours
    assert probe.answered(first, 12.5) == pytest.approx(2.5)
    assert probe.sent is None and not probe.overdue(99.0, 2.0)
    second = probe.start(20.0)
    assert probe.answered(first, 20.1) is None  # a late answer to an older probe
    assert probe.answered(second, 20.2) == pytest.approx(0.2)
