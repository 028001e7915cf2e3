"""WebSocket frames after the upgrade: our reader against wsproto's writer, and the rules."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import CloseReason, FrameProtocol

from relay import frames
from relay.frames import Close, FrameError, FrameReader, Payload, Ping, TextMessage

MAX = 1 << 20


@pytest.fixture(params=["C", "python"])
def masking(request, monkeypatch):
    """Every test runs with websockets' C masker and with the pure-Python fallback."""
    if request.param == "python":
        monkeypatch.setattr(frames, "_fast_mask", None)
    elif frames._fast_mask is None:
        pytest.skip("websockets' C masker is not installed")
    return request.param


def read_all(reader: FrameReader, data: bytes, cuts: list[int]) -> list:
    """Feed ``data`` cut at ``cuts`` and collect every event (payload pieces joined)."""
    events: list = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        reader.feed(data[start:cut])
        start = cut
        for event in reader.events():
            if isinstance(event, Payload) and events and isinstance(events[-1], Payload) \
                    and not events[-1].last:
                events[-1] = Payload(bytes(events[-1].data) + bytes(event.data), event.last)
            else:
                events.append(Payload(bytes(event.data), event.last) if isinstance(event, Payload)
                              else event)
    return events


messages = st.lists(
    st.one_of(
        st.tuples(st.just("data"), st.lists(st.binary(max_size=70_000), min_size=1, max_size=4)),
        st.tuples(st.just("ping"), st.binary(max_size=125)),
        st.tuples(st.just("pong"), st.binary(max_size=125)),
    ),
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(messages, st.booleans(), st.lists(st.integers(0, 400_000), max_size=20))
def test_what_wsproto_writes_we_read_however_it_is_cut(items, client, cuts):
    for param in ("C", "python"):
        saved = frames._fast_mask
        if param == "python":
            frames._fast_mask = None
        try:
            check_wsproto_stream(items, client, cuts)
        finally:
            frames._fast_mask = saved


def check_wsproto_stream(items, client, cuts):
    writer = FrameProtocol(client=client, extensions=[])
    wire = b""
    expected: list = []
    for kind, value in items:
        if kind == "data":
            for index, piece in enumerate(value):
                wire += writer.send_data(piece, fin=index == len(value) - 1)
            expected.append(Payload(b"".join(value), True))
        elif kind == "ping":
            wire += writer.ping(value)
            expected.append(Ping(value))
        else:
            wire += writer.pong(value)
    wire += writer.close(CloseReason.GOING_AWAY, "bye é")
    expected.append(Close(1001, "bye é"))
    got = read_all(FrameReader(masked=client, max_message=MAX), wire, [c for c in cuts if c < len(wire)])
    # A message of empty frames is one empty last piece; the stream drops empty data anyway.
    assert got == expected


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 262_144])
def test_our_frames_read_back(masking, masked, size):
    payload = os.urandom(size)
    wire = b"".join(bytes(piece) for piece in frames.binary_frame(memoryview(payload), masked))
    wire += frames.pong_frame(b"late pong", masked) + frames.close_frame(1000, "", masked)
    reader = FrameReader(masked=masked, max_message=MAX)
    assert read_all(reader, wire, [1, 3, 7, 100, 70_000]) == [Payload(payload, True), Close(1000, "")]


def test_both_maskers_agree():
    if frames._fast_mask is None:
        pytest.skip("websockets' C masker is not installed")
    data, key = os.urandom(100_003), os.urandom(4)
    fast = frames.mask(data, key)
    frames_fast, frames._fast_mask = frames._fast_mask, None
    try:
        assert bytes(frames.mask(data, key)) == bytes(fast)
        assert bytes(frames.mask(frames.mask(data, key), key)) == data
    finally:
        frames._fast_mask = frames_fast


def test_payload_is_handed_out_as_it_arrives(masking):
    """A big frame is never assembled: each read's share comes out at once."""
    payload = os.urandom(300_000)
    header, body = frames.binary_frame(memoryview(payload), True)
    reader = FrameReader(masked=True, max_message=MAX)
    reader.feed(bytes(header) + bytes(body[:1000]))
    assert list(reader.events()) == [Payload(payload[:1000], False)]
    reader.feed(bytes(body[1000:1003]))  # the mask key's turn must follow the offset
    assert list(reader.events()) == [Payload(payload[1000:1003], False)]
    reader.feed(bytes(body[1003:]))
    assert list(reader.events()) == [Payload(payload[1003:], True)]


