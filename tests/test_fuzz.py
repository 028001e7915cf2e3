"""Fuzzing the decoders that read bytes from strangers: the relay's wire parser and WebSocket
frame reader, the record layer's Opener, our data-phase codec, the receiver's session and
bob's pack reader.

The properties live in ``fuzz_targets`` (shared with ``bench/fuzz.py``). Inputs here are
structure-aware: valid streams built from random fields, then mutated (bits flipped, bytes
inserted, cut, records dropped, repeated, swapped, forged), because random bytes alone die at
the first type check. Example counts are bounded for CI; ``PEER_RELAY_LONG=1`` multiplies
them by 50 (see docs/reliability.md).
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_targets as targets
from packet_strategies import packets, uids
from peer import transfer
from peer.messages import Data
from peer.offer import name_problem
from peer.records import MAX_RECORD_SIZE
from relay import wire

LONG = os.environ.get("PEER_RELAY_LONG") == "1"


def examples(count: int) -> settings:
    return settings(
        max_examples=count * 50 if LONG else count,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- strategies ----------------------------------------------------------------------------

mutations = st.lists(
    st.tuples(st.integers(0, 10_000), st.sampled_from(["flip", "insert", "delete", "upper", "nul"]),
              st.integers(0, 255)),
    max_size=4,
)


def apply(stream: bytes, edits) -> bytes:
    data = bytearray(stream)
    for position, kind, value in edits:
        if not data and kind != "insert":
            continue
        at = position % (len(data) + (kind == "insert"))
        if kind == "flip":
            data[at] ^= 1 << (value % 8)
        elif kind == "insert":
            data[at:at] = bytes([value])
        elif kind == "delete":
            del data[at]
        elif kind == "upper":
            data[at : at + 6] = bytes(data[at : at + 6]).upper()
        else:
            data[at] = 0
    return bytes(data)


cuts = st.lists(st.integers(0, 2000), max_size=12)


# --- relay.wire.Parser ---------------------------------------------------------------------


@examples(300)
@given(frames=st.lists(st.tuples(uids, packets), max_size=12), edits=mutations, cuts=cuts)
def test_parser_on_mutated_packet_streams(frames, edits, cuts):
    stream = apply(b"".join(wire.encode(u, p) for u, p in frames), edits)
    targets.check_wire_stream(stream, cuts)


@examples(200)
@given(stream=st.binary(max_size=600), cuts=cuts)
def test_parser_on_random_bytes(stream, cuts):
    targets.check_wire_stream(stream, cuts)


@examples(100)
@given(frames=st.lists(st.tuples(uids, packets), min_size=1, max_size=8), cuts=cuts)
def test_parser_on_valid_streams_gives_every_frame(frames, cuts):
    stream = b"".join(wire.encode(u, p) for u, p in frames)
    parser = wire.Parser()
    got = []
    for piece in targets.split_at(stream, cuts):
        parser.feed(piece)
        got.extend(parser.frames())
    assert got == [wire.Frame(u, p) for u, p in frames]
    assert parser.pending() == 0


def test_longest_partial_bound_is_reachable_and_tight():
    """The bound the parser checks against is the longest packet's size minus one byte."""
    longest = wire.encode(1, wire.YAndServerValidator(bytes(32), bytes(64)))
    parser = wire.Parser()
    parser.feed(longest[:-1])
    assert list(parser.frames()) == []
    assert parser.pending() == targets.LONGEST_PARTIAL == len(longest) - 1
    parser.feed(longest[-1:])
    assert len(list(parser.frames())) == 1


# --- peer.records.Opener -------------------------------------------------------------------

messages = st.lists(st.binary(min_size=1, max_size=2000), max_size=6)


@examples(150)
@given(messages=messages, close=st.booleans(), edits=mutations, cuts=cuts)
def test_opener_never_yields_a_forged_record(messages, close, edits, cuts):
    stream = targets.sealed_stream(messages, close)
    mutated = apply(stream, edits)
    targets.check_opener(mutated, cuts, messages, intact=mutated == stream)


@examples(60)
@given(messages=messages, close=st.booleans(), cut=st.integers(0, 100_000), cuts=cuts)
def test_opener_on_a_truncated_stream(messages, close, cut, cuts):
    stream = targets.sealed_stream(messages, close)
    cut %= len(stream) + 1
    targets.check_opener(stream[:cut], cuts, messages, intact=cut == len(stream))


