"""The properties the fuzzers check, shared by tests/test_fuzz.py (hypothesis, bounded) and
bench/fuzz.py (long runs: a mutation loop, or atheris when it is installed).

Each ``check_*`` function takes structured input, runs one decoder on it and raises
AssertionError when a property breaks; any other exception escaping is a bug as well. Each
``*_input(data: bytes)`` adapter turns a flat byte string into that structured input, so a
coverage-guided fuzzer that only knows bytes can drive the same checks. ``seeds()`` gives
valid inputs of every target for a mutation fuzzer to start from: random bytes alone rarely
get past the first length or type check.

The properties, per decoder:
- ``relay.wire.Parser``: only WireError for bad input; the same frames and the same verdict
  however the stream is split; frames re-encode to exactly the bytes consumed (modulo hex
  case); a bounded partial packet held once drained; a failed parser stays failed.
- ``peer.records.Opener``: only RecordError; never a plaintext that was not sealed, in
  sealing order (a prefix of what was sent); any split gives the same records; an
  unmodified stream gives every record back.
- ``peer.messages.decode_message``: only ProtocolError; a decoded message re-encodes to the
  same bytes wherever the codec is canonical.
- ``peer.transfer.ReceiverSession`` (driven like receiving.py drives it): only ProtocolError;
  files start in offer order, once each; a file never gets more bytes than offered and ends
  only when it has exactly its size; the transfer is done only after every file; a reason
  from the peer is printable; after an error every later record fails too. With "zstd"
  offered, the same through the decompression path.
- ``peer.compression.inflate_frame`` (a hostile sender's zstd frames): only CompressionError,
  and never more bytes out than the frame may declare (a decompression bomb is refused).
- ``peer.pack.PackReader`` (bob's PACK from a stranger, driven like peer/bob.py): only
  PackError; before the decision nothing spooled but the bytes received; after it never
  more inflated than the headers declared, and exactly the entries the offer showed, each
  file its shown size (or an unknown one); a single file never past its declared size; the
  same events and verdict however the stream is split; nothing left after close; a failed
  reader stays failed.
- ``relay.frames.FrameReader`` (WebSocket frames from a stranger, after the upgrade): only
  FrameError, with a Close code a Close frame may carry; the same messages, control frames
  and verdict however the stream is split; never more than one frame header and a control
  frame's payload held once drained; a failed reader stays failed; a message never larger
  than the cap.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import zlib
from typing import Iterable, Sequence

import attrs
import blake3

from peer import messages, pack, transfer
from peer.errors import ProtocolError
from peer.offer import DIRECTORY, FILE, Offer, OfferEntry, name_problem, printable
from peer.records import CLOSE, CLOSED, MAX_RECORD_SIZE, Opener, RecordError, Sealer
from relay import frames, wire

try:  # zstd frames inside the data phase (feature "zstd"), when this build has them
    from peer import compression
except ImportError:  # pragma: no cover - an older tree
    compression = None
ZSTD = getattr(transfer, "ZSTD", None)
CAN_COMPRESS = compression is not None and ZSTD is not None and compression.available()

SUB_KEY = bytes(range(64))
"""A fixed direction key: the record properties do not depend on its value."""

LONGEST_PARTIAL = max(
    wire.HEADER_SIZE + cls.FIXED + (wire.MAX_IDENTITY + 1 if cls.HAS_IDENTITY else 0) - 1
    for cls in wire.PACKET_TYPES.values()
)
"""The most a drained parser may hold: one byte short of the longest packet (06, 102 bytes)."""


# --- helpers for byte-level adapters -----------------------------------------------------


def cuts_from(data: bytes, length: int) -> list[int]:
    """Split points in 0..length taken from ``data`` (each byte moves the cut forward)."""
    cuts, position = [], 0
    for byte in data:
        position += byte % 97
        if position > length:
            break
        cuts.append(position)
    return cuts


def split_at(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = sorted({min(max(c, 0), len(stream)) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])] or [b""]


def records_from(data: bytes) -> list[bytes]:
    """A list of records from ``u16 length | bytes`` pieces (a short last piece is kept)."""
    records, offset = [], 0
    while offset + 2 <= len(data):
        (size,) = struct.unpack_from(">H", data, offset)
        offset += 2
        records.append(data[offset : offset + size])
        offset += size
    return records


def records_to(records: Iterable[bytes]) -> bytes:
    """The inverse of ``records_from`` (for seeds)."""
    return b"".join(struct.pack(">H", len(r)) + r for r in records)


# --- relay.wire.Parser -------------------------------------------------------------------


def _same_but_hex_case(original: bytes, encoded: bytes) -> bool:
    """The parser accepts A-F in hex fields; the encoder writes a-f. Nothing else may differ."""
    return len(original) == len(encoded) and all(
        o == e or (o in b"ABCDEF" and o + 32 == e) for o, e in zip(original, encoded)
    )


def _parse_whole(stream: bytes) -> tuple[list[wire.Frame], str | None, int]:
    parser = wire.Parser()
    frames: list[wire.Frame] = []
    parser.feed(stream)
    try:
        for frame in parser.frames():
            frames.append(frame)
    except wire.WireError as error:
        return frames, str(error), parser.pending()
    return frames, None, parser.pending()


def check_wire_stream(stream: bytes, cuts: Sequence[int]) -> None:
    """The parser on ``stream``, whole and cut at ``cuts``: see the module docstring."""
    whole_frames, whole_error, whole_pending = _parse_whole(stream)

    # Frames re-encode to the exact bytes they came from, in order.
    consumed = 0
    for frame in whole_frames:
        encoded = frame.encode()
        original = stream[consumed : consumed + len(encoded)]
        assert _same_but_hex_case(original, encoded), (original, encoded)
        consumed += len(encoded)
    if whole_error is None:
        assert consumed + whole_pending == len(stream)
        assert whole_pending <= LONGEST_PARTIAL, whole_pending

    parser = wire.Parser()
    frames: list[wire.Frame] = []
    error: str | None = None
    for piece in split_at(stream, cuts):
        try:
            parser.feed(piece)
            frames.extend(parser.frames())
        except wire.WireError as raised:
            error = str(raised)
            break
        assert parser.pending() <= LONGEST_PARTIAL
    assert frames == whole_frames, "a split changed the frames"
    assert (error is None) == (whole_error is None), (error, whole_error)
    if error is not None:
        # A parser that failed keeps failing: the connection cannot resynchronise.
        for later in (b"", b"000001"):
            try:
                parser.feed(later)
                list(parser.frames())
            except wire.WireError:
                continue
            raise AssertionError("a failed parser accepted more input")


def stream_and_cuts(data: bytes) -> tuple[bytes, list[int]]:
    """The stream adapters' layout: the first byte's low four bits say how many of the next
    bytes are cut positions; the stream follows them."""
    count = data[0] % 16
    return data[1 + count :], cuts_from(data[1 : 1 + count], len(data))


def wire_input(data: bytes) -> None:
    """Byte-level adapter: see ``stream_and_cuts``."""
    if data:
        check_wire_stream(*stream_and_cuts(data))


def wire_seeds() -> list[bytes]:
    public = bytes.fromhex("00010002000000000000001000000002000400112233445566778899aabbccddeeff")
    packets = [
        wire.HelloServer(public), wire.HelloClient(), wire.ServerIdentity(b"127.0.0.1:9"),
        wire.ClientIdentity(b"[::1]:65535"), wire.NewServer(7, public, b"10.0.0.1:1234"),
        wire.ClientValidator(bytes(64)), wire.YAndServerValidator(bytes(32), bytes(64)),
        wire.XAndClientIdentity(bytes(32), b"127.0.0.1:40000"), wire.Agreement(), wire.Closed(3),
        wire.Accepted(), wire.Refused(), wire.RelayFailure(b"C", 5), wire.SpokeFailure(1),
        wire.Done(), wire.Timeout(),
    ]
    streams = [b"\x02" + b"\x05\x11" + b"".join(wire.encode(i + 1, p) for i, p in enumerate(packets))]
    streams += [b"\x00" + wire.encode(0, p) for p in packets]
    return streams


# --- peer.records.Opener -----------------------------------------------------------------


def sealed_stream(messages: Sequence[bytes], close: bool) -> bytes:
    sealer = Sealer(SUB_KEY)
    return b"".join(sealer.seal(m) for m in messages) + (CLOSE if close else b"")


def check_opener(stream: bytes, cuts: Sequence[int], messages: Sequence[bytes],
                 intact: bool) -> None:
    """Feed ``stream`` (sealed ``messages``, maybe modified) to an Opener cut at ``cuts``.

    ``intact`` says the stream is exactly ``sealed_stream(messages, ...)``: then every
    message must come back.
    """
    opener = Opener(SUB_KEY)
    received: list[bytes] = []
    closed = failed = False
    for piece in split_at(stream, cuts):
        opener.feed(piece)
        try:
            while True:
                record = opener.next_record()
                if record is None:
                    break
                if record is CLOSED:
                    closed = True
                    break
                received.append(bytes(record))
        except RecordError:
            failed = True
            break
        if closed:
            break
    assert received == list(messages[: len(received)]), "a record that was never sealed came out"
    if failed:
        try:
            opener.next_record()
        except RecordError:
            pass
        else:
            raise AssertionError("a corrupt opener recovered")
    elif not closed:
        try:
            opener.eof()
        except RecordError:
            assert not intact, "an intact stream was called truncated"
    if intact:
        assert received == list(messages), "records of an intact stream were lost"


def records_input(data: bytes) -> None:
    """Byte-level adapter: sealed messages from ``data``, then ``data`` bytes mutate them."""
    if len(data) < 2:
        return
    mode, count = data[0], data[1] % 8
    body = data[2:]
    messages = [m[:MAX_RECORD_SIZE] for m in records_from(body[: len(body) // 2]) if m][:count]
    close = bool(mode & 1)
    stream = bytearray(sealed_stream(messages, close))
    tail = body[len(body) // 2 :]
    intact = True
    # Each pair of tail bytes flips one bit of the stream (mode bit 1 on), or cuts it short.
    if mode & 2 and stream:
        for i in range(0, len(tail) - 1, 2):
            position = (tail[i] << 8 | tail[i + 1]) % len(stream)
            stream[position] ^= 1 << (tail[i] % 8)
            intact = False
    if mode & 4 and stream and tail:
        del stream[tail[0] * 131 % len(stream) :]
        intact = False
    check_opener(bytes(stream), cuts_from(tail, len(stream)), messages, intact)


def records_seeds() -> list[bytes]:
    return [
        bytes([0, 3]) + records_to([b"a", b"bc" * 40, bytes(300)]) + bytes(20),
        bytes([1, 2]) + records_to([b"x" * 1000, b"y"]) + b"\x01\x02\x03\x04",
        bytes([3, 1]) + records_to([b"hello"]) + b"\x00\x07\x00\x09",
        bytes([4, 2]) + records_to([b"one", b"two"]) + b"\x05",
    ]


# --- peer.messages.decode_message --------------------------------------------------------

_CANONICAL = tuple(
    getattr(messages, name) for name in (
        "Hello", "OfferPart", "FileStart", "Data", "FileEnd", "Done", "Ack", "CompressedData", "Check")
    if hasattr(messages, name)
)
"""Types whose decoding is one-to-one: re-encoding gives the input back. (So is an accepting
Answer; reasons are not: they are made printable, which is the point.)"""


def check_decode(plaintext: bytes) -> None:
    try:
        message = messages.decode_message(plaintext)
    except ProtocolError as error:
        assert "\n" not in str(error), "a protocol error message spans lines"
        return
    if isinstance(message, _CANONICAL):
        assert message.encode() == plaintext, (message, plaintext)
    elif isinstance(message, messages.Answer) and message.accepted:
        assert message.encode() == plaintext, (message, plaintext)
    elif isinstance(message, (messages.Answer, messages.Error)):
        # A decline's or an error's reason: shown to the user, so printable and short. (Not
        # re-encodable byte for byte: invalid UTF-8 becomes U+FFFD, which takes 3 bytes.)
        assert printable(message.reason) == message.reason
        assert len(message.reason) <= messages.MAX_REASON_BYTES


def message_input(data: bytes) -> None:
    check_decode(data)


def message_seeds() -> list[bytes]:
    return [m.encode() for m in _sample_messages()]


def _sample_messages() -> list:
    return [
        messages.Hello(1, ("resume",)), messages.Hello(1, ("resume", "pack-ack"), bytes(range(14))),
        messages.OfferPart(False, b"{}"),
        messages.Answer(True), messages.Answer(False, "no"), messages.Answer(True, "", [(1, 5)]),
        messages.FileStart(1, 0), messages.Data(b"abc"), messages.FileEnd(bytes(32)),
        messages.Done(), messages.Ack(1, 3), messages.Error("disk full"),
    ]


# --- peer.transfer.ReceiverSession -------------------------------------------------------


def valid_transfer(files: Sequence[tuple[str, bytes]], *, directories: Sequence[str] = (),
                   offer_piece: int = MAX_RECORD_SIZE - 2, data_piece: int = messages.MAX_DATA_SIZE,
                   compress: bool = False) -> list[bytes]:
    """The sender's records of a whole honest transfer (after the receiver's hello).

    With ``compress`` (needs zstd), files go as zstd frames where that pays, as DATA where not,
    the way our sender does.
    """
    entries = [OfferEntry(DIRECTORY, d) for d in directories]
    entries += [OfferEntry(FILE, name, len(content)) for name, content in files]
    offer = Offer(entries)
    compress = compress and CAN_COMPRESS
    document = offer.to_json(features=[ZSTD] if compress else [])
    pieces = [document[i : i + offer_piece] for i in range(0, len(document), offer_piece)]
    records = [messages.OfferPart(i < len(pieces) - 1, p).encode() for i, p in enumerate(pieces)]
    for index, entry in enumerate(offer.entries):
        if not entry.is_file:
            continue
        content = dict(files)[entry.path]
        records.append(messages.FileStart(index).encode())
        step = compression.FRAME_CONTENT if compress else data_piece
        for start in range(0, len(content), step):
            block = content[start : start + step]
            frame = compression.compress_block(block) if compress else None
            if frame is None:
                records += [messages.Data(block[i : i + data_piece]).encode()
                            for i in range(0, len(block), data_piece)]
            else:
                cut = MAX_RECORD_SIZE - 2
                last = (len(frame) - 1) // cut
                records += [messages.CompressedData(i < last, frame[i * cut : (i + 1) * cut]).encode()
                            for i in range(last + 1)]
        records.append(messages.FileEnd(blake3.blake3(content).digest()).encode())
    records.append(messages.Done().encode())
    return records


def check_receiver(records: Sequence[bytes], *, decline: bool = False,
                   features: Iterable[str] = ()) -> list[object]:
    """Drive a ReceiverSession with ``records``; check every event; return the events.

    The driver part mirrors peer/receiving.py: accept (or decline) on the offer, acknowledge
    on TransferDone, stop at the first ProtocolError or PeerError. ``features`` are those the
    receiver offers (say "zstd" to reach the decompression path).
    """
    features = frozenset(features)
    session = transfer.ReceiverSession(features=features)
    session.hello()
    events: list[object] = []
    offer: Offer | None = None
    order: list[OfferEntry] = []
    current: OfferEntry | None = None
    received = 0
    finished: list[OfferEntry] = []
    for record in records:
        try:
            event = session.receive(record)
        except ProtocolError as error:
            assert "\n" not in str(error)
            try:
                session.receive(records[0] if records else b"\x07")
            except ProtocolError:
                pass
            else:
                raise AssertionError("a failed receiver session accepted another record")
            assert session.finished
            return events
        events.append(event)
        if event is None:
            # Only a piece of the offer, or (zstd) of a compressed frame, waits for more.
            assert offer is None or (current is not None and ZSTD in features), \
                "a record was swallowed without an event"
            continue
        if isinstance(event, transfer.OfferReceived):
            assert offer is None, "two offers"
            offer = event.offer
            for entry in offer.entries:
                assert name_problem(entry.path) is None, entry.path
            order = [e for e in offer.entries if e.is_file]
            if decline:
                session.decline("no thanks")
                assert session.finished
                return events
            session.accept()
        elif isinstance(event, transfer.FileStarted):
            assert offer is not None and current is None
            assert event.entry == order[len(finished)], "a file out of offer order"
            assert getattr(event, "offset", 0) == 0, "a file resumed that nobody asked to resume"
            current, received = event.entry, 0
        elif isinstance(event, transfer.FileData):
            assert current is not None and event.entry == current
            received += len(event.data)
            assert len(event.data) > 0
            assert current.size is None or received <= current.size, "more bytes than offered"
        elif _CHUNK_CHECKED is not None and isinstance(event, _CHUNK_CHECKED):
            assert current is not None and event.entry == current
            assert event.offset == received, "a check point elsewhere than the bytes received"
        elif isinstance(event, transfer.FileFinished):
            assert current is not None and event.entry == current
            assert current.size is None or received == current.size, "a file ended short"
            assert len(event.digest) == messages.DIGEST_SIZE
            finished.append(current)
            current = None
        elif isinstance(event, transfer.TransferDone):
            assert offer is not None and current is None
            assert finished == order, "done before every file"
            assert (event.file_count, event.total_bytes) == (offer.file_count, offer.total_bytes)
            session.acknowledge()
            assert session.finished
        elif isinstance(event, transfer.PeerError):
            assert printable(event.reason) == event.reason
            assert len(event.reason) <= messages.MAX_REASON_BYTES
            assert session.finished
            return events
        else:
            raise AssertionError(f"unexpected event {event!r}")
    return events


_CHUNK_CHECKED = getattr(transfer, "ChunkChecked", None)


def receiver_features(flags: int) -> list[str]:
    return [ZSTD] if flags & 2 and ZSTD is not None else []


def receiver_input(data: bytes) -> None:
    """Byte-level adapter: first byte bit 0 declines the offer, bit 1 offers zstd; then the
    records."""
    if not data:
        return
    check_receiver(records_from(data[1:]), decline=bool(data[0] & 1),
                   features=receiver_features(data[0]))


def receiver_seeds() -> list[bytes]:
    honest = valid_transfer([("a.txt", b"hello"), ("d/b", bytes(40_000)), ("e", b"")],
                            directories=["d"], data_piece=1000)
    small = valid_transfer([("x", b"12345")], offer_piece=17)
    seeds = [b"\x00" + records_to(honest), b"\x00" + records_to(small),
             b"\x00" + records_to(small[:2] + [messages.Error("stop").encode()])]
    if CAN_COMPRESS:
        packed = valid_transfer([("t.txt", b"compressible " * 5000), ("r", bytes(range(256)) * 9)],
                                compress=True)
        seeds.append(b"\x02" + records_to(packed))
    return seeds


def mutate_records(records: list[bytes], rng: random.Random, count: int = 1) -> list[bytes]:
    """Structure-aware mutations of a record list: drop, repeat, swap, cut, flip, forge."""
    records = list(records)
    forged = [m.encode() for m in _sample_messages()] + [
        messages.FileStart(0).encode(), messages.FileStart(2**32 - 1).encode(),
        messages.Data(b"\x00" * 100).encode(), messages.Ack(0, 0).encode(),
        messages.OfferPart(False, json.dumps({"version": 1, "entries": []}).encode()).encode(),
    ]
    for _ in range(count):
        if not records:
            records.append(rng.choice(forged))
            continue
        i = rng.randrange(len(records))
        kind = rng.randrange(7)
        if kind == 0:
            del records[i]
        elif kind == 1:
            records.insert(i, records[i])
        elif kind == 2:
            j = rng.randrange(len(records))
            records[i], records[j] = records[j], records[i]
        elif kind == 3:
            records[i] = records[i][: rng.randrange(len(records[i]) + 1)]
        elif kind == 4 and records[i]:
            raw = bytearray(records[i])
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            records[i] = bytes(raw)
        elif kind == 5:
            records.insert(i, rng.choice(forged))
        else:
            records[i] = records[i] + bytes([rng.randrange(256)])
    return records


# --- peer.compression.inflate_frame (feature zstd) ----------------------------------------


def check_inflate(frame: bytes, limit: int | None) -> None:
    """A hostile sender's zstd frame: only CompressionError, and never more than allowed."""
    try:
        content = compression.inflate_frame(frame, limit)
    except compression.CompressionError as error:
        assert "\n" not in str(error)
        return
    bound = compression.FRAME_CONTENT if limit is None else min(compression.FRAME_CONTENT, limit)
    assert 1 <= len(content) <= bound, (len(content), bound)


