"""Data frames into messages, sans I/O: fragments joined, text checked to be UTF-8 as it arrives."""

from __future__ import annotations

import codecs

from websockets.frames import Frame, Opcode


class InvalidUTF8(ValueError):
    pass


class Assembler:
    """Feed TEXT/BINARY/CONT frames; get (payload, binary) for each complete message."""

    def __init__(self) -> None:
        self._parts: list[bytes] | None = None  # None: no message in progress (or it was dropped)
        self._binary = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")()

    def feed(self, frame: Frame) -> tuple[bytes, bool] | None:
        """The message this frame completes, if any; raises InvalidUTF8 as soon as text is not."""
        if frame.opcode is not Opcode.CONT:
            self._binary = frame.opcode is Opcode.BINARY
            self._parts = []
            self._utf8.reset()
        if self._parts is None:
            return None
        if not self._binary:
            try:  # fragment by fragment, so a bad message fails as soon as it is bad
                self._utf8.decode(frame.data, final=frame.fin)
            except UnicodeDecodeError:
                self._parts = None
                raise InvalidUTF8() from None
        self._parts.append(bytes(frame.data))
        if not frame.fin:
            return None
        data, self._parts = b"".join(self._parts), None
        return data, self._binary

    def drop(self) -> None:
        """A fragment was refused: the message it belongs to is never delivered, even in part."""
        self._parts = None
