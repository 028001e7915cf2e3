"""The data phase's messages: each one encoded and decoded here, and only here.

Every record plaintext is exactly one message: a type byte, then its body. The
receiver speaks first (HELLO) because bob's receiver never speaks at all, which is how
a sender will tell the two apart. No message type is 0x50 (``P``), so a receiver can
also tell our first message from the start of bob's ``PACK`` stream.

A module of its own so that the wire format reads in one place, apart from the offer's
document (peer/offer.py) and from the state machines that decide which message may come
when (peer/transfer.py). The byte layouts are in ``docs/transfer.md``.
"""

from __future__ import annotations

import hashlib
import re
import struct
from typing import ClassVar, Union

import attrs

from peer.errors import ProtocolError
from peer.offer import _CAPABILITY, PROTOCOL_VERSION, printable
from peer.records import MAX_BIG_RECORD_SIZE, MAX_RECORD_SIZE

__all__ = [
    "DIGEST_SIZE",
    "MAGIC",
    "MAX_BIG_DATA_SIZE",
    "MAX_DATA_SIZE",
    "MAX_REASON_BYTES",
    "Ack",
    "Answer",
    "Check",
    "CompressedData",
    "Data",
    "Done",
    "Error",
    "FileEnd",
    "FileStart",
    "Hello",
    "Message",
    "OfferPart",
    "decode_message",
    "public_digest",
]

MAGIC = b"peer-relay"
"""Starts every HELLO body, so a stray or foreign first record is recognised as such."""

MAX_DATA_SIZE = MAX_RECORD_SIZE - 1
"""File bytes per DATA record: a whole record minus the type byte."""
MAX_BIG_DATA_SIZE = MAX_BIG_RECORD_SIZE - 1
"""File bytes per DATA record under the feature big-records."""

DIGEST_SIZE = 32  # blake3
MAX_REASON_BYTES = 1024
MAX_CAPABILITIES = 64
PUBLIC_DIGEST_SIZE = 14
"""Bytes of the HELLO's digest of the sender's spoke public (see `public_digest`)."""
_PUBLIC_TAG = "pub-"
"""How the public's digest rides in HELLO: as one more capability-shaped item, ``pub-`` and
28 hex digits, because older senders skip capabilities they do not know but refuse any
other extra byte in a HELLO."""


# --- messages ------------------------------------------------------------------------

_U32 = struct.Struct(">I")
_FILE_START = struct.Struct(">IQ")
_RESUME_POINT = struct.Struct(">IQ")
_ACK = struct.Struct(">QQ")
_HELLO_HEAD = struct.Struct(f">{len(MAGIC)}sHB")

_DECLINE = 0
_ACCEPT = 1
_OFFER_MORE = 0x01


def _reason_bytes(reason: str) -> bytes:
    """UTF-8, cut at a character boundary to fit MAX_REASON_BYTES."""
    return reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


def _reason_text(body: bytes | memoryview) -> str:
    if len(body) > MAX_REASON_BYTES:
        raise ProtocolError(f"reason is {len(body)} bytes, over {MAX_REASON_BYTES}")
    return printable(bytes(body).decode("utf-8", "replace"))


def public_digest(public: bytes) -> bytes:
    """What our receiver's HELLO says about the 34-byte spoke public it was announced.

    The handshake binds the salt and the iteration count (both peers stretch the code with
    them) but not the cipher ids, which a relay could rewrite to pass our sender off as bob.
    Inside the encrypted room this digest lets our sender compare the public it sent with
    the one our receiver got. Second preimages are what matter here, and a relay has at
    most a few fields to play with: 112 bits are plenty, and they fit a capability name.
    """
    return hashlib.blake2b(bytes(public), digest_size=PUBLIC_DIGEST_SIZE, person=b"peer-relay pub").digest()


