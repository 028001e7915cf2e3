"""Our own data phase: both state machines, and the events they return.

This layer runs between two peer-relay peers once the secure room is open. It never
touches a socket or a file: the driver feeds each record plaintext to a session, gets
an event back, does the disk and network I/O, and asks the session for the next
outgoing plaintexts. The byte layouts and the reasoning are in ``docs/transfer.md``.

What the sessions build on lives apart: the offer, its names and the features
(peer/offer.py), the messages inside the records (peer/messages.py), and the errors
(peer/errors.py).
"""

from __future__ import annotations

import enum
from typing import Iterable, Union

import attrs

from peer import compression
from peer.errors import HandshakeAltered, ProtocolError, TransferError
from peer.messages import (
    _NAMES,
    MAX_BIG_DATA_SIZE,
    MAX_DATA_SIZE,
    MAX_REASON_BYTES,
    Ack,
    Answer,
    Check,
    CompressedData,
    Data,
    Done,
    Error,
    FileEnd,
    FileStart,
    Hello,
    OfferPart,
    decode_message,
    public_digest,
)
from peer.offer import (
    _CAPABILITY,
    BIG_RECORDS,
    FILE,
    MAX_OFFER_BYTES,
    PACK_ACK,
    PROTOCOL_VERSION,
    RESUME,
    TEXT,
    UNKNOWN_SIZE,
    ZSTD,
    Offer,
    OfferEntry,
    format_size,
    os_reason,
    printable,
    verification_string,
)
from peer.records import MAX_BIG_RECORD_SIZE, MAX_RECORD_SIZE

__all__ = [
    "RESUME_CHUNK",
    "Accepted",
    "ChunkChecked",
    "Completed",
    "Declined",
    "FileData",
    "FileFinished",
    "FileStarted",
    "HelloReceived",
    "OfferReceived",
    "PeerError",
    "ReceiverSession",
    "SenderSession",
    "TransferDone",
]
# Re-exported: the drivers (peer/cli.py, sending.py, receiving.py, bob.py) use these as transfer.X.
__all__ += [
    "BIG_RECORDS", "FILE", "MAX_REASON_BYTES", "PACK_ACK", "RESUME", "TEXT", "UNKNOWN_SIZE", "ZSTD",
    "HandshakeAltered", "Offer", "OfferEntry", "ProtocolError",
    "format_size", "os_reason", "printable", "verification_string",
]

RESUME_CHUNK = 16 * 1024 * 1024
"""Under resume, a CHECK follows every this many bytes of a file (counted from its start),
and a resume point is a multiple of it (or the file's size)."""


# --- events --------------------------------------------------------------------------


@attrs.frozen
class HelloReceived:
    """Sender side: the receiver is a peer-relay peer; call `offer_messages()` next."""

    version: int
    capabilities: frozenset[str]


@attrs.frozen
class Accepted:
    """Sender side: the receiver accepted; start sending files."""


@attrs.frozen
class Declined:
    """Sender side: the receiver said no (`reason` may be empty). The session is over."""

    reason: str


@attrs.frozen
class Completed:
    """Sender side: the receiver confirmed every file and byte. Exit 0 after this only."""

    file_count: int
    total_bytes: int


@attrs.frozen
class OfferReceived:
    """Receiver side: show the offer, plan the destination, then `accept()` or `decline()`."""

    offer: Offer


@attrs.frozen
class FileStarted:
    """Receiver side: bytes of `entry` follow from `offset` (a resume point, else 0); open its
    temporary file."""

    entry: OfferEntry
    offset: int = 0


@attrs.frozen
class FileData:
    """Receiver side: the next bytes of the current file, a view valid until the next record."""

    entry: OfferEntry
    data: memoryview


@attrs.frozen
class ChunkChecked:
    """Receiver side (resume): the chunk ending at `offset` should hash to `digest`; verify it,
    make it durable, and journal it."""

    entry: OfferEntry
    offset: int
    digest: bytes


