"""zstd in our data phase: bounded frames (bombs refused), ZDATA in the sessions, the automatic
choice, and real transfers of compressible and incompressible files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import blake3
import pytest
import zstandard

from peer import compression
from peer.compression import CompressionChoice, CompressionError, inflate_frame
from peer.errors import ProtocolError
from peer.messages import CompressedData, FileEnd, decode_message
from peer.offer import FILE, Offer, OfferEntry
from peer.transfer import FileFinished, ReceiverSession, SenderSession

from processes import finish, peer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from textlike import text_like  # noqa: E402

MiB = 1024 * 1024
CODE = "456-cobalt-lemon-unicycle"


def frame_of(content: bytes, **options) -> bytes:
    return zstandard.ZstdCompressor(level=1, **options).compress(content)


# --- frames -----------------------------------------------------------------------------------


def test_a_block_compresses_only_when_it_pays():
    text = text_like(MiB)
    frame = compression.compress_block(text)
    assert frame is not None and len(frame) < len(text) / 2
    assert inflate_frame(frame, None) == text
    assert compression.compress_block(os.urandom(MiB)) is None
    with pytest.raises(ValueError):
        compression.compress_block(bytes(MiB + 1))


@pytest.mark.parametrize(
    "frame, limit, match",
    [
        (frame_of(bytes(100 * MiB)), None, "declares 104857600 bytes, more than the 1048576"),
        (frame_of(bytes(1000)), 999, "more than the 999 allowed"),
        (frame_of(bytes(1000), write_content_size=False), None, "does not declare its size"),
        (frame_of(b"abc" * 100) + b"x", None, "trailing bytes"),
        (frame_of(b"abc" * 100) * 2, None, "trailing bytes"),
        (frame_of(b"abc" * 100)[:-2], None, "cut short"),
        (b"not zstd at all", None, "no valid zstd header"),
        (bytes(compression.MAX_FRAME_BYTES + 1), None, "over"),
    ],
    ids=["bomb", "over-offer", "no-size", "trailing", "two-frames", "cut", "not-zstd", "huge"],
)
def test_hostile_frames_are_refused_before_they_expand(frame, limit, match):
    with pytest.raises(CompressionError, match=match):
        inflate_frame(frame, limit)


def test_a_frame_that_lies_about_its_size_is_refused():
    honest = bytearray(frame_of(text_like(4096)))
    # The single-byte content size field follows the frame header descriptor: claim 100 bytes
    # fewer than the blocks hold. (Layout: magic, descriptor, [window], size.)
    small = frame_of(b"x" * 200 + os.urandom(50))
    lying = bytearray(small)
    descriptor = lying[4]
    assert descriptor & 0xC0 == 0 and descriptor & 0x20  # 1-byte size, single segment
    lying[5] = 150
    with pytest.raises(CompressionError):
        inflate_frame(bytes(lying), None)
    assert inflate_frame(bytes(honest), None) == text_like(4096)


# --- ZDATA in the sessions ----------------------------------------------------------------------


def sessions(size, features=("zstd",)):
    offer = Offer([OfferEntry(FILE, "f", size)])
    sender = SenderSession(offer, features=features)
    receiver = ReceiverSession(features=features)
    sender.receive(receiver.hello())
    for message in sender.offer_messages():
        receiver.receive(message)
    sender.receive(receiver.accept())
    receiver.receive(sender.begin_file(sender.next_file()))
    return sender, receiver


def test_compressed_frames_cross_in_pieces_and_mix_with_raw_data():
    text = text_like(3 * MiB)
    sender, receiver = sessions(len(text) + 5)
    received = bytearray()
    for start in range(0, len(text), MiB):
        block = text[start : start + MiB]
        messages = sender.compressed_messages(compression.compress_block(block), len(block))
        assert len(messages) > 1 and all(len(m) <= 32767 for m in messages)
        events = [receiver.receive(m) for m in messages]
        assert events[:-1] == [None] * (len(messages) - 1)
        received += events[-1].data
    sender.data_buffer()[:5] = b"tail!"
    received += receiver.receive(sender.data_message(5)).data
    assert bytes(received) == text + b"tail!"
    digest = blake3.blake3(received).digest()
    assert isinstance(receiver.receive(sender.end_file(digest)), FileFinished)


def test_a_decompression_bomb_in_zdata_is_a_protocol_error():
    _, receiver = sessions(1000)
    bomb = frame_of(bytes(100 * MiB))  # 3 KiB that would expand to 100 MiB
    with pytest.raises(ProtocolError, match="declares 104857600 bytes"):
        receiver.receive(CompressedData(False, bomb).encode())
    _, receiver = sessions(10 * MiB)
    with pytest.raises(ProtocolError, match="over"):
        for _ in range(40):  # pieces of a frame that never ends
            receiver.receive(CompressedData(True, bytes(32765)).encode())


def test_zdata_rules():
    _, receiver = sessions(100, features=())
    with pytest.raises(ProtocolError, match="compressed data while"):
        receiver.receive(CompressedData(False, frame_of(b"a" * 100)).encode())
    _, receiver = sessions(100)
    receiver.receive(CompressedData(True, b"\x28\xb5").encode())
    with pytest.raises(ProtocolError, match="file end inside a compressed frame"):
        receiver.receive(FileEnd(bytes(32)).encode())
    assert decode_message(b"\x0a\x01ab") == CompressedData(True, b"ab")
    for bad in (b"\x0a", b"\x0a\x00", b"\x0a\x02ab"):
        with pytest.raises(ProtocolError):
            decode_message(bad)
    sender, _ = sessions(100)
    with pytest.raises(ValueError):
        sender.compressed_messages(frame_of(b"a" * 101), 101)


# --- the automatic choice ------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def drive(choice: CompressionChoice, clock: Clock, blocks: int, *, compressible: bool, raw_rate: float, zstd_rate: float):
    """Send `blocks` 1 MiB blocks; time passes at the given content rates (bytes/s)."""
    for _ in range(blocks):
        tried = choice.compress_next()
        compressed = tried and compressible
        clock.now += MiB / (zstd_rate if compressed else raw_rate)
        choice.block_sent(MiB, tried, compressed)


def test_incompressible_data_goes_raw_with_ever_rarer_samples():
    clock = Clock()
    choice = CompressionChoice("auto", clock=clock)
    choice.begin_file()
    tries = []
    for _ in range(200):
        tried = choice.compress_next()
        tries.append(tried)
        choice.block_sent(MiB, tried, False)
    samples = [i for i, tried in enumerate(tries) if tried]
    assert samples[:4] == [0, 5, 14, 31]  # gaps of 4, 8, 16 MiB...
    assert len(samples) <= 7


def test_a_slow_link_favours_compression_and_a_busy_cpu_raw_bytes():
    clock = Clock()
    slow_link = CompressionChoice("auto", clock=clock)
    slow_link.begin_file()
    drive(slow_link, clock, 300, compressible=True, raw_rate=20 * MiB, zstd_rate=50 * MiB)
    assert slow_link.rates["zstd"] > slow_link.rates["raw"]
    assert slow_link.content_bytes["zstd"] > 0.9 * 300 * MiB

    busy_cpu = CompressionChoice("auto", clock=clock)
    busy_cpu.begin_file()
    drive(busy_cpu, clock, 300, compressible=True, raw_rate=200 * MiB, zstd_rate=120 * MiB)
    assert busy_cpu.content_bytes["raw"] > 0.9 * 300 * MiB
    # A sample, then one zstd trial per RUN: a few percent of the whole.
    assert busy_cpu.content_bytes["zstd"] <= 2 * (CompressionChoice.TRIAL + 2 * MiB)


def test_forced_modes():
    assert CompressionChoice("always").compress_next()
    assert not CompressionChoice("never").compress_next()
    with pytest.raises(ValueError):
        CompressionChoice("sometimes")


# --- real transfers ---------------------------------------------------------------------------


def send_and_receive(relay, tmp_path, name, *send_options):
    out = tmp_path / "out"
    sender = peer("send", *relay.peer_args(), "--password", CODE, *send_options, name, cwd=tmp_path)
    receiver = peer("recv", *relay.peer_args(), "-y", "-o", f"{out}/", "--overwrite", CODE, cwd=tmp_path)
    r, _, r_err = finish(receiver)
    s, _, s_err = finish(sender)
    assert (s, r) == (0, 0), s_err + r_err
    return out / name, s_err


def wire_mib(sender_err: str) -> float | None:
    if "on the wire" not in sender_err:
        return None
    return float(sender_err.split(", ")[1].split(" ")[0])


def test_compressible_and_incompressible_files_end_to_end(relay_process, tmp_path):
    text = text_like(6 * MiB)
    noise = os.urandom(6 * MiB)
    (tmp_path / "text.log").write_bytes(text)
    (tmp_path / "noise.bin").write_bytes(noise)
    received, s_err = send_and_receive(relay_process, tmp_path, "text.log", "--compress")
    assert received.read_bytes() == text
    assert wire_mib(s_err) < 6 / 2  # compressed over 2x
    received, s_err = send_and_receive(relay_process, tmp_path, "noise.bin", "--compress")
    assert received.read_bytes() == noise
    assert wire_mib(s_err) is None  # nothing to gain: sent raw
    received, s_err = send_and_receive(relay_process, tmp_path, "text.log", "--no-compress")
    assert received.read_bytes() == text and wire_mib(s_err) is None


def test_automatic_choice_compresses_text_on_a_slow_link(relay_process, tmp_path):
    text = text_like(24 * MiB)
    (tmp_path / "text.log").write_bytes(text)
    received, s_err = send_and_receive(relay_process, tmp_path, "text.log", "--limit-rate", "16M")
    assert received.read_bytes() == text
    # The raw trial (8 MiB and a block) goes as is, the rest is compressed.
    assert wire_mib(s_err) < 17, s_err


def test_many_threads_compress_at_once():
    # In-process load tests run many senders, each compressing in a worker thread; a
    # compressor shared between threads aborted the interpreter.
    import threading

    blocks = [bytes([n]) * 65536 + bytes(range(256)) * 64 for n in range(8)]
    results: dict[int, list] = {}

    def work(n: int) -> None:
        results[n] = [compression.compress_block(blocks[n]) for _ in range(50)]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for n, frames in results.items():
        assert len(frames) == 50
        assert all(compression.inflate_frame(frame, len(blocks[n])) == blocks[n] for frame in frames)