@examples(100)
@given(stream=st.binary(max_size=400), cuts=cuts)
def test_opener_on_random_bytes(stream, cuts):
    targets.check_opener(stream, cuts, [], intact=False)


def test_opener_on_a_largest_record_split_everywhere():
    message = bytes(range(256)) * (MAX_RECORD_SIZE // 256) + b"!" * (MAX_RECORD_SIZE % 256)
    stream = targets.sealed_stream([message, b"end"], close=True)
    targets.check_opener(stream, list(range(0, len(stream), 997)), [message, b"end"], intact=True)


# --- peer.messages.decode_message ----------------------------------------------------------

plaintexts = st.one_of(
    st.binary(min_size=0, max_size=80),
    st.builds(lambda t, body: bytes([t]) + body, st.integers(0, 12), st.binary(max_size=80)),
    st.builds(lambda m, e: apply(m.encode(), e),
              st.sampled_from(targets._sample_messages()), mutations),
)


@examples(400)
@given(plaintext=plaintexts)
def test_decode_message_raises_only_protocol_error(plaintext):
    targets.check_decode(plaintext)


def test_decode_message_at_the_size_limits():
    for size in (0, 1, MAX_RECORD_SIZE, MAX_RECORD_SIZE + 1):
        targets.check_decode(bytes([Data.TYPE]) + bytes(max(size - 1, 0)))


# --- peer.transfer.ReceiverSession ---------------------------------------------------------

names = st.text("abcé0._-", min_size=1, max_size=6).filter(lambda n: name_problem(n) is None)
contents = st.one_of(st.binary(max_size=300), st.integers(0, 3).map(lambda k: bytes(k * 20_000 + 7)))
file_sets = st.dictionaries(names, contents, min_size=1, max_size=4)


zstd = pytest.mark.skipif(not targets.CAN_COMPRESS, reason="no zstd in this build")


@examples(60)
@given(files=file_sets, offer_piece=st.integers(1, 200), data_piece=st.integers(1, 9000),
       compress=st.booleans() if targets.CAN_COMPRESS else st.just(False))
def test_receiver_session_takes_any_honest_transfer(files, offer_piece, data_piece, compress):
    records = targets.valid_transfer(sorted(files.items()), offer_piece=offer_piece,
                                     data_piece=data_piece, compress=compress)
    events = targets.check_receiver(records, features=targets.receiver_features(2 * compress))
    assert isinstance(events[-1], transfer.TransferDone)
    got: dict[str, bytearray] = {}
    for event in events:
        if isinstance(event, transfer.FileData):
            got.setdefault(event.entry.path, bytearray()).extend(event.data)
    assert {k: bytes(v) for k, v in got.items()} == {k: v for k, v in files.items() if v}


@examples(300)
@given(files=file_sets, seed=st.randoms(use_true_random=False), count=st.integers(1, 4),
       decline=st.booleans(), compress=st.booleans())
def test_receiver_session_on_mutated_transfers(files, seed, count, decline, compress):
    records = targets.valid_transfer(sorted(files.items()), data_piece=5000, compress=compress)
    targets.check_receiver(targets.mutate_records(records, seed, count), decline=decline,
                           features=targets.receiver_features(2 * compress))


@examples(150)
@given(records=st.lists(plaintexts, max_size=8))
def test_receiver_session_on_random_records(records):
    targets.check_receiver(records)


def test_receiver_session_with_a_nested_offer():
    records = targets.valid_transfer([("d/e/f", b"deep"), ("d/g", b"")], directories=["d", "d/e"])
    events = targets.check_receiver(records)
    assert isinstance(events[-1], transfer.TransferDone)


# --- peer.compression.inflate_frame -------------------------------------------------------


@zstd
@examples(200)
@given(content=st.one_of(st.binary(min_size=1, max_size=3000),
                         st.integers(1, 200_000).map(lambda n: b"z" * n)),
       edits=mutations, limit=st.one_of(st.none(), st.integers(0, 300_000)))
def test_inflate_on_mutated_frames(content, edits, limit):
    frame = targets.compression.compress_block(content) or b"\x28\xb5\x2f\xfd" + content
    targets.check_inflate(apply(frame, edits), limit)


@zstd
@examples(100)
@given(frame=st.binary(max_size=300), limit=st.one_of(st.none(), st.integers(0, 10_000)))
def test_inflate_on_random_bytes(frame, limit):
    targets.check_inflate(b"\x28\xb5\x2f\xfd" + frame, limit)


@zstd
def test_inflate_refuses_a_bomb():
    """A frame that declares more than the file has left is refused before it is inflated."""
    frame = targets.compression.compress_block(bytes(targets.compression.FRAME_CONTENT))
    targets.check_inflate(frame, 1000)
    with pytest.raises(targets.compression.CompressionError):
        targets.compression.inflate_frame(frame, 1000)


# --- relay.frames.FrameReader ----------------------------------------------------------------

frame_items = st.lists(
    st.one_of(
        st.tuples(st.just("data"), st.lists(st.binary(max_size=3000), min_size=1, max_size=3)),
        st.tuples(st.sampled_from(["ping", "pong"]), st.binary(max_size=125)),
        st.tuples(st.just("text"), st.text(max_size=20)),
        st.tuples(st.just("close"), st.sampled_from([1000, 1001, 1008, 3000, 4999])),
    ),
    max_size=6,
)


def wsproto_stream(items, client: bool) -> bytes:
    """Frames written by wsproto (an independent writer) for ``items``."""
    from wsproto.frame_protocol import FrameProtocol

    writer = FrameProtocol(client=client, extensions=[])
    stream = b""
    for kind, value in items:
        if kind == "data":
            for index, piece in enumerate(value):
                stream += writer.send_data(piece, fin=index == len(value) - 1)
        elif kind == "ping":
            stream += writer.ping(value)
        elif kind == "pong":
            stream += writer.pong(value)
        elif kind == "text":
            stream += writer.send_data(value, fin=True)
        else:
            stream += writer.close(value, "bye")
            writer = FrameProtocol(client=client, extensions=[])  # wsproto writes one Close
    return stream


@examples(150)
@given(frame_items, st.booleans(), mutations, cuts)
def test_frame_reader_on_mutated_streams(items, masked, edits, cuts):
    targets.check_frame_stream(apply(wsproto_stream(items, masked), edits), cuts, masked)


@examples(150)
@given(st.binary(max_size=3000), st.booleans(), cuts)
def test_frame_reader_on_random_bytes(stream, masked, cuts):
    targets.check_frame_stream(stream, cuts, masked)


# --- peer.pack.PackReader ------------------------------------------------------------------

PACK_SEEDS = [targets.stream_and_cuts(seed)[0] for seed in targets.pack_seeds()[::3]]


@examples(200)
@given(st.sampled_from(PACK_SEEDS), mutations, cuts, st.booleans(), st.booleans(), st.booleans())
def test_pack_reader_on_mutated_packs(stream, edits, cuts, decline, identify, rehash):
    """Both stages: describing before the decision (declined or not), extracting after it.
    With `rehash` the trailer is made to match again, so a mutation gets past the SHA-1."""
    stream = apply(stream, edits)
    if rehash:
        stream = targets.with_trailer(stream)
    targets.check_pack(stream, cuts, decline, identify)


@examples(100)
@given(st.binary(max_size=400), cuts, st.booleans())
def test_pack_reader_on_random_bytes_after_a_pack_header(body, cuts, decline):
    targets.check_pack(b"PACK\0\0\0\2" + body, cuts, decline)


def test_pack_seeds_are_read_whole():
    for stream in PACK_SEEDS:
        events, verdict = targets._read_pack([stream], False, targets.PACK_LIMITS)
        assert verdict is None and events[-1] == ("end",)
        events, verdict = targets._read_pack([stream], False, targets.PACK_LIMITS_NO_IDENTIFYING)
        assert verdict is None and events[-1] == ("end",)


# --- the byte-level adapters that bench/fuzz.py and atheris drive --------------------------


@examples(60)
@given(name=st.sampled_from(sorted(targets.TARGETS)), edits=mutations, extra=st.binary(max_size=40))
def test_byte_level_targets_on_mutated_seeds(name, edits, extra):
    one_input, _ = targets.TARGETS[name]
    for seed in targets.seeds(name):
        one_input(apply(seed, edits) + extra)


def test_mutate_records_is_deterministic_per_seed():
    records = targets.valid_transfer([("a", b"x" * 100)])
    assert targets.mutate_records(records, random.Random(7), 3) == targets.mutate_records(
        records, random.Random(7), 3)