@attrs.frozen
class FileFinished:
    """Receiver side: the file is complete; verify it against `digest` and commit it."""

    entry: OfferEntry
    digest: bytes


@attrs.frozen
class TransferDone:
    """Receiver side: everything was sent; after every commit succeeded, `acknowledge()`."""

    file_count: int
    total_bytes: int


@attrs.frozen
class PeerError:
    """Either side: the peer gave up, for this (printable, one-line) reason."""

    reason: str


SenderEvent = Union[HelloReceived, Accepted, Declined, Completed, PeerError]
ReceiverEvent = Union[OfferReceived, FileStarted, FileData, ChunkChecked, FileFinished, TransferDone, PeerError]


# --- state machines ------------------------------------------------------------------


class _Sender(enum.Enum):
    WAIT_HELLO = "waiting for the receiver's hello"
    HELLO_RECEIVED = "about to send the offer"
    WAIT_ANSWER = "waiting for the receiver's answer"
    SENDING = "between files"
    IN_FILE = "inside a file"
    WAIT_ACK = "waiting for the receiver's acknowledgement"
    PACK = "sending bob's PACK"
    PACK_GREETED = "sending bob's PACK to a peer-relay receiver"
    FINISHED = "finished"
    DECLINED = "declined"
    FAILED = "failed"


class _Receiver(enum.Enum):
    NEW = "not started"
    WAIT_OFFER = "waiting for the offer"
    DECIDING = "deciding on the offer"
    RECEIVING = "between files"
    IN_FILE = "inside a file"
    DONE_RECEIVED = "about to acknowledge"
    FINISHED = "finished"
    DECLINED = "declined"
    FAILED = "failed"


def _resume_problem(offer: Offer, points: Iterable[tuple[int, int]]) -> str | None:
    """Why these resume points are not acceptable for `offer`, or None."""
    seen: set[int] = set()
    for index, offset in points:
        if index in seen:
            return f"entry {index} is resumed twice"
        seen.add(index)
        entry = offer.entries[index] if 0 <= index < len(offer.entries) else None
        if entry is None or not entry.is_file or entry.size is None or entry.file_id is None:
            return f"entry {index} cannot be resumed"
        if not 0 < offset <= entry.size or (offset % RESUME_CHUNK and offset != entry.size):
            return f"{entry.path} cannot be resumed at byte {offset}"
    return None


class _Position:
    """Where a file stands under resume: a CHECK is due at each RESUME_CHUNK boundary."""

    def __init__(self, start: int, checking: bool) -> None:
        self.offset = start
        self.checking = checking
        self._checked = start

    @property
    def check_due(self) -> bool:
        return self.checking and self.offset != self._checked and self.offset % RESUME_CHUNK == 0

    def room(self) -> int | None:
        """Bytes until the next boundary (None when not checking)."""
        if not self.checking:
            return None
        return RESUME_CHUNK - self.offset % RESUME_CHUNK

    def checked(self) -> None:
        self._checked = self.offset


def _check_features(features: Iterable[str]) -> frozenset[str]:
    result = frozenset(features)
    for name in result:
        if not isinstance(name, str) or not _CAPABILITY.fullmatch(name):
            raise ValueError(f"invalid feature name {name!r}")
    return result