def frame(first: int, payload: bytes = b"", *, masked: bool = True, length: bytes | None = None) -> bytes:
    key = b"\x01\x02\x03\x04"
    if length is None:
        bit, size = 0x80 if masked else 0, len(payload)
        length = (bytes([size | bit]) if size < 126 else bytes([126 | bit]) + struct.pack("!H", size)
                  if size < 1 << 16 else bytes([127 | bit]) + struct.pack("!Q", size))
    return bytes([first]) + length + (key + bytes(frames.mask(payload, key)) if masked else payload)


@pytest.mark.parametrize("wire, masked, code, words", [
    (frame(0x82, b"x", masked=False), True, 1002, "must be masked"),
    (frame(0x82, b"x"), False, 1002, "must not be masked"),
    (frame(0xC2, b"x"), True, 1002, "reserved bits"),
    (frame(0x83, b"x"), True, 1002, "unknown opcode 0x3"),
    (frame(0x8B, b"x"), True, 1002, "unknown opcode 0xb"),
    (frame(0x09, b"x"), True, 1002, "fragmented control frame"),
    (frame(0x89, length=bytes([0x80 | 126]) + struct.pack("!H", 126)), True, 1002, "longer than 125"),
    (frame(0x80, b"x"), True, 1002, "continuation frame outside a message"),
    (frame(0x02, b"x") + frame(0x82, b"y"), True, 1002, "new message before"),
    (frame(0x88, b"\x03"), True, 1002, "1-byte payload"),
    (frame(0x88, struct.pack("!H", 1005)), True, 1002, "invalid Close code 1005"),
    (frame(0x88, struct.pack("!H", 999)), True, 1002, "invalid Close code 999"),
    (frame(0x88, struct.pack("!H", 2000)), True, 1002, "invalid Close code 2000"),
    (frame(0x88, struct.pack("!H", 1000) + b"\xff"), True, 1007, "not valid UTF-8"),
    (frame(0x82, length=bytes([0x80 | 127]) + struct.pack("!Q", 1 << 63)), True, 1002, "top bit"),
    (frame(0x82, length=bytes([0x80 | 127]) + struct.pack("!Q", MAX + 1)), True, 1009, "larger than"),
    (frame(0x02, bytes(MAX // 2)) + frame(0x80, bytes(MAX // 2 + 1)), True, 1009, "larger than"),
])
def test_broken_rules_are_named_with_their_close_code(masking, wire, masked, code, words):
    reader = FrameReader(masked=masked, max_message=MAX)
    reader.feed(wire)
    with pytest.raises(FrameError) as failure:
        list(reader.events())
    assert failure.value.code == code and words in failure.value.reason
    reader.feed(frame(0x82, b"more", masked=masked))
    with pytest.raises(FrameError):  # spent: it says the same again
        list(reader.events())


def test_a_text_message_is_refused_unread_and_nothing_after_a_close_counts(masking):
    reader = FrameReader(masked=True, max_message=MAX)
    reader.feed(frame(0x81, b"hello") + frame(0x82, b"after"))
    assert list(reader.events()) == [TextMessage()]
    reader = FrameReader(masked=True, max_message=MAX)
    reader.feed(frame(0x88) + frame(0x82, b"after"))
    assert list(reader.events()) == [Close(frames.NO_STATUS, "")]
    reader.feed(frame(0x82, b"later still"))
    assert list(reader.events()) == []


def test_close_reasons_are_cut_to_fit_on_a_character_boundary():
    wire = frames.close_frame(1008, "é" * 100, False)
    assert len(wire) == 2 + 125 - 1  # 61 two-byte characters fit in 123 bytes, not 62
    assert wire[4:].decode("utf-8") == "é" * 61
    assert frames.close_frame(None, "ignored", False) == b"\x88\x00"
