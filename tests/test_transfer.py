"""Our data phase: the message codec, both state machines, and whole transfers run in memory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_targets import check_decode
from peer.destination import Destination, IntegrityError
from peer.errors import HandshakeAltered, ProtocolError
from peer.messages import (
    MAGIC,
    MAX_BIG_DATA_SIZE,
    MAX_DATA_SIZE,
    Ack,
    Answer,
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
    BIG_RECORDS,
    DIRECTORY,
    FILE,
    PACK_ACK,
    Offer,
    OfferEntry,
    format_size,
    name_problem,
    verification_string,
)
from peer.records import MAX_RECORD_SIZE, Opener, Sealer
from peer.source import scan
from peer.transfer import (
    Accepted,
    Completed,
    Declined,
    FileData,
    FileFinished,
    FileStarted,
    HelloReceived,
    OfferReceived,
    PeerError,
    ReceiverSession,
    SenderSession,
    TransferDone,
)

DIGEST = bytes(range(32))


# --- the codec -------------------------------------------------------------------------

ONE_OF_EACH = [
    Hello(1, ("resume", "zstd")),
    Hello(7, ()),
    OfferPart(True, b'{"version":1'),
    OfferPart(False, b"}"),
    Answer(True),
    Answer(True, "", ((3, 4096), (5, 2**40))),
    Answer(False, "declined by the user"),
    Answer(False, ""),
    FileStart(0),
    FileStart(2**32 - 1, 2**64 - 1),
    Data(b"x"),
    Data(bytes(MAX_DATA_SIZE)),
    FileEnd(DIGEST),
    Done(),
    Ack(3, 2**50),
    Error("disk full"),
]


@pytest.mark.parametrize("message", ONE_OF_EACH, ids=repr)
def test_message_round_trip(message):
    encoded = message.encode()
    assert 1 <= len(encoded) <= MAX_RECORD_SIZE
    assert encoded[0] == message.TYPE
    assert decode_message(encoded) == message
    assert decode_message(bytearray(encoded)) == message
    assert decode_message(memoryview(encoded)) == message


def test_type_bytes_are_distinct_and_never_look_like_pack():
    types = {type(message).TYPE for message in ONE_OF_EACH}
    assert len(types) == 9
    assert ord("P") not in types


def test_exact_layouts():
    assert Hello(1, ("ab",)).encode() == b"\x01peer-relay\x00\x01\x01\x02ab"
    assert Answer(True).encode() == b"\x03\x01\x00\x00\x00\x00"
    assert Answer(False, "no").encode() == b"\x03\x00no"
    assert FileStart(2, 0).encode() == b"\x04\x00\x00\x00\x02" + bytes(8)
    assert Done().encode() == b"\x07"
    assert Ack(1, 2).encode() == b"\x08" + (1).to_bytes(8, "big") + (2).to_bytes(8, "big")
    assert OfferPart(True, b"{").encode() == b"\x02\x01{"


def test_data_is_decoded_without_a_copy():
    plaintext = bytearray(b"\x05abc")
    message = decode_message(plaintext)
    plaintext[1] = ord("z")
    assert bytes(message.data) == b"zbc"


@pytest.mark.parametrize(
    "plaintext",
    [
        b"",
        b"\x00",
        b"\x50ACK\x00\x00\x00\x02",
        b"\xff" * 10,
        bytes(MAX_RECORD_SIZE + 1),
        b"\x01peer-relay\x00\x01",  # hello cut short
        b"\x01not-magic!\x00\x01\x00",
        b"\x01peer-relay\x00\x01\x01\x05ab",  # capability cut
        b"\x01peer-relay\x00\x01\x01\x02AB",  # upper case capability
        b"\x01peer-relay\x00\x01\x00extra",
        b"\x02",
        b"\x02\x01",  # offer piece without bytes
        b"\x02\x04{}",  # unknown flag
        b"\x03",
        b"\x03\x02",
        b"\x03\x01\x00\x00",
        b"\x03\x01\x00\x00\x00\x01" + bytes(11),
        b"\x04" + bytes(11),
        b"\x04" + bytes(13),
        b"\x05",
        b"\x06" + bytes(31),
        b"\x07\x00",
        b"\x08" + bytes(15),
        b"\x09" + b"x" * 1025,
    ],
)
def test_malformed_messages_are_protocol_errors(plaintext):
    with pytest.raises(ProtocolError):
        decode_message(plaintext)


def test_bob_pack_stream_is_named():
    with pytest.raises(ProtocolError, match="bob's PACK"):
        decode_message(b"PACK\x00\x00\x00\x02\x00\x00\x00\x02")


def test_reasons_are_made_printable_and_cut_at_a_character_boundary():
    hostile = decode_message(b"\x09bad\x1b[2J\nnews\xe2\x80\xaeexe.pdf\xff")
    assert hostile == Error("bad\ufffd[2J\ufffdnews\ufffdexe.pdf\ufffd")
    long_reason = Error("é" * 1000).encode()
    assert len(long_reason) <= 1 + 1024
    assert decode_message(long_reason).reason == "é" * 512


def test_encoders_refuse_what_decoders_would_reject():
    with pytest.raises(ValueError):
        Data(b"").encode()
    with pytest.raises(ValueError):
        Data(bytes(MAX_DATA_SIZE + 1)).encode()
    with pytest.raises(ValueError):
        FileEnd(b"short").encode()
    with pytest.raises(ValueError):
        Hello(1, ("Bad Name",)).encode()
    with pytest.raises(ValueError):
        Answer(False, "", ((0, 1),)).encode()


@given(st.binary(min_size=1, max_size=200))
@settings(max_examples=300)
def test_decode_garbage_only_raises_protocol_error(plaintext):
    try:
        decode_message(plaintext)
    except ProtocolError:
        pass


# --- helpers shared by the session tests -----------------------------------------------


def test_verification_string_is_short_shared_and_key_dependent():
    key = bytes(range(64))
    text = verification_string(key)
    assert text == verification_string(bytes(key))
    groups = text.split("-")
    assert len(groups) == 4 and all(len(g) == 4 and int(g, 16) >= 0 for g in groups)
    assert verification_string(bytes(64)) != text
    assert key.hex()[:4] not in groups
    with pytest.raises(ValueError):
        verification_string(b"short")


def test_format_size():
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 * 2**20) == "3.0 MiB"
    assert format_size(5 * 2**60) == "5120.0 PiB"


def file_entry(path: str, size: int = 0, executable: bool = False) -> OfferEntry:
    return OfferEntry(FILE, path, size, executable)


def dir_entry(path: str) -> OfferEntry:
    return OfferEntry(DIRECTORY, path)


@pytest.mark.parametrize("name", ["a", "photos/x.jpg", "ünï/cödé 1.txt", "10:30 notes.txt", "...", ".hidden", "x" * 255])
def test_acceptable_names(name):
    assert name_problem(name) is None


@pytest.mark.parametrize(
    "name",
    ["", "/etc/passwd", "../x", "a/../../b", "..", ".", "a//b", "a/", "a\\..\\b", "C:\\x", "c:x", "a/C:",
     "a\0b", "tab\there", "bell\x07", "rtl\u202efdp.exe", "line\u2028break", "x" * 256, "\udcff"],
)
def test_hostile_names(name):
    assert name_problem(name) is not None


def test_offer_rules():
    offer = Offer([dir_entry("d"), file_entry("d/a", 5, True), dir_entry("d/e"), file_entry("b", 7)])
    assert (offer.file_count, offer.total_bytes) == (2, 12)
    assert [entry.path for entry in offer.files] == ["d/a", "b"]
    assert offer.summary() == "2 items: d/, b (2 files, 12 B)"
    assert Offer([file_entry("x.pdf", 2048)]).summary() == "x.pdf (2.0 KiB)"
    assert Offer([dir_entry("d"), file_entry("d/a", 1)]).summary() == "d/ (1 file, 1 B)"
    bad_offers = [
        [],
        [file_entry("a"), file_entry("a")],
        [file_entry("d/a")],  # parent never declared
        [file_entry("d/a"), dir_entry("d")],  # parent declared too late
        [file_entry("d"), file_entry("d/a")],  # a file used as a directory
        [file_entry("a", -1)],
        [file_entry("a", True)],
        [OfferEntry("link", "a")],
        [OfferEntry(DIRECTORY, "d", 3)],
        [file_entry("../a")],
    ]
    for entries in bad_offers:
        with pytest.raises(ValueError):
            Offer(entries)


def test_offer_json_round_trip_and_checks():
    offer = Offer([dir_entry("d"), file_entry("d/ä", 5, True), file_entry("b", 0)])
    data = offer.to_json(features=("zstd",))
    assert Offer.from_json(data) == (offer, 1, frozenset({"zstd"}))
    forged = data.replace(b'"total_bytes":5', b'"total_bytes":6')
    hostile = [
        b"not json",
        b"[]",
        b"\xff\xfe",
        b"[" * 100_000,
        b'{"entries":[]}',
        b'{"version":1,"entries":{}}',
        b'{"version":1,"features":"zstd","entries":[]}',
        b'{"version":1,"entries":[7],"file_count":0,"total_bytes":0}',
        b'{"version":1,"entries":[{"kind":"file","path":"/etc/passwd","size":1}],"file_count":1,"total_bytes":1}',
        b'{"version":1,"entries":[{"kind":"file","path":"a","size":1.5}],"file_count":1,"total_bytes":1.5}',
        b'{"version":1,"entries":[{"kind":"device","path":"a"}],"file_count":0,"total_bytes":0}',
        forged,
    ]
    for document in hostile:
        with pytest.raises(ProtocolError):
            Offer.from_json(document)


# --- sessions driven by hand -------------------------------------------------------------

SMALL_OFFER = Offer([dir_entry("d"), file_entry("d/a", 5), file_entry("d/b", 0), dir_entry("d/empty")])


def receiver_at_offer(offer: Offer = SMALL_OFFER) -> ReceiverSession:
    receiver = ReceiverSession()
    receiver.hello()
    sender = SenderSession(offer)
    sender.receive(Hello().encode())
    events = [receiver.receive(message) for message in sender.offer_messages()]
    assert events[-1] == OfferReceived(offer)
    return receiver


def receiver_receiving(offer: Offer = SMALL_OFFER) -> ReceiverSession:
    receiver = receiver_at_offer(offer)
    assert decode_message(receiver.accept()) == Answer(True)
    return receiver


def sender_sending(offer: Offer = SMALL_OFFER) -> SenderSession:
    sender = SenderSession(offer)
    assert sender.receive(Hello().encode()) == HelloReceived(1, frozenset())
    sender.offer_messages()
    assert sender.receive(Answer(True).encode()) == Accepted()
    return sender


def test_receiver_events_for_a_good_stream():
    receiver = receiver_receiving()
    a, b = SMALL_OFFER.entries[1], SMALL_OFFER.entries[2]
    assert receiver.receive(FileStart(1).encode()) == FileStarted(a)
    event = receiver.receive(Data(b"hel").encode())
    assert isinstance(event, FileData) and event.entry == a and bytes(event.data) == b"hel"
    receiver.receive(Data(b"lo").encode())
    assert receiver.receive(FileEnd(DIGEST).encode()) == FileFinished(a, DIGEST)
    assert receiver.receive(FileStart(2).encode()) == FileStarted(b)
    assert receiver.receive(FileEnd(DIGEST).encode()) == FileFinished(b, DIGEST)
    assert receiver.receive(Done().encode()) == TransferDone(2, 5)
    assert decode_message(receiver.acknowledge()) == Ack(2, 5)
    assert receiver.finished
    with pytest.raises(ProtocolError):
        receiver.receive(Done().encode())


@pytest.mark.parametrize(
    "messages, match",
    [
        ([Data(b"x")], "data while the receiver was between files"),
        ([FileEnd(DIGEST)], "file end while"),
        ([FileStart(2)], "started entry 2, expected entry 1"),
        ([FileStart(0)], "expected entry 1"),
        ([FileStart(1, 3)], "resumed"),
        ([Done()], "after 0 of 2 files"),
        ([FileStart(1), Data(b"hello!")], "more bytes than offered"),
        ([FileStart(1), Data(b"hel"), Data(b"lo"), Data(b"!")], "more bytes than offered"),
        ([FileStart(1), Data(b"hel"), FileEnd(DIGEST)], "after 3 of 5 bytes"),
        ([FileStart(1), FileStart(1)], "file start while the receiver was inside a file"),
        ([FileStart(1), Data(b"hello"), Done()], "done while"),
        ([OfferPart(False, b"{}")], "offer while"),
        ([Hello()], "hello while"),
        ([Ack(0, 0)], "ack while"),
    ],
)
def test_receiver_rejects_out_of_order_and_wrong_sizes(messages, match):
    receiver = receiver_receiving()
    with pytest.raises(ProtocolError, match=match):
        for message in messages:
            receiver.receive(message.encode())
    # A failed session stays failed, whatever comes next.
    with pytest.raises(ProtocolError, match=match):
        receiver.receive(Done().encode())


def test_receiver_rejects_file_messages_before_answering():
    receiver = receiver_at_offer()
    with pytest.raises(ProtocolError, match="before|while the receiver was deciding"):
        receiver.receive(FileStart(1).encode())


def test_receiver_rejects_bad_offers():
    receiver = ReceiverSession()
    receiver.hello()
    with pytest.raises(ProtocolError, match="version 2"):
        document = SMALL_OFFER.to_json(version=2)
        receiver.receive(OfferPart(False, document).encode())
    receiver = ReceiverSession(features=["zstd"])
    receiver.hello()
    with pytest.raises(ProtocolError, match="did not offer: resume"):
        receiver.receive(OfferPart(False, SMALL_OFFER.to_json(features=["resume", "zstd"])).encode())
    receiver = ReceiverSession()
    receiver.hello()
    with pytest.raises(ProtocolError, match="bob's PACK"):
        receiver.receive(b"PACK\x00\x00\x00\x02\x00\x00\x00\x02")


def test_receiver_api_misuse_is_a_runtime_error():
    receiver = ReceiverSession()
    with pytest.raises(RuntimeError):
        receiver.receive(Done().encode())
    receiver.hello()
    with pytest.raises(RuntimeError):
        receiver.accept()
    with pytest.raises(RuntimeError):
        receiver.acknowledge()


def test_peer_error_ends_the_receiver_session():
    receiver = receiver_receiving()
    receiver.receive(FileStart(1).encode())
    assert receiver.receive(Error("file changed while sending").encode()) == PeerError("file changed while sending")
    assert receiver.finished
    with pytest.raises(ProtocolError):
        receiver.receive(Data(b"x").encode())


def test_decline():
    receiver = receiver_at_offer()
    sender = SenderSession(SMALL_OFFER)
    sender.receive(Hello().encode())
    sender.offer_messages()
    assert sender.receive(receiver.decline("not today")) == Declined("not today")
    assert sender.finished and not sender.succeeded
    assert receiver.finished


def test_sender_builds_data_messages_in_place():
    sender = sender_sending()
    entry = sender.next_file()
    assert entry.path == "d/a"
    assert decode_message(sender.begin_file(entry)) == FileStart(1)
    buffer = sender.data_buffer()
    assert len(buffer) == 5
    buffer[:3] = b"hel"
    message = sender.data_message(3)
    assert bytes(message) == b"\x05hel"
    assert message.obj is buffer.obj  # one buffer, no copy
    assert sender.file_remaining == 2
    with pytest.raises(ValueError):
        sender.data_message(3)
    with pytest.raises(RuntimeError):
        sender.end_file(DIGEST)
    sender.data_buffer()[:2] = b"lo"
    sender.data_message(2)
    assert decode_message(sender.end_file(DIGEST)) == FileEnd(DIGEST)
    empty = sender.next_file()
    sender.begin_file(empty)
    assert sender.file_remaining == 0
    sender.end_file(DIGEST)
    assert sender.next_file() is None
    assert sender.done() == b"\x07"
    with pytest.raises(ProtocolError, match="confirmed 1 files and 5 bytes, but 2 files"):
        sender.receive(Ack(1, 5).encode())
    assert not sender.succeeded


def test_sender_refuses_files_out_of_order():
    sender = sender_sending()
    with pytest.raises(RuntimeError):
        sender.begin_file(SMALL_OFFER.entries[2])
    with pytest.raises(RuntimeError):
        sender.done()


def test_sender_checks_what_the_receiver_says():
    with pytest.raises(ProtocolError, match="not a peer-relay peer"):
        SenderSession(SMALL_OFFER).receive(b"\x01nonsense")
    with pytest.raises(ProtocolError, match="version 0"):
        SenderSession(SMALL_OFFER).receive(Hello(0).encode())
    sender = SenderSession(SMALL_OFFER)
    sender.receive(Hello().encode())
    sender.offer_messages()
    with pytest.raises(ProtocolError, match="resume"):
        sender.receive(Answer(True, "", ((1, 100),)).encode())
    sender = sender_sending()
    with pytest.raises(ProtocolError, match="ack while"):
        sender.receive(Ack(2, 5).encode())


def test_peer_error_while_sending_stops_the_sender():
    sender = sender_sending()
    sender.begin_file(sender.next_file())
    assert sender.receive(Error("disk full").encode()) == PeerError("disk full")
    assert sender.finished and sender.file_remaining == 0
    with pytest.raises(RuntimeError):
        sender.data_buffer()


def test_version_and_feature_negotiation():
    sender = SenderSession(SMALL_OFFER, features=["zstd", "resume"])
    event = sender.receive(Hello(5, ("zstd", "future-thing")).encode())
    assert event == HelloReceived(5, frozenset({"zstd", "future-thing"}))
    assert sender.version == 1 and sender.features == {"zstd"}
    receiver = ReceiverSession(features=["zstd"])
    assert decode_message(receiver.hello()) == Hello(1, ("zstd",))
    events = [receiver.receive(message) for message in sender.offer_messages()]
    assert events[-1] == OfferReceived(SMALL_OFFER)
    assert receiver.features == {"zstd"}


def big_offer(size: int) -> Offer:
    return Offer([file_entry("big.bin", size)])


def test_big_data_messages_only_when_both_offered_big_records():
    size = 3 * MAX_BIG_DATA_SIZE
    for sender_has, receiver_has, room in [(True, True, MAX_BIG_DATA_SIZE),
                                           (True, False, MAX_DATA_SIZE),
                                           (False, True, MAX_DATA_SIZE)]:
        sender = SenderSession(big_offer(size), features=[BIG_RECORDS] if sender_has else [])
        receiver = ReceiverSession(features=[BIG_RECORDS] if receiver_has else [])
        assert receiver.big_records is receiver_has
        sender.receive(receiver.hello())
        assert sender.big_records is (sender_has and receiver_has)
        for message in sender.offer_messages():
            receiver.receive(message)
        sender.receive(receiver.accept())
        receiver.receive(sender.begin_file(sender.next_file()))
        buffer = sender.data_buffer()
        assert len(buffer) == room
        buffer[:] = b"x" * room
        event = receiver.receive(sender.data_message(room))
        assert isinstance(event, FileData) and len(event.data) == room


def test_a_big_message_that_is_not_data_or_was_not_offered_is_refused():
    big_data = Data(b"x" * MAX_BIG_DATA_SIZE)
    big = bytes([Data.TYPE]) + bytes(big_data.data)
    assert isinstance(decode_message(big, big=True), Data)
    with pytest.raises(ProtocolError, match="only DATA may be over"):
        decode_message(big)
    with pytest.raises(ProtocolError, match="only DATA may be over"):
        decode_message(bytes([Error.TYPE]) + b"x" * MAX_RECORD_SIZE, big=True)
    with pytest.raises(ProtocolError):
        decode_message(big + b"x", big=True)


def test_a_large_offer_spans_several_records():
    entries = [dir_entry("many")] + [file_entry(f"many/file-{i:05}-{'x' * 40}", i) for i in range(3000)]
    offer = Offer(entries)
    sender = SenderSession(offer)
    sender.receive(Hello().encode())
    messages = sender.offer_messages()
    assert len(messages) > 3
    assert all(len(message) <= MAX_RECORD_SIZE for message in messages)
    receiver = ReceiverSession()
    receiver.hello()
    events = [receiver.receive(message) for message in messages]
    assert events[:-1] == [None] * (len(messages) - 1)
    assert events[-1] == OfferReceived(offer)


garbage_records = st.lists(
    st.one_of(
        st.binary(min_size=0, max_size=64),
        st.builds(lambda t, body: bytes([t]) + body, st.integers(1, 9), st.binary(max_size=48)),
    ),
    min_size=1,
    max_size=8,
)


@given(records=garbage_records, stage=st.sampled_from(["offer", "files", "in-file"]))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_receiver_survives_garbage(records, stage):
    if stage == "offer":
        receiver = ReceiverSession()
        receiver.hello()
    else:
        receiver = receiver_receiving()
        if stage == "in-file":
            receiver.receive(FileStart(1).encode())
    for record in records:
        try:
            receiver.receive(record)
        except ProtocolError:
            pass


@given(records=garbage_records, accepted=st.booleans())
@settings(max_examples=200)
def test_sender_survives_garbage(records, accepted):
    sender = sender_sending() if accepted else SenderSession(SMALL_OFFER)
    for record in records:
        try:
            sender.receive(record)
        except ProtocolError:
            pass


# --- whole transfers, in memory, through source and destination ----------------------------


class Exchange:
    """Both sessions and their disk sides wired back to back, the way the driver will be.

    Every plaintext is copied as it "crosses the network", checked against the record
    size limit, and optionally passed through a real Sealer/Opener pair.
    """

    def __init__(self, paths, destination: Path, *, overwrite=False, encrypt=False, decline=None):
        self.selection = scan([str(path) for path in paths])
        self.sender = SenderSession(self.selection.offer)
        self.receiver = ReceiverSession()
        self.destination = Destination(destination, overwrite=overwrite, keep_modes=True)  # same_tree compares modes
        self.decline = decline
        self.sender_events = []
        self.receiver_events = []
        self.part = None
        key = bytes(range(64))
        self.seal = Sealer(key).seal if encrypt else None
        self.opener = Opener(key) if encrypt else None

    def carry(self, plaintext) -> bytes:
        assert 1 <= len(plaintext) <= MAX_RECORD_SIZE
        if self.seal is None:
            return bytes(plaintext)
        self.opener.feed(self.seal(plaintext))
        return self.opener.next_record()

    def to_sender(self, plaintext):
        event = self.sender.receive(self.carry(plaintext))
        self.sender_events.append(event)

    def to_receiver(self, plaintext):
        event = self.receiver.receive(self.carry(plaintext))
        self.receiver_events.append(type(event).__name__)
        destination = self.destination
        if isinstance(event, OfferReceived):
            if self.decline is not None:
                self.to_sender(self.receiver.decline(self.decline))
                return
            destination.plan(event.offer)
            self.to_sender(self.receiver.accept())
        elif isinstance(event, FileStarted):
            self.part = destination.open_part(event.entry)
        elif isinstance(event, FileData):
            self.part.write(event.data)
        elif isinstance(event, FileFinished):
            try:
                destination.commit(self.part, event.digest)
            except IntegrityError as exc:
                destination.abort()
                self.to_sender(self.receiver.error(str(exc)))
        elif isinstance(event, TransferDone):
            destination.finish()
            self.to_sender(self.receiver.acknowledge())

    def run(self, *, corrupt_digest=False):
        self.to_sender(self.receiver.hello())
        for message in self.sender.offer_messages():
            self.to_receiver(message)
        if self.sender.finished:
            return self
        while (entry := self.sender.next_file()) is not None:
            self.to_receiver(self.sender.begin_file(entry))
            with self.selection.open(entry) as reader:
                while self.sender.file_remaining:
                    count = reader.readinto(self.sender.data_buffer())
                    self.to_receiver(self.sender.data_message(count))
                digest = reader.digest()
            if corrupt_digest:
                digest = bytes(32)
            self.to_receiver(self.sender.end_file(digest))
            if self.sender.finished:
                return self
        self.to_receiver(self.sender.done())
        return self


def same_tree(left: Path, right: Path) -> None:
    """Equal names, kinds, contents and executable bits, recursively."""
    left_names = sorted(os.listdir(left))
    assert left_names == sorted(os.listdir(right))
    for name in left_names:
        a, b = left / name, right / name
        assert a.is_dir() == b.is_dir()
        if a.is_dir():
            same_tree(a, b)
        else:
            assert a.read_bytes() == b.read_bytes()
            assert bool(a.stat().st_mode & stat.S_IXUSR) == bool(b.stat().st_mode & stat.S_IXUSR)


@pytest.fixture
def dirs(tmp_path):
    source = tmp_path / "source"
    target = tmp_path / "target"
    source.mkdir()
    target.mkdir()
    return source, target


def test_transfer_of_an_empty_file(dirs):
    source, target = dirs
    (source / "empty.txt").write_bytes(b"")
    exchange = Exchange([source / "empty.txt"], target).run()
    assert exchange.sender.succeeded
    assert exchange.sender_events[-1] == Completed(1, 0)
    assert exchange.receiver_events == ["OfferReceived", "FileStarted", "FileFinished", "TransferDone"]
    assert (target / "empty.txt").read_bytes() == b""
    assert os.listdir(target) == ["empty.txt"]


def test_transfer_of_a_random_3_mib_file_through_real_records(dirs):
    source, target = dirs
    content = os.urandom(3 * 2**20 + 17)
    (source / "blob.bin").write_bytes(content)
    exchange = Exchange([source / "blob.bin"], target, encrypt=True).run()
    assert exchange.sender_events[-1] == Completed(1, len(content))
    received = (target / "blob.bin").read_bytes()
    assert received == content
    assert blake3.blake3(received).digest() == blake3.blake3(content).digest()
    assert exchange.receiver_events.count("FileData") == -(-len(content) // MAX_DATA_SIZE)


def test_transfer_of_a_nested_unicode_tree_with_an_empty_directory(dirs):
    source, target = dirs
    tree = source / "fotos"
    (tree / "été" / "日本語" / "深い").mkdir(parents=True)
    (tree / "vide").mkdir()
    (tree / "été" / "crème brûlée.txt").write_text("miam\n", encoding="utf-8")
    (tree / "été" / "日本語" / "深い" / "ファイル.bin").write_bytes(os.urandom(70_000))
    (tree / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (tree / "run.sh").chmod(0o755)
    (tree / ".hidden").write_bytes(b"dotfiles travel too")
    (source / "loose.txt").write_bytes(b"second top-level item")
    exchange = Exchange([tree, source / "loose.txt"], target).run()
    assert exchange.sender.succeeded
    same_tree(source, target)
    assert (target / "fotos" / "vide").is_dir()
    assert not any(name.endswith(".peer-part") for _, _, names in os.walk(target) for name in names)


def test_declined_transfer_writes_nothing(dirs):
    source, target = dirs
    (source / "a").write_bytes(b"abc")
    exchange = Exchange([source / "a"], target, decline="no thanks").run()
    assert exchange.sender_events[-1] == Declined("no thanks")
    assert not exchange.sender.succeeded
    assert os.listdir(target) == []


def test_wrong_hash_commits_nothing(dirs):
    source, target = dirs
    (source / "d").mkdir()
    (source / "d" / "a").write_bytes(b"x" * 100_000)
    exchange = Exchange([source / "d"], target).run(corrupt_digest=True)
    assert isinstance(exchange.sender_events[-1], PeerError)
    assert "corrupted" in exchange.sender_events[-1].reason
    assert not exchange.sender.succeeded
    assert os.listdir(target) == []  # no final file, no .peer-part, no directory left behind


def test_receiver_reports_unexpected_sizes_end_to_end(dirs):
    source, target = dirs
    (source / "a").write_bytes(b"12345")
    selection = scan([str(source / "a")])
    receiver = ReceiverSession()
    receiver.hello()
    sender = SenderSession(selection.offer)
    sender.receive(Hello().encode())
    destination = Destination(target)
    for message in sender.offer_messages():
        offer = receiver.receive(message).offer
    destination.plan(offer)
    receiver.accept()
    part = destination.open_part(receiver.receive(FileStart(0).encode()).entry)
    part.write(receiver.receive(Data(b"1234").encode()).data)
    with pytest.raises(ProtocolError, match="after 4 of 5 bytes"):
        receiver.receive(FileEnd(blake3.blake3(b"1234").digest()).encode())
    destination.abort()
    assert os.listdir(target) == []


# --- text messages and files of unknown size ----------------------------------------------


def test_a_text_offer_round_trips_and_needs_the_text_feature():
    offer = Offer((), "hello\nworld")
    assert offer.summary() == "a text message (11 B)"
    assert offer.needed_features() == {"text"}
    assert Offer.from_json(offer.to_json(features=["text"])) == (offer, 1, frozenset({"text"}))
    for bad in [lambda: Offer([file_entry("a", 1)], "both"), lambda: Offer((), "x" * (2**20 + 1))]:
        with pytest.raises(ValueError):
            bad()
    # A receiver that did not offer "text" refuses such an offer...
    receiver = ReceiverSession()
    receiver.hello()
    with pytest.raises(ProtocolError, match="did not choose: text"):
        receiver.receive(OfferPart(False, offer.to_json()).encode())
    # ...and a sender learns from the hello that it cannot send it.
    sender = SenderSession(offer, features=["text"])
    sender.receive(Hello().encode())
    assert sender.missing_features == {"text"}
    with pytest.raises(Exception, match="lacks text"):
        sender.offer_messages()


def test_a_text_transfer_is_offer_done_ack():
    offer = Offer((), "hi")
    sender = SenderSession(offer, features=["text"])
    receiver = ReceiverSession(features=["text"])
    sender.receive(receiver.hello())
    events = [receiver.receive(m) for m in sender.offer_messages()]
    assert events[-1].offer.text == "hi"
    assert sender.receive(receiver.accept()) == Accepted()
    assert sender.next_file() is None
    assert receiver.receive(sender.done()) == TransferDone(0, 0)
    assert sender.receive(receiver.acknowledge()) == Completed(0, 0)


def test_unknown_sizes_are_counted_into_the_ack():
    offer = Offer([file_entry("stdin", None), file_entry("b", 2)])
    assert offer.summary() == "2 items: stdin, b (2 files, 2 B and more)"
    assert Offer([file_entry("stdin", None)]).summary() == "stdin (size unknown)"
    sender = SenderSession(offer, features=["unknown-size"])
    receiver = ReceiverSession(features=["unknown-size"])
    sender.receive(receiver.hello())
    for message in sender.offer_messages():
        receiver.receive(message)
    sender.receive(receiver.accept())
    receiver.receive(sender.begin_file(sender.next_file()))
    assert sender.file_remaining is None
    for size in (MAX_DATA_SIZE, 5):
        sender.data_buffer()[:size] = bytes(size)
        assert len(receiver.receive(sender.data_message(size)).data) == size
    assert isinstance(receiver.receive(sender.end_file(DIGEST)), FileFinished)
    receiver.receive(sender.begin_file(sender.next_file()))
    sender.data_buffer()[:2] = b"ab"
    receiver.receive(sender.data_message(2))
    receiver.receive(sender.end_file(DIGEST))
    total = MAX_DATA_SIZE + 5 + 2
    assert receiver.receive(sender.done()) == TransferDone(2, total)
    assert sender.receive(receiver.acknowledge()) == Completed(2, total)
    plain = ReceiverSession()
    plain.hello()
    with pytest.raises(ProtocolError, match="unknown-size"):
        plain.receive(OfferPart(False, offer.to_json()).encode())
    with pytest.raises(ProtocolError, match="no size"):
        Offer.from_json(b'{"version":1,"entries":[{"kind":"file","path":"a"}],"file_count":1,"total_bytes":0}')


# --- the public's digest in HELLO, and the PACK fallback (issue 16, finding 6) ----------------

PUBLIC = bytes(range(34))
REWRITTEN = PUBLIC[:14] + b"\x00\x02" + PUBLIC[16:]


def test_hello_carries_the_public_digest_as_its_last_capability_item():
    hello = Hello(1, ("resume", "zstd"), public_digest(PUBLIC))
    encoded = hello.encode()
    assert decode_message(encoded) == hello
    check_decode(encoded)  # one-to-one: re-encoding gives the same bytes
    # An older sender reads it as capabilities it does not know (and skips), nothing more.
    count = encoded[1 + len(MAGIC) + 2]
    assert count == 3
    assert encoded.endswith(b"pub-" + public_digest(PUBLIC).hex().encode())


def test_a_hello_without_digest_is_an_older_receivers():
    hello = decode_message(Hello(1, ("resume",)).encode())
    assert hello.public_digest is None and hello.capabilities == ("resume",)


@pytest.mark.parametrize("names", [
    ["pub-00"], ["pub-" + "g" * 28], ["pub-" + "0" * 28, "resume"], ["pub-" + "0" * 28, "pub-" + "1" * 28],
])
def test_malformed_digests_of_the_public_are_refused(names):
    head = bytes([Hello.TYPE]) + MAGIC + (1).to_bytes(2, "big") + bytes([len(names)])
    body = b"".join(bytes([len(n)]) + n.encode() for n in names)
    with pytest.raises(ProtocolError):
        decode_message(head + body)


def test_the_receiver_digests_the_public_it_was_announced():
    hello = decode_message(ReceiverSession(sender_public=PUBLIC).hello())
    assert hello.public_digest == public_digest(PUBLIC)
    assert decode_message(ReceiverSession().hello()).public_digest is None


def test_a_rewritten_public_stops_the_sender():
    sender = SenderSession(Offer([OfferEntry(FILE, "a", 1)]), public=PUBLIC)
    with pytest.raises(HandshakeAltered, match="the relay altered the handshake"):
        sender.receive(ReceiverSession(sender_public=REWRITTEN).hello())
    assert sender.finished and not sender.succeeded


@pytest.mark.parametrize("receiver_public", [PUBLIC, None])
def test_the_same_public_or_an_older_receiver_goes_on(receiver_public):
    sender = SenderSession(Offer([OfferEntry(FILE, "a", 1)]), public=PUBLIC)
    assert isinstance(sender.receive(ReceiverSession(sender_public=receiver_public).hello()), HelloReceived)


def _pack_sender():
    sender = SenderSession(Offer([OfferEntry(FILE, "a", 3)]), public=PUBLIC)
    sender.fall_back_to_pack()
    return sender


def test_after_a_pack_a_late_hello_then_its_ack_confirm():
    sender = _pack_sender()
    assert not sender.pack_needs_ack  # silence so far: maybe bob
    receiver = ReceiverSession(features={PACK_ACK}, sender_public=PUBLIC)
    assert isinstance(sender.receive(receiver.hello()), HelloReceived)
    assert sender.pack_needs_ack  # ours, and it promised an ACK: a close is not enough
    assert sender.receive(receiver.acknowledge_pack(1, 3)) == Completed(1, 3)
    assert sender.succeeded


def test_after_a_pack_an_ack_of_other_counts_fails():
    sender = _pack_sender()
    receiver = ReceiverSession(features={PACK_ACK})
    sender.receive(receiver.hello())
    with pytest.raises(ProtocolError, match="confirmed 1 files and 2 bytes"):
        sender.receive(receiver.acknowledge_pack(1, 2))


def test_after_a_pack_an_older_receivers_hello_cannot_promise_an_ack():
    sender = _pack_sender()
    sender.receive(ReceiverSession().hello())
    assert not sender.pack_needs_ack
    with pytest.raises(ProtocolError):
        sender.receive(Ack(1, 3).encode())


def test_after_a_pack_only_a_hello_or_an_error_may_come_first():
    with pytest.raises(ProtocolError):
        _pack_sender().receive(Ack(1, 3).encode())
    assert _pack_sender().receive(Error("declined").encode()) == PeerError("declined")
    sender = _pack_sender()
    with pytest.raises(HandshakeAltered):
        sender.receive(ReceiverSession(features={PACK_ACK}, sender_public=REWRITTEN).hello())


def test_a_receiver_acknowledges_a_pack_only_after_its_hello_and_with_pack_ack():
    with pytest.raises(RuntimeError):
        ReceiverSession(features={PACK_ACK}).acknowledge_pack(1, 1)  # no hello yet
    receiver = ReceiverSession()
    receiver.hello()
    with pytest.raises(RuntimeError):
        receiver.acknowledge_pack(1, 1)  # pack-ack not offered