def zstd_input(data: bytes) -> None:
    """Byte-level adapter: two bytes of limit (0: unknown size), then the frame."""
    if len(data) < 2 or not CAN_COMPRESS:
        return
    limit = int.from_bytes(data[:2], "big") * 64
    check_inflate(data[2:], limit or None)


def zstd_seeds() -> list[bytes]:
    if not CAN_COMPRESS:
        return [b"\x00\x00"]
    blocks = [b"a" * 1000, b"hello world " * 300, bytes(range(256)) * 40, b"\x00" * 65536]
    return [b"\xff\xff" + frame for frame in map(compression.compress_block, blocks) if frame]


# --- relay.frames.FrameReader ---------------------------------------------------------------

FRAME_CAP = 4096
"""A small message cap, so that the size rule is reached by short inputs."""


def _read_frames(stream: bytes, cuts: Sequence[int], masked: bool) -> tuple[list, int | None, frames.FrameReader]:
    """Every event (a message's payload joined into one) and the Close code of a failure."""
    reader = frames.FrameReader(masked=masked, max_message=FRAME_CAP)
    events: list = []
    message = bytearray()
    for piece in split_at(stream, cuts):
        reader.feed(piece)
        try:
            for event in reader.events():
                if isinstance(event, frames.Payload):
                    message += event.data
                    assert len(message) <= FRAME_CAP, "a message grew past the cap"
                    if event.last:
                        events.append(("message", bytes(message)))
                        message.clear()
                else:
                    events.append(event)
        except frames.FrameError as error:
            assert error.code in (frames.PROTOCOL_ERROR, frames.INVALID_DATA, frames.MESSAGE_TOO_BIG)
            assert error.reason and "\n" not in error.reason
            return events, error.code, reader
        assert reader.pending() <= frames.LONGEST_PARTIAL, reader.pending()
    return events, None, reader