@attrs.frozen
class Hello:
    """r→s, first message: who we are, the highest version and the optional features, and
    (since pack-ack) the digest of the sender's public as we received it.

    The digest travels as one more capability-shaped item (see _PUBLIC_TAG) so that older
    senders, which skip unknown capabilities, still read this HELLO; a HELLO without it
    comes from an older receiver, which cannot confirm the public.
    """

    TYPE: ClassVar[int] = 0x01
    version: int = PROTOCOL_VERSION
    capabilities: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    public_digest: bytes | None = None

    def encode(self) -> bytes:
        names = list(self.capabilities)
        for name in names:
            if not _CAPABILITY.fullmatch(name) or name.startswith(_PUBLIC_TAG):
                raise ValueError(f"invalid capability name {name!r}")
        if self.public_digest is not None:
            if len(self.public_digest) != PUBLIC_DIGEST_SIZE:
                raise ValueError(f"the public's digest must be {PUBLIC_DIGEST_SIZE} bytes")
            names.append(_PUBLIC_TAG + self.public_digest.hex())
        if len(names) > MAX_CAPABILITIES:
            raise ValueError("too many capabilities")
        parts = [bytes([self.TYPE]), _HELLO_HEAD.pack(MAGIC, self.version, len(names))]
        parts += [bytes([len(name)]) + name.encode("ascii") for name in names]
        return b"".join(parts)

    @classmethod
    def decode(cls, body: memoryview) -> Hello:
        if len(body) < _HELLO_HEAD.size:
            raise ProtocolError("hello is too short")
        magic, version, count = _HELLO_HEAD.unpack_from(body)
        if magic != MAGIC:
            raise ProtocolError("hello does not start with the peer-relay magic")
        offset = _HELLO_HEAD.size
        capabilities = []
        digest = None
        for index in range(count):
            if offset >= len(body):
                raise ProtocolError("hello is cut inside its capability list")
            size = body[offset]
            name = bytes(body[offset + 1 : offset + 1 + size])
            offset += 1 + size
            if len(name) != size:
                raise ProtocolError("hello is cut inside a capability name")
            text = name.decode("ascii", "replace")
            if not _CAPABILITY.fullmatch(text):
                raise ProtocolError(f"hello has an invalid capability name {printable(text)!r}")
            if text.startswith(_PUBLIC_TAG):
                if index != count - 1:
                    raise ProtocolError("hello has the digest of the public before its capabilities")
                digest = _public_tag_digest(text)
                continue
            capabilities.append(text)
        if offset != len(body):
            raise ProtocolError("hello has trailing bytes")
        return cls(version, capabilities, digest)


def _public_tag_digest(text: str) -> bytes:
    hexdigits = text[len(_PUBLIC_TAG) :]
    if len(hexdigits) != 2 * PUBLIC_DIGEST_SIZE or not re.fullmatch(r"[0-9a-f]+", hexdigits):
        raise ProtocolError(f"hello has a malformed digest of the public {text!r}")
    return bytes.fromhex(hexdigits)


def _encode_piece(kind: int, more: bool, chunk: bytes | memoryview, what: str) -> bytes:
    """OFFER and ZDATA share one layout: a flags byte (`more`), then 1..32765 bytes."""
    if not 1 <= len(chunk) <= MAX_RECORD_SIZE - 2:
        raise ValueError(f"a {what} holds 1..32765 bytes")
    return bytes([kind, _OFFER_MORE if more else 0]) + bytes(chunk)


def _decode_piece(body: memoryview, what: str) -> tuple[bool, memoryview]:
    if len(body) < 2:
        raise ProtocolError(f"{what} is empty")
    flags = body[0]
    if flags & ~_OFFER_MORE:
        raise ProtocolError(f"{what} has unknown flags {flags:#04x}")
    return bool(flags & _OFFER_MORE), body[1:]


@attrs.frozen
class OfferPart:
    """s→r: a piece of the OFFER JSON; `more` says another piece follows."""

    TYPE: ClassVar[int] = 0x02
    more: bool
    chunk: bytes = attrs.field(converter=bytes)

    def encode(self) -> bytes:
        return _encode_piece(self.TYPE, self.more, self.chunk, "offer piece")

    @classmethod
    def decode(cls, body: memoryview) -> OfferPart:
        return cls(*_decode_piece(body, "offer piece"))


