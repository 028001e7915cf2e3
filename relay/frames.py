"""WebSocket frames once the upgrade is done (RFC 6455 §5), sans I/O.

The relay forwards every byte of a WebSocket room through here twice (unmasked from one
peer, framed to the other), so this is a data path, not a detail: frames are decoded as
they arrive, payload is handed out as soon as it is there (never assembled into messages),
and a payload byte is copied once, by the unmasking, or once out of the read buffer when
it was not masked. Unmasking uses websockets' C ``apply_mask`` where it is installed
(about 25 GB/s here, against 0.7 GB/s for the best pure-Python XOR we have as fallback).

No extension is ever negotiated, so a frame with a reserved bit set is an error.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import attrs

try:  # C, from the websockets package: the only fast XOR of a buffer Python has
    from websockets.speedups import apply_mask as _fast_mask
except ImportError:  # pragma: no cover - a platform without its wheel
    _fast_mask = None

__all__ = [
    "Close",
    "FrameError",
    "FrameReader",
    "Payload",
    "Ping",
    "TextMessage",
    "binary_frame",
    "close_frame",
    "mask",
    "pong_frame",
]

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_CONTROL_MAX = 125
_FIN = 0x80
_MASKED = 0x80

PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
INVALID_DATA = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
NO_STATUS = 1005
"""A Close frame without a code: never sent, it only names that case."""

LONGEST_PARTIAL = 14 + _CONTROL_MAX
"""A masked header with a 64-bit length, and the payload of a control frame, whole."""

_SENDABLE_CODES = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015))
"""Codes a Close frame may carry below 3000 (1004-1006 and 1015 are reserved)."""

_IDENTITY = int.from_bytes(bytes(range(256)), "big")
_XOR_TABLES = [(_IDENTITY ^ int.from_bytes(bytes([key]) * 256, "big")).to_bytes(256, "big")
               for key in range(256)]
"""For each key byte, the table that XORs a byte with it: the fallback's ``bytes.translate``.
(Built with whole-table integer XORs: a loop per byte cost every relay start 45 ms.)"""


def mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes | bytearray:
    """``data`` XORed with the 4-byte ``key`` repeated (masking and unmasking are one)."""
    if _fast_mask is not None:
        return _fast_mask(data, key)
    body = bytearray(data)
    for offset in range(4):
        body[offset::4] = body[offset::4].translate(_XOR_TABLES[key[offset]])
    return body


class FrameError(Exception):
    """The other side broke the framing rules; ``code`` is the Close code that says so."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@attrs.frozen
class Payload:
    """Bytes of a binary message, in order; ``last`` when the message ends with them."""

    data: bytes | bytearray
    last: bool


@attrs.frozen
class TextMessage:
    """A text message began. Ours carry bytes only, so the stream refuses it."""


@attrs.frozen
class Ping:
    payload: bytes


@attrs.frozen
class Close:
    """The other side's Close frame: ``NO_STATUS`` when it had no code."""

    code: int
    reason: str


Event = Payload | TextMessage | Ping | Close


class _Wait:
    """Returned where a frame needs more bytes than were fed."""


_WAIT = _Wait()


@attrs.define
class _Frame:
    """The frame whose payload is being read."""

    opcode: int
    fin: bool
    key: bytes | None
    remaining: int
    offset: int = 0
    """Payload bytes of this frame already handed out: where the mask key stands."""