class SenderSession:
    """The sender's half of the data phase.

    Order of calls for the driver::

        receive(hello) -> HelloReceived;  send each of offer_messages()
        receive(answer) -> Accepted | Declined
        while (entry := next_file()) is not None:
            send(begin_file(entry))
            while file_remaining:
                count = source.readinto(data_buffer())
                send(data_message(count))        # a view: seal it before reading again
            send(end_file(source_digest))
        send(done());  receive(ack) -> Completed

    or, when no hello came in time (bob's receiver says nothing)::

        fall_back_to_pack();  send bob's PACK
        receive(...) -> HelloReceived (a late hello: the receiver is ours), then Completed
        on a close: a confirmation only if not `pack_needs_ack`, and then an unconfirmed one

    `receive` may also return PeerError at any time (run it concurrently while
    sending); after that, or after `error()`, the session is over. Bad input raises
    ProtocolError; calls out of order raise RuntimeError (a driver bug).

    `public` is the spoke public we announced: a hello that carries the digest of another
    one raises HandshakeAltered.
    """

    def __init__(self, offer: Offer, *, features: Iterable[str] = (), public: bytes | None = None) -> None:
        self.offer = offer
        self._supported = _check_features(features)
        self._public = None if public is None else bytes(public)
        self.features: frozenset[str] = frozenset()
        """What both sides agreed to use, known once the hello has arrived."""
        self.hello: Hello | None = None
        """The receiver's hello, once it came (on time, or late while we sent a PACK)."""
        self.version = PROTOCOL_VERSION
        self._state = _Sender.WAIT_HELLO
        self._failure: ProtocolError | None = None
        self._file_indices = [i for i, entry in enumerate(offer.entries) if entry.is_file]
        self._next_position = 0
        self._current: OfferEntry | None = None
        self._remaining: int | None = 0
        self._unsized_bytes = 0
        self._resume_at: dict[int, int] = {}
        self._position = _Position(0, False)
        # One record-sized buffer reused for every DATA message: the file is read
        # straight into it after the type byte, and the sealer reads it from there.
        self._max_data = MAX_DATA_SIZE
        self._buffer = bytearray(MAX_RECORD_SIZE)
        self._buffer[0] = Data.TYPE
        self._view = memoryview(self._buffer)

    @property
    def finished(self) -> bool:
        """True when the session can do nothing more (completed, declined or failed)."""
        return self._state in (_Sender.FINISHED, _Sender.DECLINED, _Sender.FAILED)

    @property
    def succeeded(self) -> bool:
        """True only after the receiver's ACK matched what was sent."""
        return self._state is _Sender.FINISHED

    def _expect(self, *states: _Sender) -> None:
        if self._state not in states:
            raise RuntimeError(f"not allowed while the sender session is {self._state.value}")

    def receive(self, plaintext: bytes | memoryview) -> SenderEvent:
        """Handle one record from the receiver."""
        if self._failure is not None:
            raise self._failure
        if self.finished:
            raise self._fail("the receiver sent a message after the transfer ended")
        try:
            message = decode_message(plaintext)
        except ProtocolError as exc:
            if self._state is _Sender.WAIT_HELLO:
                raise self._fail(f"the receiver is not a peer-relay peer ({exc})") from None
            raise self._fail(str(exc)) from None
        if isinstance(message, Error):
            self._state = _Sender.FAILED
            return PeerError(message.reason)
        state = self._state
        if state is _Sender.WAIT_HELLO and isinstance(message, Hello):
            return self._on_hello(message)
        if state is _Sender.PACK and isinstance(message, Hello):
            greeted = self._on_hello(message)
            self._state = _Sender.PACK_GREETED
            return greeted
        if state is _Sender.PACK_GREETED and isinstance(message, Ack) and PACK_ACK in self.hello.capabilities:
            return self._on_ack(message)
        if state is _Sender.WAIT_ANSWER and isinstance(message, Answer):
            return self._on_answer(message)
        if state is _Sender.WAIT_ACK and isinstance(message, Ack):
            return self._on_ack(message)
        raise self._fail(f"the receiver sent {_NAMES[type(message)]} while the sender was {state.value}")

    def _fail(self, reason: str) -> ProtocolError:
        self._state = _Sender.FAILED
        self._failure = ProtocolError(reason)
        return self._failure

    def _on_hello(self, hello: Hello) -> HelloReceived:
        if hello.version < 1:
            raise self._fail(f"the receiver speaks version {hello.version}, this sender needs 1")
        if (hello.public_digest is not None and self._public is not None
                and hello.public_digest != public_digest(self._public)):
            self._state = _Sender.FAILED
            self._failure = HandshakeAltered(
                "the relay altered the handshake: the receiver was announced other sender "
                "parameters than we sent (cipher ids rewritten on the way)"
            )
            raise self._failure
        self.hello = hello
        self.version = min(hello.version, PROTOCOL_VERSION)
        self.features = self._supported & frozenset(hello.capabilities)
        if BIG_RECORDS in self.features:
            # The sealer must be told too: see `big_records`.
            self._max_data = MAX_BIG_DATA_SIZE
            self._buffer = bytearray(MAX_BIG_RECORD_SIZE)
            self._buffer[0] = Data.TYPE
            self._view = memoryview(self._buffer)
        self._state = _Sender.HELLO_RECEIVED
        return HelloReceived(hello.version, frozenset(hello.capabilities))

    def _on_answer(self, answer: Answer) -> Accepted | Declined:
        if not answer.accepted:
            self._state = _Sender.DECLINED
            return Declined(answer.reason)
        if answer.resume_points:
            if RESUME not in self.features:
                raise self._fail("the receiver asked to resume files, which was not negotiated")
            problem = _resume_problem(self.offer, answer.resume_points)
            if problem:
                raise self._fail(f"the receiver asked to resume wrongly: {problem}")
            self._resume_at = dict(answer.resume_points)
        self._state = _Sender.SENDING
        return Accepted()

    def _on_ack(self, ack: Ack) -> Completed:
        total = self.offer.total_bytes + self._unsized_bytes
        if (ack.file_count, ack.total_bytes) != (self.offer.file_count, total):
            raise self._fail(
                f"the receiver confirmed {ack.file_count} files and {ack.total_bytes} bytes, "
                f"but {self.offer.file_count} files and {total} bytes were sent"
            )
        self._state = _Sender.FINISHED
        return Completed(ack.file_count, ack.total_bytes)

    def fall_back_to_pack(self) -> None:
        """No hello came in time: we send bob's PACK instead of an offer. Our receiver reads
        that too, and if its hello was only late, it still arrives (see `pack_needs_ack`)."""
        self._expect(_Sender.WAIT_HELLO)
        self._state = _Sender.PACK

    @property
    def pack_needs_ack(self) -> bool:
        """After a PACK: the receiver turned out ours and promised an ACK (pack-ack), so its
        close alone confirms nothing. Without its hello the receiver may be bob, whose
        close after the whole PACK is all it ever says; an older receiver of ours said
        hello but cannot confirm a PACK either."""
        return self._state is _Sender.PACK_GREETED and PACK_ACK in self.hello.capabilities

    @property
    def missing_features(self) -> frozenset[str]:
        """What the offer needs that the receiver did not advertise (known after its hello).

        Not empty means the offer cannot be sent: tell the user (and the receiver) why.
        """
        return self.offer.needed_features() - self.features

    def offer_messages(self) -> list[bytes]:
        """The OFFER records, after the hello: as many as the JSON needs."""
        self._expect(_Sender.HELLO_RECEIVED)
        if self.missing_features:
            raise TransferError(f"the receiver lacks {', '.join(sorted(self.missing_features))}")
        document = self.offer.to_json(version=self.version, features=self.features, with_ids=RESUME in self.features)
        if len(document) > MAX_OFFER_BYTES:
            raise TransferError(
                f"the offer is {format_size(len(document))}, over the {format_size(MAX_OFFER_BYTES)} limit; "
                "send fewer files at once"
            )
        step = MAX_RECORD_SIZE - 2
        pieces = [document[i : i + step] for i in range(0, len(document), step)]
        self._state = _Sender.WAIT_ANSWER
        return [OfferPart(i < len(pieces) - 1, piece).encode() for i, piece in enumerate(pieces)]

    def next_file(self) -> OfferEntry | None:
        """The next file entry to send, or None when all are sent (then call `done()`)."""
        self._expect(_Sender.SENDING)
        if self._next_position == len(self._file_indices):
            return None
        return self.offer.entries[self._file_indices[self._next_position]]

    def start_offset(self, entry: OfferEntry) -> int:
        """Where `entry` starts: the receiver's resume point for it, else 0. Seek there."""
        if entry != self.next_file():
            raise RuntimeError(f"{entry.path} is not the next file to send")
        return self._resume_at.get(self._file_indices[self._next_position], 0)

    @property
    def resuming(self) -> bool:
        """True when CHECKs are due (resume was negotiated): read with chunk digests."""
        return RESUME in self.features

    def begin_file(self, entry: OfferEntry) -> bytes:
        """The FILE message for `entry`, which must be `next_file()`."""
        if entry != self.next_file():
            raise RuntimeError(f"{entry.path} is not the next file to send")
        index = self._file_indices[self._next_position]
        start = self._resume_at.get(index, 0)
        self._current = entry
        self._remaining = None if entry.size is None else entry.size - start
        self._position = _Position(start, self.resuming and entry.size is not None)
        self._state = _Sender.IN_FILE
        return FileStart(index, start).encode()

    @property
    def check_due(self) -> bool:
        """A RESUME_CHUNK boundary was reached: send `check(chunk digest)` before anything else."""
        return self._state is _Sender.IN_FILE and self._position.check_due

    def check(self, digest: bytes) -> bytes:
        """The CHECK message for the chunk that just ended."""
        self._expect(_Sender.IN_FILE)
        if not self._position.check_due:
            raise RuntimeError("no chunk boundary was reached")
        self._position.checked()
        return Check(digest).encode()

    @property
    def file_remaining(self) -> int | None:
        """Bytes of the current file still to send; None while sending a file of unknown size."""
        return self._remaining if self._state is _Sender.IN_FILE else 0

    @property
    def big_records(self) -> bool:
        """Whether DATA messages may be big: the channel's sealer must then allow them."""
        return BIG_RECORDS in self.features

    def _room(self, limit: int | None = None) -> int:
        if limit is None:
            limit = self._max_data
        if self._position.check_due:
            raise RuntimeError("a CHECK is due first")
        room = limit if self._remaining is None else min(limit, self._remaining)
        boundary = self._position.room()
        return room if boundary is None else min(room, boundary)

    def data_buffer(self) -> memoryview:
        """Where to read the next piece of the current file (at most its remaining size, and
        never across a RESUME_CHUNK boundary under resume)."""
        self._expect(_Sender.IN_FILE)
        return self._view[1 : 1 + self._room()]

    def data_message(self, count: int) -> memoryview:
        """The DATA message for the `count` bytes just read into `data_buffer()`.

        The result shares the buffer: seal or copy it before the next `data_buffer()`.
        """
        self._expect(_Sender.IN_FILE)
        if not 1 <= count <= self._room():
            raise ValueError(f"{count} bytes do not fit the data buffer ({self._remaining} remaining)")
        self._sent(count)
        return self._view[: 1 + count]

    def compressed_messages(self, frame: bytes, content_size: int) -> list[bytes]:
        """The ZDATA messages carrying `frame`, one zstd frame of `content_size` bytes of the file.

        Only when zstd was negotiated; the frame comes from `compression.compress_block`.
        """
        self._expect(_Sender.IN_FILE)
        if ZSTD not in self.features:
            raise RuntimeError("zstd was not negotiated")
        if not 1 <= content_size <= self._room(compression.FRAME_CONTENT):
            raise ValueError(f"a frame of {content_size} bytes does not fit ({self._remaining} remaining)")
        if not 1 <= len(frame) <= compression.MAX_FRAME_BYTES:
            raise ValueError(f"a frame of {len(frame)} compressed bytes is out of bounds")
        self._sent(content_size)
        step = MAX_RECORD_SIZE - 2
        last = (len(frame) - 1) // step
        return [
            CompressedData(i < last, frame[i * step : (i + 1) * step]).encode() for i in range(last + 1)
        ]

    def _sent(self, count: int) -> None:
        self._position.offset += count
        if self._remaining is None:
            self._unsized_bytes += count
        else:
            self._remaining -= count

    def end_file(self, digest: bytes) -> bytes:
        """The FILE_END message, once every byte of the file is sent."""
        self._expect(_Sender.IN_FILE)
        if self._remaining:
            raise RuntimeError(f"{self._current.path}: {self._remaining} bytes not sent yet")
        if self._position.check_due:
            raise RuntimeError("a CHECK is due first")
        message = FileEnd(digest).encode()
        self._current = None
        self._next_position += 1
        self._state = _Sender.SENDING
        return message

    def done(self) -> bytes:
        """The DONE message, after the last file; then wait for the ACK."""
        if self.next_file() is not None:
            raise RuntimeError("files are left to send")
        self._state = _Sender.WAIT_ACK
        return Done().encode()

    def error(self, reason: str) -> bytes:
        """An ERROR message telling the receiver why we stop; the session is over."""
        self._state = _Sender.FAILED
        return Error(reason).encode()