def check_frame_stream(stream: bytes, cuts: Sequence[int], masked: bool) -> None:
    """The frame reader on ``stream``, whole and cut at ``cuts``: see the module docstring."""
    whole_events, whole_failure, _ = _read_frames(stream, [], masked)
    events, failure, reader = _read_frames(stream, cuts, masked)
    assert failure == whole_failure, (failure, whole_failure)
    assert events == whole_events, "a split changed the frames"
    if failure is not None:
        reader.feed(b"\x82\x00")
        try:
            list(reader.events())
        except frames.FrameError:
            return
        raise AssertionError("a failed frame reader accepted more input")


def frames_input(data: bytes) -> None:
    """Byte-level adapter: ``stream_and_cuts``, and the first byte's top bit says masked."""
    if data:
        check_frame_stream(*stream_and_cuts(data), masked=bool(data[0] & 0x80))


def frame_seeds() -> list[bytes]:
    seeds = []
    for masked in (False, True):
        stream = b"".join(bytes(p) for p in frames.binary_frame(memoryview(b"hello relay"), masked))
        stream += b"".join(bytes(p) for p in frames.binary_frame(memoryview(bytes(300)), masked))
        stream += frames.pong_frame(b"pong", masked) + frames.close_frame(1000, "bye", masked)
        seeds.append(bytes([0x82 if masked else 0x02]) + b"\x03\x20" + stream)
    return seeds


