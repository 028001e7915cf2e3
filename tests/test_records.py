"""The record layer: the §4.5 vector, arbitrary stream splits, corruption and close."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer import records
from peer.records import CLOSE, CLOSED, MAX_BIG_RECORD_SIZE, MAX_RECORD_SIZE, Opener, RecordError, Sealer

# docs/protocol.md §5.6.
SUB0 = bytes.fromhex(
    "df28d5a303f7f126d9d1ac578e67187b3cd086252a162b4b366d2451b3d3f694"
    "d039e495a1916e639d1642e0d8d044ac181e217fccd5f834db8cd14b9087a087"
)
PACK_HEADER = bytes.fromhex("5041434b0000000200000002")
FIRST_RECORD = bytes.fromhex("000ceab30d289a1b22f918f532b6e6301a735bf7efc8dd180a4ca8763729")


def drain(opener: Opener) -> list:
    """Everything `next_record` has ready, CLOSED included (once)."""
    out = []
    while (record := opener.next_record()) is not None:
        out.append(record)
        if record is CLOSED:
            break
    return out


def test_first_record_vector():
    assert Sealer(SUB0).seal(PACK_HEADER) == FIRST_RECORD


def test_first_record_vector_opens():
    opener = Opener(SUB0)
    opener.feed(FIRST_RECORD)
    assert opener.next_record() == PACK_HEADER
    assert opener.next_record() is None
    opener.eof()


def test_sequence_numbers_change_the_bytes():
    sealer = Sealer(SUB0)
    first, second = sealer.seal(b"same"), sealer.seal(b"same")
    assert first != second
    assert sealer.sequence == 2


def test_records_out_of_order_fail():
    sealer = Sealer(SUB0)
    first, second = sealer.seal(b"one"), sealer.seal(b"two")
    opener = Opener(SUB0)
    opener.feed(second + first)
    with pytest.raises(RecordError):
        opener.next_record()


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(st.binary(min_size=1, max_size=3000), min_size=0, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=40_000), max_size=20),
    close=st.booleans(),
)
def test_any_split_of_the_stream_gives_the_records_back(messages, cuts, close):
    sealer = Sealer(SUB0)
    stream = b"".join(sealer.seal(message) for message in messages) + (CLOSE if close else b"")
    opener = Opener(SUB0)
    received = []
    boundaries = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    for start, end in zip(boundaries, boundaries[1:]):
        opener.feed(stream[start:end])
        if not opener.closed:
            received.extend(drain(opener))
    opener.eof()
    assert received == messages + ([CLOSED] if close else [])


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(st.binary(min_size=1, max_size=3000), min_size=0, max_size=12),
    reads=st.lists(st.tuples(st.integers(1, 40_000), st.integers(0, 40_000)), max_size=30),
    close=st.booleans(),
)
def test_receiving_into_the_openers_space_gives_the_records_back(messages, reads, close):
    # As the channel does over TCP: ask for room for N bytes, the transport fills only some.
    sealer = Sealer(SUB0)
    stream = b"".join(sealer.seal(message) for message in messages) + (CLOSE if close else b"")
    opener = Opener(SUB0)
    received, position = [], 0
    for room, got in [*reads, (len(stream) + 1, len(stream))]:
        count = min(room, got, len(stream) - position)
        with opener.space(room) as view:
            assert len(view) == room
            view[:count] = stream[position : position + count]
        opener.filled(count)
        position += count
        if not opener.closed:
            received.extend(drain(opener))
    opener.eof()
    assert received == messages + ([CLOSED] if close else [])


@settings(max_examples=10, deadline=None)
@given(size=st.integers(min_value=1, max_value=MAX_RECORD_SIZE), piece=st.integers(1, 5000))
def test_large_records_in_small_pieces(size, piece):
    message = os.urandom(size)
    record = Sealer(SUB0).seal(message)
    opener = Opener(SUB0)
    received = []
    for start in range(0, len(record), piece):
        opener.feed(record[start : start + piece])
        received.extend(drain(opener))
    assert received == [message]


def test_byte_by_byte():
    sealer = Sealer(SUB0)
    messages = [b"a", b"bc" * 50, os.urandom(MAX_RECORD_SIZE)]
    stream = b"".join(map(sealer.seal, messages))
    opener = Opener(SUB0)
    received = []
    for index in range(len(stream)):
        opener.feed(stream[index : index + 1])
        received.extend(drain(opener))
    assert received == messages


def test_seal_many_cuts_into_maximal_records():
    data = os.urandom(2 * MAX_RECORD_SIZE + 5)
    sealed = Sealer(SUB0).seal_many(data)
    assert [int.from_bytes(record[:2], "big") for record in sealed] == [MAX_RECORD_SIZE, MAX_RECORD_SIZE, 5]
    opener = Opener(SUB0)
    opener.feed(b"".join(sealed))
    assert b"".join(drain(opener)) == data


def test_seal_many_with_small_records_and_no_data():
    sealer = Sealer(SUB0)
    assert sealer.seal_many(b"") == []
    sealed = sealer.seal_many(b"0123456789", record_size=4)
    assert [int.from_bytes(record[:2], "big") for record in sealed] == [4, 4, 2]
    with pytest.raises(ValueError):
        sealer.seal_many(b"x", record_size=0)
    with pytest.raises(ValueError):
        sealer.seal_many(b"x", record_size=MAX_RECORD_SIZE + 1)


@pytest.mark.parametrize("size", [0, MAX_RECORD_SIZE + 1, 0xFFFF])
def test_seal_refuses_bad_sizes(size):
    sealer = Sealer(SUB0)
    with pytest.raises(ValueError):
        sealer.seal(bytes(size))
    assert sealer.sequence == 0  # a refused record burns no nonce


def test_seal_accepts_the_largest_record():
    record = Sealer(SUB0).seal(bytes(MAX_RECORD_SIZE))
    assert record[:2] == b"\x7f\xff"
    assert len(record) == 2 + MAX_RECORD_SIZE + 16


# --- corruption ---------------------------------------------------------------------------


@pytest.mark.parametrize("position", [2, 10, len(FIRST_RECORD) - 1], ids=["ciphertext", "middle", "tag"])
def test_flipped_bit_is_corruption(position):
    tampered = bytearray(FIRST_RECORD)
    tampered[position] ^= 0x01
    opener = Opener(SUB0)
    opener.feed(bytes(tampered))
    with pytest.raises(RecordError):
        opener.next_record()
    with pytest.raises(RecordError):  # and it stays broken
        opener.next_record()


def test_tampered_length_is_corruption():
    # Same bytes, length one smaller: the AAD changes, so the tag fails.
    tampered = b"\x00\x0b" + FIRST_RECORD[2:-1]
    opener = Opener(SUB0)
    opener.feed(tampered)
    with pytest.raises(RecordError):
        opener.next_record()


@pytest.mark.parametrize("header", [b"\x00\x00", b"\x80\x00", b"\xff\xfe"])
def test_invalid_length_is_corruption(header):
    opener = Opener(SUB0)
    opener.feed(header + bytes(40))
    with pytest.raises(RecordError):
        opener.next_record()


def test_wrong_key_is_corruption():
    opener = Opener(bytes(64))
    opener.feed(FIRST_RECORD)
    with pytest.raises(RecordError):
        opener.next_record()


@pytest.mark.parametrize("cut", [1, 2, 10, len(FIRST_RECORD) - 1])
def test_eof_inside_a_record_is_corruption(cut):
    opener = Opener(SUB0)
    opener.feed(FIRST_RECORD[:cut])
    assert opener.next_record() is None
    with pytest.raises(RecordError):
        opener.eof()


def test_eof_at_a_boundary_is_a_clean_end():
    opener = Opener(SUB0)
    opener.eof()  # nothing at all
    opener = Opener(SUB0)
    opener.feed(FIRST_RECORD)
    assert drain(opener) == [PACK_HEADER]
    opener.eof()
    assert not opener.closed
    with pytest.raises(RuntimeError):
        opener.feed(b"more")


# --- close -------------------------------------------------------------------------------


def test_close_marker_alone():
    opener = Opener(SUB0)
    opener.feed(CLOSE)
    assert opener.next_record() is CLOSED
    assert opener.closed
    assert opener.next_record() is CLOSED  # forever
    opener.eof()


def test_close_after_records_and_garbage_after_close_is_ignored():
    sealer = Sealer(SUB0)
    opener = Opener(SUB0)
    opener.feed(sealer.seal(b"last words") + CLOSE + b"\x00\x05trailing junk")
    assert opener.next_record() == b"last words"
    assert opener.next_record() is CLOSED
    opener.feed(b"even more junk")
    assert opener.next_record() is CLOSED
    opener.eof()


def test_close_needs_only_two_bytes():
    # Readers look at the first two bytes of the marker; the stream may end after them.
    opener = Opener(SUB0)
    opener.feed(b"\xff")
    assert opener.next_record() is None
    opener.feed(b"\xff")
    assert opener.next_record() is CLOSED
    opener.eof()


# --- ciphers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", [1, 2, 7])
@pytest.mark.parametrize("cls", [Sealer, Opener])
def test_only_gcm_can_carry_records(cls, cipher):
    with pytest.raises(ValueError, match="20-byte nonce"):
        cls(SUB0, cipher)


@pytest.mark.parametrize("cls", [Sealer, Opener])
def test_sub_key_must_be_64_bytes(cls):
    with pytest.raises(ValueError):
        cls(SUB0[:44])


def test_nonce_layout():
    # Base nonce from sub[32:44], then the sequence number as a big-endian u64.
    assert records._nonce(SUB0[32:44], 0x0102) == SUB0[32:44] + bytes(6) + b"\x01\x02"
    with pytest.raises(RecordError):
        records._nonce(SUB0[32:44], 2**64)


# -- big records (our peers only, once agreed) ------------------------------------------------


def big_pair() -> tuple[Sealer, Opener]:
    sealer, opener = Sealer(SUB0), Opener(SUB0)
    sealer.big = opener.big = True
    return sealer, opener


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([1, 100, MAX_RECORD_SIZE, MAX_RECORD_SIZE + 1, 70_000,
                                    MAX_BIG_RECORD_SIZE]), max_size=6),
    piece=st.integers(1, 100_000),
)
def test_big_and_small_records_mix_in_any_split(sizes, piece):
    sealer, opener = big_pair()
    messages = [os.urandom(size) for size in sizes]
    stream = b"".join(sealer.seal(message) for message in messages) + CLOSE
    received = []
    for start in range(0, len(stream), piece):
        opener.feed(stream[start : start + piece])
        if not opener.closed:
            received.extend(drain(opener))
    assert received == [*messages, CLOSED]


def test_a_big_record_has_a_four_byte_header_that_the_aad_covers():
    sealer, opener = big_pair()
    record = sealer.seal(bytes(MAX_RECORD_SIZE + 1))
    assert record[:4] == (0x8000_0000 | (MAX_RECORD_SIZE + 1)).to_bytes(4, "big")
    assert len(record) == 4 + MAX_RECORD_SIZE + 1 + 16
    assert Sealer(SUB0).seal(bytes(MAX_RECORD_SIZE))[:2] == b"\x7f\xff"  # small stays small
    # A length changed in the header is caught (it is in the AAD), not misread.
    forged = bytearray(sealer.seal(bytes(MAX_RECORD_SIZE + 2)))
    forged[3] -= 1
    opener.feed(bytes(forged[:-1]))
    with pytest.raises(RecordError, match="failed authentication"):
        drain(opener)


def test_big_records_only_once_agreed():
    with pytest.raises(ValueError, match=f"1..{MAX_RECORD_SIZE} bytes"):
        Sealer(SUB0).seal(bytes(MAX_RECORD_SIZE + 1))
    sealer, _ = big_pair()
    with pytest.raises(ValueError, match=f"1..{MAX_BIG_RECORD_SIZE} bytes"):
        sealer.seal(bytes(MAX_BIG_RECORD_SIZE + 1))
    record = sealer.seal(bytes(MAX_RECORD_SIZE + 1))
    opener = Opener(SUB0)  # as bob, or one of ours that did not offer them
    opener.feed(record)
    with pytest.raises(RecordError, match="invalid record length 0x8000"):
        drain(opener)


@pytest.mark.parametrize("length", [0, 1, MAX_RECORD_SIZE, MAX_BIG_RECORD_SIZE + 1, 0x10_0000])
def test_a_big_header_with_a_length_out_of_bounds_is_corruption(length):
    _, opener = big_pair()
    opener.feed((0x8000_0000 | length).to_bytes(4, "big") + bytes(64))
    with pytest.raises(RecordError, match="invalid big record length"):
        drain(opener)