class FrameReader:
    """Frames from one side of an open WebSocket: ``feed`` what was read, then take the
    events. ``masked`` is whether that side's frames must be masked (a client's are, a
    server's must not be). Bytes after a Close frame are ignored; after a ``FrameError``
    the reader is spent and every later call raises it again."""

    def __init__(self, *, masked: bool, max_message: int) -> None:
        self._masked = masked
        self._max_message = max_message
        self._buffer: bytes | bytearray = b""
        self._start = 0
        self._frame: _Frame | None = None
        self._message: int | None = None
        """The opcode of the data message in progress (its next frame is a continuation)."""
        self._message_size = 0
        self._closed = False
        self._failure: FrameError | None = None
        self.empty_frames = 0
        """Frames read that carried no data: control frames, and data frames of no payload.
        They cost the reader as much as any frame but move nothing, so a flood of them is
        counted (``empty_bytes`` their size on the wire) for the caller's limits."""
        self.empty_bytes = 0

    def feed(self, data: bytes | bytearray) -> None:
        if self._closed or not data:
            return
        if self._start == len(self._buffer):
            self._buffer, self._start = data, 0  # the usual case: nothing left over, no copy
        else:
            self._buffer = self._buffer[self._start:] + data
            self._start = 0

    def pending(self) -> int:
        """Bytes fed but not yet given out: at most a frame header and a control frame's
        payload (``LONGEST_PARTIAL``) once the events are drained, however much was fed."""
        return len(self._buffer) - self._start

    def events(self) -> Iterator[Event]:
        """Every event the fed bytes make; stops when more bytes are needed."""
        if self._failure is not None:
            raise self._failure
        try:
            while not self._closed:
                frame = self._frame
                if frame is None:
                    frame = self._frame = self._header()
                    if frame is None:
                        return
                event = self._payload(frame)
                if event is _WAIT:
                    return
                if event is not None:
                    yield event
        except FrameError as error:
            self._failure = error
            self._buffer, self._start = b"", 0
            raise

    def _header(self) -> _Frame | None:
        buffer, start = self._buffer, self._start
        available = len(buffer) - start
        if available < 2:
            return None
        first, second = buffer[start], buffer[start + 1]
        size, at = second & 0x7F, 2
        if size == 126:
            at = 4
        elif size == 127:
            at = 10
        key_at = at
        if second & _MASKED:
            at += 4
        if available < at:
            return None
        if size == 126:
            size = struct.unpack_from("!H", buffer, start + 2)[0]
        elif size == 127:
            size = struct.unpack_from("!Q", buffer, start + 2)[0]
            if size >> 63:
                raise FrameError(PROTOCOL_ERROR, "frame length has its top bit set")
        if first & 0x70:
            raise FrameError(PROTOCOL_ERROR, "reserved bits set (no extension was agreed)")
        if bool(second & _MASKED) != self._masked:
            raise FrameError(PROTOCOL_ERROR, "client frames must be masked" if self._masked
                             else "server frames must not be masked")
        opcode, fin = first & 0x0F, bool(first & _FIN)
        if opcode >= CLOSE:
            if opcode not in (CLOSE, PING, PONG):
                raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            if not fin:
                raise FrameError(PROTOCOL_ERROR, "fragmented control frame")
            if size > _CONTROL_MAX:
                raise FrameError(PROTOCOL_ERROR, "control frame longer than 125 bytes")
        elif opcode == CONTINUATION:
            if self._message is None:
                raise FrameError(PROTOCOL_ERROR, "continuation frame outside a message")
        elif opcode in (TEXT, BINARY):
            if self._message is not None:
                raise FrameError(PROTOCOL_ERROR, "new message before the last one ended")
            self._message, self._message_size = opcode, 0
        else:
            raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if opcode < CLOSE:
            self._message_size += size
            if self._message_size > self._max_message:
                raise FrameError(MESSAGE_TOO_BIG, f"message larger than {self._max_message} bytes")
        if opcode >= CLOSE or not size:
            self.empty_frames += 1
            self.empty_bytes += at + size
        key = bytes(buffer[start + key_at:start + at]) if second & _MASKED else None
        self._start = start + at
        return _Frame(opcode, fin, key, size)

    def _payload(self, frame: _Frame) -> Event | None | _Wait:
        """The next event of ``frame``: data as far as it arrived, a control frame whole;
        None when what was read carries nothing (a pong), ``_WAIT`` for more bytes."""
        buffer, start = self._buffer, self._start
        available = len(buffer) - start
        if frame.opcode >= CLOSE:
            if available < frame.remaining:
                return _WAIT
            payload = self._take(frame, frame.remaining)
            self._frame = None
            return self._control(frame.opcode, bytes(payload))
        if frame.opcode == TEXT or self._message == TEXT:
            # Refused on sight: nothing of it is read (the caller closes the connection).
            self._finish()
            return TextMessage()
        if frame.remaining and not available:
            return _WAIT
        data = self._take(frame, min(frame.remaining, available))
        last = frame.fin and not frame.remaining
        if not frame.remaining:
            self._frame = None
            if frame.fin:
                self._message = None
        return Payload(data, last) if data or last else None

    def _take(self, frame: _Frame, size: int) -> bytes | bytearray:
        start = self._start
        with memoryview(self._buffer) as view:
            piece = view[start:start + size]
            if frame.key is None:
                data = bytes(piece)
            else:
                turn = frame.offset % 4
                data = mask(piece, frame.key[turn:] + frame.key[:turn]) if size else b""
            piece.release()
        self._start = start + size
        frame.offset += size
        frame.remaining -= size
        if self._start == len(self._buffer):
            self._buffer, self._start = b"", 0
        return data

    def _finish(self) -> None:
        """Nothing after this point is read: drop what was fed beyond it."""
        self._closed = True
        self._buffer, self._start = b"", 0

    def _control(self, opcode: int, payload: bytes) -> Event | None:
        if opcode == PING:
            return Ping(payload)
        if opcode == PONG:
            return None  # we never ping: it answers nothing of ours
        self._finish()
        if not payload:
            return Close(NO_STATUS, "")
        if len(payload) == 1:
            raise FrameError(PROTOCOL_ERROR, "Close frame with a 1-byte payload")
        code = int.from_bytes(payload[:2], "big")
        if code not in _SENDABLE_CODES and not 3000 <= code <= 4999:
            raise FrameError(PROTOCOL_ERROR, f"invalid Close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(INVALID_DATA, "Close reason is not valid UTF-8") from None
        return Close(code, reason)


def _header(opcode: int, size: int, key: bytes | None) -> bytes:
    bit = _MASKED if key is not None else 0
    if size < 126:
        head = struct.pack("!BB", _FIN | opcode, size | bit)
    elif size < 1 << 16:
        head = struct.pack("!BBH", _FIN | opcode, 126 | bit, size)
    else:
        head = struct.pack("!BBQ", _FIN | opcode, 127 | bit, size)
    return head if key is None else head + key


def binary_frame(payload: memoryview, masked: bool) -> list[bytes | bytearray | memoryview]:
    """One final binary frame carrying ``payload``, as pieces to write in order: the payload
    itself when unmasked (a server's frames), a masked copy when masked (a client's frames
    must be, with a new random key each)."""
    if not masked:
        return [_header(BINARY, len(payload), None), payload]
    key = os.urandom(4)
    return [_header(BINARY, len(payload), key), mask(payload, key)]


def _control_frame(opcode: int, payload: bytes, masked: bool) -> bytes:
    key = os.urandom(4) if masked else None
    return _header(opcode, len(payload), key) + (bytes(mask(payload, key)) if key else payload)


def pong_frame(payload: bytes, masked: bool) -> bytes:
    return _control_frame(PONG, payload, masked)


def close_frame(code: int | None, reason: str, masked: bool) -> bytes:
    """A Close frame; ``code`` None (or ``NO_STATUS``) for one without a code. The reason is
    cut, on a character boundary, to what a control frame holds."""
    if code is None or code == NO_STATUS:
        return _control_frame(CLOSE, b"", masked)
    text = reason.encode("utf-8")[:_CONTROL_MAX - 2].decode("utf-8", "ignore").encode("utf-8")
    return _control_frame(CLOSE, code.to_bytes(2, "big") + text, masked)