# --- peer.pack.PackReader (bob's PACK from a stranger) --------------------------------------

PACK_LIMITS = pack.PackLimits(
    max_objects=1000, max_object_size=1 << 20, max_described=1 << 16, max_identified=1 << 18,
    max_entries=1000, memory_spool=1 << 20,
)
"""Small bounds, so that a mutated size field costs little."""
PACK_LIMITS_NO_IDENTIFYING = attrs.evolve(PACK_LIMITS, max_identified=0)
"""Every delta's file keeps an unknown size until extracted (the other path of the offer)."""


def _read_pack(pieces: Sequence[bytes], decline: bool, limits) -> tuple[list, str | None]:
    """Drive a PackReader as peer/bob.py does, checking each step; return (events, verdict)."""
    reader = pack.PackReader(limits=limits, spool_limit=1 << 22)
    events: list = []
    fed = raw = streamed = 0
    single_size = None
    shown: list = []
    try:
        for piece in pieces:
            reader.feed(piece)
            fed += len(piece)
            while (event := reader.next_event()) is not None:
                if isinstance(event, pack.SingleFile):
                    assert not events, "the single file's header came after other events"
                    single_size = event.size
                    assert reader.offer().total_bytes == event.size
                    events.append(("file", event.name, event.size))
                elif isinstance(event, pack.FileData):
                    streamed += len(event.data)
                    assert single_size is not None and streamed <= single_size, "inflated past its size"
                elif isinstance(event, pack.Directory):
                    # Described: nothing is stored but the pack as it came, before the decision.
                    assert reader.spooled <= fed, f"{reader.spooled} bytes spooled from {fed} received"
                    offer = reader.offer()
                    assert event.total_size == offer.total_bytes
                    shown = list(offer.entries[1:])
                    events.append(("dir", event.name, event.entry_count, event.total_size))
                    if decline:
                        return events, "declined"
                    raw = reader.spooled
                elif isinstance(event, pack.TreeEntry):
                    # Extracting: within what the headers declared, and exactly what was shown.
                    assert reader.spooled - raw <= reader.unpacked_size
                    promised = shown.pop(0)
                    assert (promised.path, promised.kind) == (event.path, event.kind)
                    if event.kind == FILE:
                        assert promised.size in (None, event.size)
                        assert sum(len(piece) for piece in reader.iter_blob(event.id)) == event.size
                    events.append(("entry", event.path, event.size))
                elif isinstance(event, pack.PackEnd):
                    assert not shown, "the offer showed entries that never came"
                    if single_size is not None:
                        assert streamed == single_size, "a single file ended short of its size"
                    events.append(("end",))
        reader.eof()
        assert events and events[-1] == ("end",), "the stream ended before PackEnd without an error"
        return events, None
    except pack.PackError as error:
        verdict = str(error)
        assert "\n" not in verdict
        try:
            reader.next_event()
        except pack.PackError as again:
            assert str(again) == verdict, "a failed reader changed its verdict"
        else:
            raise AssertionError("a failed reader gave another event")
        return events, verdict
    finally:
        reader.close()
        assert reader.spooled == 0, "close() left a spool behind"