@attrs.frozen
class Answer:
    """r→s: accept (optionally with per-file resume points) or decline with a reason.

    Resume points are `(file entry index, byte offset)` pairs; this version never
    sends any, and refuses them unless a future "resume" feature was negotiated.
    """

    TYPE: ClassVar[int] = 0x03
    accepted: bool
    reason: str = ""
    resume_points: tuple[tuple[int, int], ...] = attrs.field(default=(), converter=tuple)

    def encode(self) -> bytes:
        if not self.accepted:
            if self.resume_points:
                raise ValueError("a decline has no resume points")
            return bytes([self.TYPE, _DECLINE]) + _reason_bytes(self.reason)
        if self.reason:
            raise ValueError("an acceptance has no reason")
        points = b"".join(_RESUME_POINT.pack(index, offset) for index, offset in self.resume_points)
        return bytes([self.TYPE, _ACCEPT]) + _U32.pack(len(self.resume_points)) + points

    @classmethod
    def decode(cls, body: memoryview) -> Answer:
        if len(body) < 1:
            raise ProtocolError("answer is empty")
        decision = body[0]
        if decision == _DECLINE:
            return cls(False, _reason_text(body[1:]))
        if decision != _ACCEPT:
            raise ProtocolError(f"answer has an unknown decision {decision}")
        if len(body) < 1 + _U32.size:
            raise ProtocolError("acceptance is too short")
        (count,) = _U32.unpack_from(body, 1)
        if len(body) != 1 + _U32.size + count * _RESUME_POINT.size:
            raise ProtocolError("acceptance length does not match its resume point count")
        points = [_RESUME_POINT.unpack_from(body, 5 + i * _RESUME_POINT.size) for i in range(count)]
        return cls(True, "", points)


class _FixedMessage:
    """A type byte and integer fields in a fixed struct layout (FILE and ACK)."""

    TYPE: ClassVar[int]
    WHAT: ClassVar[str]
    LAYOUT: ClassVar[struct.Struct]

    def encode(self) -> bytes:
        return bytes([self.TYPE]) + self.LAYOUT.pack(*attrs.astuple(self))

    @classmethod
    def decode(cls, body: memoryview):
        if len(body) != cls.LAYOUT.size:
            raise ProtocolError(f"{cls.WHAT} is {len(body)} bytes, expected {cls.LAYOUT.size}")
        return cls(*cls.LAYOUT.unpack(body))


@attrs.frozen
class FileStart(_FixedMessage):
    """s→r: the bytes of offer entry `index` follow, starting at `offset` (0 for now)."""

    TYPE: ClassVar[int] = 0x04
    WHAT: ClassVar[str] = "file start"
    LAYOUT: ClassVar[struct.Struct] = _FILE_START
    index: int
    offset: int = 0


@attrs.frozen
class Data:
    """s→r: raw bytes of the current file (1..32766 per record; up to MAX_BIG_DATA_SIZE
    under big-records).

    Senders should build these with `SenderSession.data_buffer` instead, which avoids
    copying; `encode` exists for tests and tools.
    """

    TYPE: ClassVar[int] = 0x05
    data: bytes | memoryview

    def encode(self) -> bytes:
        if not 1 <= len(self.data) <= MAX_DATA_SIZE:
            raise ValueError(f"a data message carries 1..{MAX_DATA_SIZE} bytes")
        return bytes([self.TYPE]) + bytes(self.data)

    @classmethod
    def decode(cls, body: memoryview) -> Data:
        if len(body) == 0:
            raise ProtocolError("data message is empty")
        return cls(body)


class _DigestMessage:
    """A type byte and a 32-byte blake3 digest (FILE_END and CHECK share the layout)."""

    TYPE: ClassVar[int]
    WHAT: ClassVar[str]
    digest: bytes

    def encode(self) -> bytes:
        if len(self.digest) != DIGEST_SIZE:
            raise ValueError(f"digest must be {DIGEST_SIZE} bytes")
        return bytes([self.TYPE]) + self.digest

    @classmethod
    def decode(cls, body: memoryview):
        if len(body) != DIGEST_SIZE:
            raise ProtocolError(f"{cls.WHAT} is {len(body)} bytes, expected {DIGEST_SIZE}")
        return cls(body)


