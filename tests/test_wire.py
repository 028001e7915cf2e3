"""The packet codec: exact bytes, round trips for every type, and a parser that survives anything."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import wire

PUBLIC = bytes.fromhex("00010002000000000000001000000002000400112233445566778899aabbccddeeff")
IDENT = b"127.0.0.1:40001"

ONE_OF_EACH = [
    wire.HelloServer(PUBLIC),
    wire.HelloClient(),
    wire.ServerIdentity(IDENT),
    wire.ClientIdentity(b"127.0.0.1:40000"),
    wire.NewServer(0x0001, PUBLIC, IDENT),
    wire.ClientValidator(bytes(range(64))),
    wire.YAndServerValidator(bytes(32), bytes(range(64))),
    wire.XAndClientIdentity(bytes(range(32)), b"[2001:db8::1]:65535"),
    wire.Agreement(),
    wire.Closed(0xFFFF),
    wire.Accepted(),
    wire.Refused(),
    wire.RelayFailure(b"H", 0x0002),
    wire.SpokeFailure(1),
    wire.Done(),
    wire.Timeout(),
    wire.HelloScopedClient(417),
]


def decode_all(data: bytes) -> list[wire.Frame]:
    parser = wire.Parser()
    parser.feed(data)
    frames = list(parser.frames())
    assert parser.pending() == 0
    return frames


def test_every_type_is_covered_once():
    assert sorted(p.TYPE for p in ONE_OF_EACH) == list(range(17))
    assert set(wire.PACKET_TYPES) == set(range(17))


@pytest.mark.parametrize("packet", ONE_OF_EACH, ids=lambda p: type(p).__name__)
def test_round_trip(packet):
    data = wire.encode(0x1234, packet)
    assert data[:6] == b"1234%02x" % packet.TYPE
    assert decode_all(data) == [wire.Frame(0x1234, packet)]
    assert wire.Frame(0x1234, packet).encode() == data


def test_exact_bytes_of_bob_wire_example():
    # docs/protocol.md §3.4: the relay announcing server 0001 to client 0002.
    assert wire.encode(0, wire.NewServer(1, PUBLIC, IDENT)) == (
        b"000004" + b"0001" + PUBLIC + IDENT + b"\0"
    )
    assert wire.encode(0, wire.HelloClient()) == b"000001"
    assert wire.encode(0, wire.HelloScopedClient(417)) == b"000010\x01\xa1"
    assert wire.encode(2, wire.Accepted()) == b"00020a"
    assert wire.encode(0, wire.Closed(0x00AB)) == b"00000900ab"
    assert wire.encode(1, wire.SpokeFailure(4)) == b"00010d\x04"
    assert wire.encode(0, wire.RelayFailure(b"N", 0)) == b"00000cN0000"


def test_largest_packet_is_y_and_validator():
    sizes = {type(p).__name__: len(wire.encode(0, p)) for p in ONE_OF_EACH}
    assert max(sizes.values()) == 102 == sizes["YAndServerValidator"]


def test_uppercase_hex_is_accepted():
    assert decode_all(b"00AB09FFFF") == [wire.Frame(0xAB, wire.Closed(0xFFFF))]
    assert decode_all(b"00000A") == [wire.Frame(0, wire.Accepted())]


def test_several_packets_in_one_read_and_one_byte_at_a_time():
    data = b"".join(wire.encode(i, p) for i, p in enumerate(ONE_OF_EACH))
    expected = [wire.Frame(i, p) for i, p in enumerate(ONE_OF_EACH)]
    assert decode_all(data) == expected
    parser = wire.Parser()
    got = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        got.extend(parser.frames())
    assert got == expected


@pytest.mark.parametrize(
    "data, message",
    [
        (b"00001", "unknown"),  # "1" alone is not decidable yet: "10" is a type, "11" is not
        (b"000011", "unknown"),
        (b"0000ff", "unknown"),
        (b"0x0001", "not hexadecimal"),
        (b"+00001", "not hexadecimal"),
        (b"00 001", "not hexadecimal"),
        (b"0000g1", "not hexadecimal"),
        (b"00000d\x05", "code 5"),
        (b"00000cX0000", "letter"),
        (b"000009zzzz", "not hexadecimal"),
        (b"000004zzzz" + PUBLIC + IDENT + b"\0", "not hexadecimal"),
        (b"000002" + b"a" * 54, "no NUL within 53"),
        (b"000007" + bytes(32) + b"a" * 60 + b"\0", "no NUL within 53"),
        (b"000003" + b"127.0.0.1\n:1\0", "newline"),
    ],
)
def test_malformed_input_is_a_precise_error(data, message):
    parser = wire.Parser()
    parser.feed(data)
    if message == "unknown" and len(data) < 6:
        assert list(parser.frames()) == []  # not decidable yet
        parser.feed(b"1")
    with pytest.raises(wire.WireError, match=message):
        list(parser.frames())
    # A failed parser stays failed: the connection cannot be resynchronised.
    with pytest.raises(wire.WireError):
        parser.feed(b"000001")


def test_identity_limit_is_53_bytes():
    ok = b"x" * 53
    assert decode_all(wire.encode(0, wire.ServerIdentity(ok))) == [
        wire.Frame(0, wire.ServerIdentity(ok))
    ]
    with pytest.raises(wire.WireError):
        wire.encode(0, wire.ServerIdentity(b"x" * 54))


def test_bad_header_byte_fails_before_the_header_is_complete():
    parser = wire.Parser()
    parser.feed(b"0Q")
    with pytest.raises(wire.WireError):
        list(parser.frames())


def test_constructors_refuse_wrong_sizes():
    with pytest.raises(ValueError):
        wire.HelloServer(bytes(33))
    with pytest.raises(ValueError):
        wire.ClientValidator(bytes(63))
    with pytest.raises(ValueError):
        wire.SpokeFailure(5)
    with pytest.raises(ValueError):
        wire.RelayFailure(b"Z", 0)
    with pytest.raises(ValueError):
        wire.encode(0x10000, wire.Done())


def test_identity_of_formats_addresses():
    assert wire.identity_of("127.0.0.1", 40000) == b"127.0.0.1:40000"
    assert wire.identity_of("::1", 9) == b"[::1]:9"
    assert wire.identity_of("::ffff:10.1.2.3", 7) == b"10.1.2.3:7"
    assert wire.identity_of("fe80::1%eth0", 7) == b"[fe80::1]:7"
    longest = wire.identity_of("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
    assert len(longest) <= wire.MAX_IDENTITY


packets = st.sampled_from(ONE_OF_EACH)
uids = st.integers(0, 0xFFFF)


@settings(max_examples=200)
@given(st.lists(st.tuples(uids, packets), max_size=20), st.data())
def test_any_split_of_a_valid_stream_decodes_the_same(frames, data):
    stream = b"".join(wire.encode(u, p) for u, p in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    parser = wire.Parser()
    got = []
    last = 0
    for cut in cuts + [len(stream)]:
        parser.feed(stream[last:cut])
        got.extend(parser.frames())
        last = cut
    assert got == [wire.Frame(u, p) for u, p in frames]
    assert parser.pending() == 0


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=64), max_size=12))
def test_random_bytes_raise_only_wire_error(chunks):
    parser = wire.Parser()
    try:
        for chunk in chunks:
            parser.feed(chunk)
            for frame in parser.frames():
                # Whatever decodes must re-encode to a valid packet.
                assert wire.encode(frame.uid, frame.packet)[:4] == b"%04x" % frame.uid
            assert parser.pending() < 6 + 38 + 54
    except wire.WireError:
        pass


@settings(max_examples=300)
@given(st.lists(st.tuples(uids, packets), min_size=1, max_size=5), st.binary(min_size=1, max_size=8))
def test_valid_prefix_then_garbage(frames, garbage):
    stream = b"".join(wire.encode(u, p) for u, p in frames)
    parser = wire.Parser()
    parser.feed(stream)
    assert list(parser.frames()) == [wire.Frame(u, p) for u, p in frames]
    parser.feed(garbage)
    try:
        list(parser.frames())
    except wire.WireError:
        pass
