"""The encrypted record layer of the secure room (docs/protocol.md §7), sans I/O.

A `Sealer` turns plaintext into records for one direction; an `Opener` is fed the raw
bytes of the other direction in whatever pieces the transport delivers and hands back
whole plaintext records.  Neither touches a socket, so the same code serves TCP,
WebSocket and the tests.

Wire format of one record: ``len (u16) ‖ ciphertext ‖ tag (16)``, AES-256-GCM with
AAD ``00 01 ‖ len`` and a 20-byte nonce ``base (12) ‖ sequence (u64)``.  The raw bytes
``ff ff ff ff`` are the close marker.

Big records (ours only, never with bob): once both of our peers agreed on it in the data
phase (feature ``big-records``, docs/transfer.md), a record of more than 0x7fff bytes of
plaintext has a 4-byte header ``0x80000000 | len`` (u32; len ≤ MAX_BIG_RECORD_SIZE) and that
header in its AAD.  bob's 2-byte lengths stop at 0x7fff, so a first byte with its top bit
set was never a valid length; the close marker's ``ff ff`` stays unambiguous because a big
length is far below 0x7fff0000.  Python's cost per record, not the cipher's, is what a
transfer spends most on; eight times fewer records cost eight times less of it.
"""

from __future__ import annotations

import enum
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .spoke import CIPHER_AES256_GCM

__all__ = [
    "CLOSE",
    "CLOSED",
    "CIPHER_AES256_GCM",
    "MAX_BIG_RECORD_SIZE",
    "MAX_RECORD_SIZE",
    "Closed",
    "Opener",
    "RecordError",
    "Sealer",
]

MAX_RECORD_SIZE = 0x7FFF  # bob's reader buffer holds 2 + 0x7fff + 16 bytes
MAX_BIG_RECORD_SIZE = 256 * 1024
HEADER_SIZE = 2
BIG_HEADER_SIZE = 4
_BIG_FLAG = 0x8000_0000
TAG_SIZE = 16
SUB_KEY_SIZE = 64
KEY_SIZE = 32
BASE_NONCE_SIZE = 12
CLOSE_LENGTH = 0xFFFF

# The raw, unencrypted close marker.  Readers only look at its first two bytes.
CLOSE = b"\xff\xff\xff\xff"

# The AAD of a record is this fixed prefix (spoke's version 1, big-endian) then len.
_AAD_PREFIX = b"\x00\x01"
_MAX_SEQUENCE = 2**64 - 1


class Closed(enum.Enum):
    """Type of the `CLOSED` sentinel, so type checkers can tell it from bytes."""

    CLOSED = "closed"


# Returned by `Opener.next_record` once the peer's close marker has been read.
CLOSED = Closed.CLOSED


class RecordError(Exception):
    """The incoming stream is corrupt: bad tag, bad length, or cut inside a record."""


def _cipher_for(sub_key: bytes, cipher: int) -> tuple[AESGCM, bytes]:
    """Build the AEAD and base nonce for one direction from its 64-byte sub-key.

    Only AES-256-GCM (id 0) works: the nonce is 20 bytes, which GCM accepts (it
    GHASHes nonces that are not 12 bytes long) but ChaCha20-Poly1305 (12 bytes only)
    and AES-CCM (7..13 bytes) cannot take.  bob has the same limit, which is why it
    only ever sends data in the direction whose cipher is GCM.
    """
    if cipher != CIPHER_AES256_GCM:
        raise ValueError(
            f"cipher id {cipher} cannot carry records: only AES-256-GCM (id 0) accepts "
            "the protocol's 20-byte nonce"
        )
    if len(sub_key) != SUB_KEY_SIZE:
        raise ValueError(f"sub-key must be {SUB_KEY_SIZE} bytes, got {len(sub_key)}")
    return AESGCM(bytes(sub_key[:KEY_SIZE])), bytes(sub_key[KEY_SIZE : KEY_SIZE + BASE_NONCE_SIZE])


def _nonce(base: bytes, sequence: int) -> bytes:
    if sequence > _MAX_SEQUENCE:
        # 2**64 records will not happen, but reusing a nonce must never happen either.
        raise RecordError("record sequence number exhausted")
    return base + sequence.to_bytes(8, "big")


class Sealer:
    """Encrypts one direction of the secure room, one record per `seal` call.

    Record boundaries are visible to the peer (bob's single-file receiver relies on
    them), so callers choose them; `seal_many` is for when they do not matter.
    """

    def __init__(self, sub_key: bytes, cipher: int = CIPHER_AES256_GCM) -> None:
        self._aead, self._base_nonce = _cipher_for(sub_key, cipher)
        self._sequence = 0
        self.big = False
        """Set once the peer agreed to big records: plaintexts up to MAX_BIG_RECORD_SIZE."""

    @property
    def sequence(self) -> int:
        """Sequence number of the next record."""
        return self._sequence

    def seal(self, plaintext: bytes) -> bytes:
        """One record for 1..0x7fff bytes of plaintext (an empty record would break bob)."""
        header, sealed = self.seal_parts(plaintext)
        return header + sealed

    def seal_parts(self, plaintext: bytes) -> tuple[bytes, bytes]:
        """The record as (length header, ciphertext and tag), for a gathered write that
        spares copying 32 KiB just to put two bytes in front of it."""
        size = len(plaintext)
        if not 1 <= size <= MAX_RECORD_SIZE:
            if not (self.big and MAX_RECORD_SIZE < size <= MAX_BIG_RECORD_SIZE):
                largest = MAX_BIG_RECORD_SIZE if self.big else MAX_RECORD_SIZE
                raise ValueError(f"record plaintext must be 1..{largest} bytes, got {size}")
            header = (_BIG_FLAG | size).to_bytes(BIG_HEADER_SIZE, "big")
        else:
            header = size.to_bytes(HEADER_SIZE, "big")
        nonce = _nonce(self._base_nonce, self._sequence)
        sealed = self._aead.encrypt(nonce, plaintext, _AAD_PREFIX + header)
        self._sequence += 1
        return header, sealed

    def seal_many(self, data: bytes, record_size: int = MAX_RECORD_SIZE) -> list[bytes]:
        """Cut `data` into records of at most `record_size` bytes; no data, no records."""
        if not 1 <= record_size <= MAX_RECORD_SIZE:
            raise ValueError(f"record_size must be 1..{MAX_RECORD_SIZE}")
        view = memoryview(data)
        return [self.seal(view[start : start + record_size]) for start in range(0, len(view), record_size)]