@attrs.frozen
class FileEnd(_DigestMessage):
    """s→r: the current file is complete; `digest` is its blake3 over every byte sent."""

    TYPE: ClassVar[int] = 0x06
    WHAT: ClassVar[str] = "file end"
    digest: bytes = attrs.field(converter=bytes)


@attrs.frozen
class Done:
    """s→r: every offered file has been sent."""

    TYPE: ClassVar[int] = 0x07

    def encode(self) -> bytes:
        return bytes([self.TYPE])

    @classmethod
    def decode(cls, body: memoryview) -> Done:
        if len(body):
            raise ProtocolError("done has a body")
        return cls()


@attrs.frozen
class Ack(_FixedMessage):
    """r→s: everything is verified and in place; the counts let the sender cross-check."""

    TYPE: ClassVar[int] = 0x08
    WHAT: ClassVar[str] = "ack"
    LAYOUT: ClassVar[struct.Struct] = _ACK
    file_count: int
    total_bytes: int


@attrs.frozen
class Error:
    """Either way: the transfer is over, for this one-line reason; the sender then closes."""

    TYPE: ClassVar[int] = 0x09
    reason: str

    def encode(self) -> bytes:
        return bytes([self.TYPE]) + _reason_bytes(self.reason)

    @classmethod
    def decode(cls, body: memoryview) -> Error:
        return cls(_reason_text(body))


@attrs.frozen
class CompressedData:
    """s→r (feature zstd): a piece of one zstd frame of the current file; `more` pieces follow.

    The pieces of a frame are consecutive; the frame's rules are in peer/compression.py.
    """

    TYPE: ClassVar[int] = 0x0A
    more: bool
    chunk: bytes | memoryview

    def encode(self) -> bytes:
        return _encode_piece(self.TYPE, self.more, self.chunk, "compressed piece")

    @classmethod
    def decode(cls, body: memoryview) -> CompressedData:
        return cls(*_decode_piece(body, "compressed piece"))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CompressedData)
            and self.more == other.more
            and bytes(self.chunk) == bytes(other.chunk)
        )


@attrs.frozen
class Check(_DigestMessage):
    """s→r (feature resume): the blake3 of the RESUME_CHUNK bytes of the file just sent."""

    TYPE: ClassVar[int] = 0x0B
    WHAT: ClassVar[str] = "check"
    digest: bytes = attrs.field(converter=bytes)


Message = Union[Hello, OfferPart, Answer, FileStart, Data, FileEnd, Done, Ack, Error, CompressedData, Check]
_MESSAGE_TYPES = {
    cls.TYPE: cls
    for cls in (Hello, OfferPart, Answer, FileStart, Data, FileEnd, Done, Ack, Error, CompressedData, Check)
}
_NAMES = {
    Hello: "hello",
    OfferPart: "offer",
    Answer: "answer",
    FileStart: "file start",
    Data: "data",
    FileEnd: "file end",
    Done: "done",
    Ack: "ack",
    Error: "error",
    CompressedData: "compressed data",
    Check: "check",
}


def decode_message(plaintext: bytes | bytearray | memoryview, *, big: bool = False) -> Message:
    """Parse one record plaintext. Raises ProtocolError, and nothing else, on bad input.

    A Data message's `data` is a view into `plaintext`, not a copy. With `big` (we offered
    big-records), a DATA message may be up to MAX_BIG_RECORD_SIZE bytes.
    """
    view = memoryview(plaintext)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if not 1 <= len(view) <= MAX_RECORD_SIZE:
        if not (big and MAX_RECORD_SIZE < len(view) <= MAX_BIG_RECORD_SIZE and view[0] == Data.TYPE):
            largest = MAX_BIG_RECORD_SIZE if big else MAX_RECORD_SIZE
            raise ProtocolError(f"message of {len(view)} bytes (must be 1..{largest}, "
                                f"and only DATA may be over {MAX_RECORD_SIZE})")
    kind = _MESSAGE_TYPES.get(view[0])
    if kind is None:
        if bytes(view[:4]) == b"PACK":
            raise ProtocolError("the peer sends bob's PACK stream, not peer-relay messages")
        raise ProtocolError(f"unknown message type {view[0]:#04x}")
    return kind.decode(view[1:])