class ReceiverSession:
    """The receiver's half of the data phase.

    Order of calls for the driver::

        send(hello())
        receive(...) -> None (more offer pieces) ... -> OfferReceived
        send(accept())   or   send(decline(reason)) and stop
        receive(...) -> FileStarted | FileData | FileFinished, per file, then TransferDone
        send(acknowledge())   # only once every file is committed

    If the sender sends bob's PACK instead (it did not get our hello in time), the driver
    reads that and, with the feature pack-ack, sends `acknowledge_pack(...)` once it is
    verified and in place, or `error(reason)`.

    `sender_public` is the spoke public we were announced: the hello carries its digest.

    `receive` returns PeerError if the sender gives up. Anything the sender does wrong
    (order, sizes, malformed messages) raises ProtocolError, the only exception bad
    input can cause; send `error(str(exc))` and stop. Calls out of order raise
    RuntimeError (a driver bug).
    """

    def __init__(self, *, features: Iterable[str] = (), sender_public: bytes | None = None) -> None:
        self._supported = _check_features(features)
        self._public_digest = None if sender_public is None else public_digest(sender_public)
        self.features: frozenset[str] = frozenset()
        """What the sender chose to use, known once the offer has arrived."""
        self.offer: Offer | None = None
        self._state = _Receiver.NEW
        self._failure: ProtocolError | None = None
        self._offer_buffer = bytearray()
        self._file_indices: list[int] = []
        self._next_position = 0
        self._current: OfferEntry | None = None
        self._remaining: int | None = 0
        self._unsized_bytes = 0
        """Bytes received for files of unknown size: they count in the ACK's total."""
        self._frame = bytearray()
        """The compressed frame being gathered, piece by piece (feature zstd)."""
        self._resume_at: dict[int, int] = {}
        self._position = _Position(0, False)
        self._big = BIG_RECORDS in self._supported

    @property
    def finished(self) -> bool:
        """True when the session can do nothing more (acknowledged, declined or failed)."""
        return self._state in (_Receiver.FINISHED, _Receiver.DECLINED, _Receiver.FAILED)

    def _expect(self, *states: _Receiver) -> None:
        if self._state not in states:
            raise RuntimeError(f"not allowed while the receiver session is {self._state.value}")

    def _fail(self, reason: str) -> ProtocolError:
        self._state = _Receiver.FAILED
        self._failure = ProtocolError(reason)
        return self._failure

    @property
    def big_records(self) -> bool:
        """Whether we offer big records: the channel's opener must then accept them."""
        return self._big

    def hello(self) -> bytes:
        """Our first message, sent as soon as the secure room opens."""
        self._expect(_Receiver.NEW)
        self._state = _Receiver.WAIT_OFFER
        return Hello(PROTOCOL_VERSION, sorted(self._supported), self._public_digest).encode()

    def receive(self, plaintext: bytes | memoryview) -> ReceiverEvent | None:
        """Handle one record from the sender; None means "nothing to do yet"."""
        if self._failure is not None:
            raise self._failure
        if self._state is _Receiver.NEW:
            raise RuntimeError("send hello() before receiving")
        if self.finished:
            raise self._fail("the sender sent a message after the transfer ended")
        try:
            message = decode_message(plaintext, big=self._big)
        except ProtocolError as exc:
            raise self._fail(str(exc)) from None
        if isinstance(message, Error):
            self._state = _Receiver.FAILED
            return PeerError(message.reason)
        state = self._state
        if state is _Receiver.WAIT_OFFER and isinstance(message, OfferPart):
            return self._on_offer_part(message)
        if state is _Receiver.RECEIVING and isinstance(message, FileStart):
            return self._on_file_start(message)
        if state is _Receiver.RECEIVING and isinstance(message, Done):
            return self._on_done()
        if self._frame and not isinstance(message, CompressedData):
            raise self._fail(f"the sender sent {_NAMES[type(message)]} inside a compressed frame")
        if state is _Receiver.IN_FILE and self._position.check_due:
            if not isinstance(message, Check):
                raise self._fail(f"the sender sent {_NAMES[type(message)]} where a check was due")
            self._position.checked()
            return ChunkChecked(self._current, self._position.offset, message.digest)
        if state is _Receiver.IN_FILE and isinstance(message, Data):
            return self._on_data(message)
        if state is _Receiver.IN_FILE and isinstance(message, CompressedData) and ZSTD in self.features:
            return self._on_compressed(message)
        if state is _Receiver.IN_FILE and isinstance(message, FileEnd):
            return self._on_file_end(message)
        raise self._fail(f"the sender sent {_NAMES[type(message)]} while the receiver was {state.value}")

    def _on_offer_part(self, part: OfferPart) -> OfferReceived | None:
        if len(self._offer_buffer) + len(part.chunk) > MAX_OFFER_BYTES:
            raise self._fail(f"the offer is larger than {format_size(MAX_OFFER_BYTES)}")
        self._offer_buffer += part.chunk
        if part.more:
            return None
        try:
            offer, version, features = Offer.from_json(self._offer_buffer)
        except ProtocolError as exc:
            raise self._fail(str(exc)) from None
        self._offer_buffer = bytearray()
        if version != PROTOCOL_VERSION:
            raise self._fail(f"the sender uses version {version}, this receiver speaks {PROTOCOL_VERSION}")
        if not features <= self._supported:
            unknown = ", ".join(sorted(features - self._supported))
            raise self._fail(f"the sender uses features this receiver did not offer: {unknown}")
        if not offer.needed_features() <= features:
            missing = ", ".join(sorted(offer.needed_features() - features))
            raise self._fail(f"the offer needs features the sender did not choose: {missing}")
        self.offer = offer
        self.features = features
        self._file_indices = [i for i, entry in enumerate(offer.entries) if entry.is_file]
        self._state = _Receiver.DECIDING
        return OfferReceived(offer)

    def _on_file_start(self, start: FileStart) -> FileStarted:
        if self._next_position == len(self._file_indices):
            raise self._fail("the sender started a file after the last offered one")
        expected = self._file_indices[self._next_position]
        if start.index != expected:
            raise self._fail(f"the sender started entry {start.index}, expected entry {expected}")
        wanted = self._resume_at.get(expected, 0)
        if start.offset != wanted:
            if not self._resume_at:
                raise self._fail("the sender resumed a file, which was not asked for")
            raise self._fail(f"the sender started entry {expected} at byte {start.offset}, not {wanted}")
        self._current = self.offer.entries[expected]
        size = self._current.size
        self._remaining = None if size is None else size - wanted
        self._position = _Position(wanted, RESUME in self.features and size is not None)
        self._state = _Receiver.IN_FILE
        return FileStarted(self._current, wanted)

    def _on_data(self, data: Data) -> FileData:
        self._count(len(data.data))
        return FileData(self._current, data.data)

    def _on_compressed(self, piece: CompressedData) -> FileData | None:
        if len(self._frame) + len(piece.chunk) > compression.MAX_FRAME_BYTES:
            raise self._fail(f"{self._current.path}: a compressed frame is over {compression.MAX_FRAME_BYTES} bytes")
        self._frame += piece.chunk
        if piece.more:
            return None
        frame, self._frame = self._frame, bytearray()
        try:
            content = compression.inflate_frame(frame, self._remaining)
        except compression.CompressionError as exc:
            raise self._fail(f"{self._current.path}: {exc}") from None
        self._count(len(content))
        return FileData(self._current, memoryview(content))

    def _count(self, size: int) -> None:
        boundary = self._position.room()
        if boundary is not None and size > boundary:
            raise self._fail(f"{self._current.path}: the sender ran past a check point")
        self._position.offset += size
        if self._remaining is None:
            self._unsized_bytes += size
            return
        if size > self._remaining:
            raise self._fail(f"{self._current.path}: the sender sent more bytes than offered")
        self._remaining -= size

    def _on_file_end(self, end: FileEnd) -> FileFinished:
        entry = self._current
        if self._remaining:  # None (size unknown) ends whenever the sender says so
            raise self._fail(
                f"{entry.path}: the sender ended the file after {entry.size - self._remaining} "
                f"of {entry.size} bytes"
            )
        self._current = None
        self._next_position += 1
        self._state = _Receiver.RECEIVING
        return FileFinished(entry, end.digest)

    def _on_done(self) -> TransferDone:
        if self._next_position != len(self._file_indices):
            raise self._fail(
                f"the sender finished after {self._next_position} of {len(self._file_indices)} files"
            )
        self._state = _Receiver.DONE_RECEIVED
        return TransferDone(self.offer.file_count, self.offer.total_bytes + self._unsized_bytes)

    def accept(self, resume_points: dict[int, int] | None = None) -> bytes:
        """ANSWER accepting the offer (after planning the destination).

        `resume_points` maps offer entry indices to the bytes already verified here
        (feature resume); the sender then starts those files there.
        """
        self._expect(_Receiver.DECIDING)
        points = sorted((resume_points or {}).items())
        if points:
            if RESUME not in self.features:
                raise RuntimeError("resume was not negotiated")
            problem = _resume_problem(self.offer, points)
            if problem:
                raise ValueError(problem)
        self._resume_at = dict(points)
        self._state = _Receiver.RECEIVING
        return Answer(True, "", points).encode()

    def decline(self, reason: str = "") -> bytes:
        """ANSWER declining the offer; the session is over."""
        self._expect(_Receiver.DECIDING)
        self._state = _Receiver.DECLINED
        return Answer(False, reason).encode()

    def acknowledge(self) -> bytes:
        """The ACK: call it only once every file is verified and renamed into place."""
        self._expect(_Receiver.DONE_RECEIVED)
        self._state = _Receiver.FINISHED
        return Ack(self.offer.file_count, self.offer.total_bytes + self._unsized_bytes).encode()

    def acknowledge_pack(self, file_count: int, total_bytes: int) -> bytes:
        """The ACK of bob's PACK, which came instead of an offer: call it only once the PACK's
        trailer matched and every file is in place (feature pack-ack)."""
        self._expect(_Receiver.WAIT_OFFER)
        if PACK_ACK not in self._supported:
            raise RuntimeError("pack-ack was not offered")
        self._state = _Receiver.FINISHED
        return Ack(file_count, total_bytes).encode()

    def error(self, reason: str) -> bytes:
        """An ERROR message telling the sender why we stop; the session is over."""
        self._state = _Receiver.FAILED
        return Error(reason).encode()