class Opener:
    """Decrypts one direction of the secure room from arbitrarily split input.

    Drive it with `feed` for each chunk received, then call `next_record` until it
    returns None (more bytes needed).  It returns `CLOSED`, and keeps returning it,
    once the peer's close marker arrives.  Call `eof` when the transport ends.
    """

    def __init__(self, sub_key: bytes, cipher: int = CIPHER_AES256_GCM) -> None:
        self._aead, self._base_nonce = _cipher_for(sub_key, cipher)
        self._sequence = 0
        # Received bytes are `_buffer[_start:_end]`; those before `_start` are consumed.
        # Records are decrypted straight from the buffer and consumed by moving `_start`;
        # the unconsumed tail (less than a record) moves to the front when room is needed,
        # so each byte is copied at most once however the stream is cut, and not at all
        # when the transport reads into `space()`.
        self._buffer = bytearray()
        self._start = 0
        self._end = 0
        self._closed = False
        self._ended = False
        self.big = False
        """Set when we told the peer we take big records (it may then send them)."""
        # A corrupt stream stays corrupt: every later call re-raises the first error.
        self._failure: RecordError | None = None

    @property
    def closed(self) -> bool:
        """True once the close marker has been read."""
        return self._closed

    @property
    def sequence(self) -> int:
        """Sequence number of the next record to open."""
        return self._sequence

    def feed(self, data: bytes) -> None:
        """Add received bytes.  Anything after the close marker is ignored."""
        if self._ended:
            raise RuntimeError("feed() after eof()")
        if self._closed:
            return
        size = len(data)
        with self.space(size) as room:
            room[:size] = data
        self._end += size

    def space(self, size: int) -> memoryview:
        """Room for `size` more bytes at the end of the buffer, for a transport to receive
        into; then call `filled` with the count. Release the view (``with``) before the
        next call: a buffer with a view alive cannot move."""
        if self._ended:
            raise RuntimeError("space() after eof()")
        buffer, start, end = self._buffer, self._start, self._end
        if start and len(buffer) - end < size:
            buffer[: end - start] = buffer[start:end]
            self._start, self._end = 0, end - start
            start, end = 0, end - start
        if len(buffer) - end < size:
            buffer.extend(bytes(end + size - len(buffer)))
        return memoryview(buffer)[end : end + size]

    def filled(self, count: int) -> None:
        """`count` bytes were received into the last `space()`."""
        if not self._closed:
            self._end += count

    def next_record(self) -> bytes | Literal[Closed.CLOSED] | None:
        """The next plaintext record, `CLOSED`, or None if it has not fully arrived."""
        if self._failure is not None:
            raise self._failure
        if self._closed:
            return CLOSED
        buffer, start, valid = self._buffer, self._start, self._end
        if valid - start < HEADER_SIZE:
            return None
        size = (buffer[start] << 8) | buffer[start + 1]
        if size == CLOSE_LENGTH:
            # Only the first two bytes of the marker matter; drop the rest unread.
            self._closed = True
            buffer.clear()
            self._start = self._end = 0
            return CLOSED
        header_size = HEADER_SIZE
        if size & 0x8000 and self.big:
            if valid - start < BIG_HEADER_SIZE:
                return None
            header_size = BIG_HEADER_SIZE
            size = int.from_bytes(buffer[start : start + BIG_HEADER_SIZE], "big") ^ _BIG_FLAG
            if not MAX_RECORD_SIZE < size <= MAX_BIG_RECORD_SIZE:
                self._failure = RecordError(f"invalid big record length {size:#x}")
                raise self._failure
        elif not 1 <= size <= MAX_RECORD_SIZE:
            self._failure = RecordError(f"invalid record length {size:#06x}")
            raise self._failure
        end = start + header_size + size + TAG_SIZE
        if valid < end:
            return None
        aad = _AAD_PREFIX + bytes(buffer[start : start + header_size])
        nonce = _nonce(self._base_nonce, self._sequence)
        try:
            # The view is released on leaving the block: a bytearray cannot be
            # resized (next `feed`) while a view of it is alive.
            with memoryview(buffer) as view:
                plaintext = self._aead.decrypt(nonce, view[start + header_size : end], aad)
        except InvalidTag:
            self._failure = RecordError(f"record {self._sequence} failed authentication")
            raise self._failure from None
        self._start = end
        self._sequence += 1
        return plaintext

    def eof(self) -> None:
        """The transport ended: clean at a record boundary, corruption inside a record.

        Call it after draining `next_record`; bytes still buffered then are an
        incomplete record.
        """
        self._ended = True
        left_over = self._end - self._start
        if not self._closed and left_over:
            raise RecordError(f"stream ended inside a record, {left_over} bytes left over")