def check_pack(stream: bytes, cuts: Sequence[int], decline: bool, identify: bool = True) -> None:
    """The pack reader on ``stream``, whole and cut at ``cuts``: see the module docstring."""
    limits = PACK_LIMITS if identify else PACK_LIMITS_NO_IDENTIFYING
    whole, whole_verdict = _read_pack([stream], decline, limits)
    split, split_verdict = _read_pack(split_at(stream, cuts), decline, limits)
    assert (whole_verdict is None) == (split_verdict is None), "the verdict depends on the cuts"
    if whole_verdict is None or whole_verdict == "declined":
        assert whole == split, "the events depend on how the stream is cut"


def with_trailer(stream: bytes) -> bytes:
    """``stream`` with its last 20 bytes replaced by the SHA-1 of the rest (a matching trailer)."""
    body = stream[:-20] if len(stream) > 20 else stream
    return body + hashlib.sha1(body).digest()


def pack_input(data: bytes) -> None:
    """Byte-level adapter: ``stream_and_cuts``; the first byte's top bit declines a directory,
    bit 6 leaves deltas unidentified before the decision, bit 5 makes the trailer match."""
    if data:
        stream, cuts = stream_and_cuts(data)
        if data[0] & 0x20:
            stream = with_trailer(stream)
        check_pack(stream, cuts, decline=bool(data[0] & 0x80), identify=not data[0] & 0x40)


def pack_seeds() -> list[bytes]:
    """A single file; directories with a delta on a blob, a delta on a delta, a REF_DELTA and
    a delta on a tree (each reader path before and after the decision)."""

    def obj(kind: int, content: bytes) -> bytes:
        return pack.object_header(kind, len(content)) + zlib.compress(content)

    def oid(kind: bytes, content: bytes) -> bytes:
        return hashlib.sha1(b"%s %d\0" % (kind, len(content)) + content).digest()

    def finish(objects: list[bytes]) -> bytes:
        data = b"PACK" + struct.pack(">II", 2, len(objects)) + b"".join(objects)
        return data + hashlib.sha1(data).digest()

    def ofs(objects: list[bytes], base: int, instructions: bytes) -> bytes:
        distance = sum(map(len, objects[base:]))
        assert distance < 0x80
        return pack.object_header(6, len(instructions)) + bytes([distance]) + zlib.compress(instructions)

    single = b"".join(pack.single_file_records("notes.txt", 3000, [b"notes " * 500], 4))
    base, edited, shorter = b"0123456789" * 20, b"0123456789" * 19 + b"edited!!!!", b"0123456789" * 18
    to_edited = b"\xc8\x01\xc8\x01" + b"\x90\xbe" + b"\x0aedited!!!!"  # copy 190, insert 10
    to_shorter = b"\xc8\x01\xb4\x01" + b"\x90\xb4"  # copy the first 180
    first = b"100644 a\0" + oid(b"blob", base)
    inner = first + b"100644 b\0" + oid(b"blob", edited)
    top = b"40000 in\0" + oid(b"tree", inner) + b"100644 c\0" + oid(b"blob", shorter)
    root = b"dir\0" + oid(b"tree", top) + b"6"

    objects = [obj(1, root), obj(2, top), obj(2, inner), obj(3, base)]
    objects.append(ofs(objects, 3, to_edited))
    objects.append(ofs(objects, 4, to_shorter))
    deltas = finish(objects)

    ref = objects[:4] + [pack.object_header(7, len(to_edited)) + oid(b"blob", base) + zlib.compress(to_edited)]
    ref.append(obj(3, shorter))
    ref_delta = finish(ref)

    to_inner = b"\x1d\x3a" + b"\x90\x1d" + b"\x1d" + inner[29:]  # copy the first tree, add an entry
    trees = [obj(1, root), obj(2, top), obj(2, first)]
    trees.append(ofs(trees, 2, to_inner))
    trees += [obj(3, base), obj(3, edited), obj(3, shorter)]
    tree_delta = finish(trees)

    seeds = []
    for stream in (single, deltas, ref_delta, tree_delta):
        for flags in (0x22, 0x62, 0xA2):
            seeds.append(bytes([flags]) + b"\x10\x40" + stream)
    return seeds


TARGETS = {
    "wire": (wire_input, wire_seeds),
    "records": (records_input, records_seeds),
    "message": (message_input, message_seeds),
    "receiver": (receiver_input, receiver_seeds),
    "frames": (frames_input, frame_seeds),
    "pack": (pack_input, pack_seeds),
    **({"zstd": (zstd_input, zstd_seeds)} if CAN_COMPRESS else {}),
}
"""Name -> (one_input(data), seeds()) for bench/fuzz.py."""


def seeds(name: str) -> list[bytes]:
    return TARGETS[name][1]()
