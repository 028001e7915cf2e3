"""Issue 16, finding 2: a tiny hostile PACK must not fill any disk before the user is asked.

The bombs are built by hand with zlib: a delta whose one-byte copy instructions each
repeat 64 KiB of its base, and a zlib stream of zeros. Usage is measured inside the
`decide` callback: the files under the destination and $TMPDIR, plus every regular file
this process holds open (an unlinked or O_TMPFILE spool has no name to list).
"""

import functools
import hashlib
import os
import struct
import tempfile
import zlib
from pathlib import Path

import pytest
import trio

from peer import bob, pack
from peer.channel import ChannelClosed
from peer.destination import Destination, StreamDestination
from peer.errors import TransferFailed

COMMIT, TREE, BLOB, TAG, OFS_DELTA = 1, 2, 3, 4, 6
RECORD = 32 * 1024
SMALL = 1024 * 1024
"""The most a bomb may make the receiver store before the prompt (it sends a few KiB)."""


def header(kind: int, size: int) -> bytes:
    out = bytearray([(kind << 4) | (size & 0x0F)])
    size >>= 4
    while size:
        out[-1] |= 0x80
        out.append(size & 0x7F)
        size >>= 7
    return bytes(out)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value >> 7 else 0))
        value >>= 7
        if not value:
            return bytes(out)


def git_id(kind: bytes, content: bytes) -> bytes:
    return hashlib.sha1(b"%s %d\0" % (kind, len(content)) + content).digest()


def zeros_id(kind: bytes, size: int) -> bytes:
    hasher = hashlib.sha1(b"%s %d\0" % (kind, size))
    block = bytes(1 << 20)
    for start in range(0, size, len(block)):
        hasher.update(block[: min(len(block), size - start)])
    return hasher.digest()


def finish(objects: list[bytes]) -> bytes:
    data = b"PACK" + struct.pack(">II", 2, len(objects)) + b"".join(objects)
    return data + hashlib.sha1(data).digest()


def delta_bomb(result_size: int, declared: int | None = None, named: bool = True) -> bytes:
    """A directory whose one file is a delta: 64 KiB of zeros copied result_size / 64 KiB times.

    `declared` (default: the truth) is the result size the delta's header announces.
    With `named` false the tree names the 64 KiB base instead, and no tree names the delta.
    """
    base = bytes(0x10000)
    copies = result_size // 0x10000
    declared = result_size if declared is None else declared
    instructions = varint(len(base)) + varint(declared) + b"\x80" * copies  # 0x80: copy 64 KiB from 0
    tree = b"100644 big\0" + (zeros_id(b"blob", result_size) if named else git_id(b"blob", base))
    objects = [header(COMMIT, 0), header(TREE, len(tree)) + zlib.compress(tree, 9)]
    root = b"bomb\0" + git_id(b"tree", tree) + b"3"
    objects[0] = header(COMMIT, len(root)) + zlib.compress(root, 9)
    base_at = 12 + sum(map(len, objects))
    objects.append(header(BLOB, len(base)) + zlib.compress(base, 9))
    delta_at = 12 + sum(map(len, objects))
    distance = delta_at - base_at
    assert distance < 0x80
    objects.append(header(OFS_DELTA, len(instructions)) + bytes([distance]) + zlib.compress(instructions, 9))
    return finish(objects)


def zero_stream(size: int) -> bytes:
    compressor = zlib.compressobj(9)
    block = bytes(1 << 20)
    parts = [compressor.compress(block[: min(len(block), size - start)]) for start in range(0, size, len(block))]
    return b"".join(parts) + compressor.flush()


def single_bomb(declared: int, actual: int) -> bytes:
    """One file announced as `declared` bytes whose zlib stream holds `actual` zeros."""
    objects = [header(TAG, 4) + zlib.compress(b"file"), header(BLOB, declared) + zero_stream(actual)]
    return finish(objects)


class Records:
    """A channel that hands out a pack in records, then reports a clean close."""

    def __init__(self, data: bytes) -> None:
        self._records = [data[i : i + RECORD] for i in range(0, len(data), RECORD)]

    async def receive(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self._records:
            raise ChannelClosed("closed")
        return self._records.pop(0)


def held_bytes(*directories: Path) -> int:
    """Bytes in regular files under `directories` plus in every regular file this process has open."""
    total = 0
    for directory in directories:
        for path in directory.rglob("*"):
            if path.is_file():
                total += path.stat().st_size
    for name in os.listdir("/proc/self/fd"):
        try:
            info = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if os.path.isfile(f"/proc/self/fd/{name}") or (info.st_mode & 0o170000) == 0o100000:
            total += info.st_size
    return total


@pytest.fixture
def places(tmp_path, monkeypatch):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return out, tmp


def receive(data: bytes, out: Path, decide):
    async def main():
        return await bob.receive_pack(Records(data), Destination(out), announce=lambda offer: None, decide=decide)

    return trio.run(main)


def leftovers(*directories: Path) -> list[str]:
    return sorted(str(path) for directory in directories for path in directory.rglob("*"))


def test_a_delta_bomb_stores_almost_nothing_before_the_prompt_and_nothing_after_declining(places):
    out, tmp = places
    data = delta_bomb(256 << 20)
    assert len(data) < 4096
    before = held_bytes()
    seen = []

    async def decide(offer):
        seen.append((offer.total_bytes, offer.sizes_known, held_bytes(out, tmp) - before))
        return False

    with pytest.raises(TransferFailed, match="declined"):
        receive(data, out, decide)
    assert len(seen) == 1
    total, known, held = seen[0]
    assert held < SMALL, f"{held} bytes stored before the user was asked"
    assert leftovers(out, tmp) == []
    assert held_bytes() - before < SMALL


def test_a_delta_that_builds_more_than_it_declared_fails_before_the_prompt(places):
    out, tmp = places
    data = delta_bomb(64 << 20, declared=1 << 20)  # small enough to be rebuilt in memory, and caught

    async def decide(offer):
        raise AssertionError("asked about a pack that cannot be right")

    with pytest.raises(TransferFailed, match="more than its declared"):
        receive(data, out, decide)
    assert leftovers(out, tmp) == []


def test_an_accepted_delta_that_builds_more_than_it_declared_fails_and_leaves_nothing(places, monkeypatch):
    out, tmp = places
    # Past the identification budget, the delta is only known by its header until accepted.
    limits = pack.PackLimits(max_identified=1 << 20)
    monkeypatch.setattr(bob.pack, "PackReader", functools.partial(pack.PackReader, limits=limits))
    data = delta_bomb(64 << 20, declared=2 << 20)
    asked = []

    async def decide(offer):
        asked.append((offer.sizes_known, held_bytes(out, tmp)))
        return True

    with pytest.raises(TransferFailed, match="more than its declared"):
        receive(data, out, decide)
    assert len(asked) == 1 and asked[0][0] is False and asked[0][1] < SMALL
    assert leftovers(out, tmp) == []


def test_a_single_file_is_asked_about_before_its_blob_inflates_and_stops_at_its_declared_size(places):
    out, tmp = places
    data = single_bomb(declared=1000, actual=64 << 20)
    asked = []

    async def decide(offer):
        asked.append((offer.total_bytes, held_bytes(out, tmp)))
        return True

    with pytest.raises(TransferFailed, match="more than its declared 1000 bytes"):
        receive(data, out, decide)
    assert asked == [(1000, asked[0][1])] and asked[0][1] < SMALL
    assert leftovers(out, tmp) == []


def test_accepting_inflates_only_what_the_offer_names(places):
    """An object no tree names (here a 1 GiB delta in 244 bytes) is never inflated."""
    out, tmp = places
    data = delta_bomb(1 << 30, named=False)
    assert len(data) < 300
    peak = []

    class Progress:
        def advance(self, count):
            peak.append(held_bytes(out, tmp))

        def close(self):
            pass

    async def decide(offer):
        peak.append(held_bytes(out, tmp))
        return offer.total_bytes == 0x10000

    async def main():
        return await bob.receive_pack(
            Records(data), Destination(out), announce=lambda offer: None, decide=decide,
            make_progress=lambda offer: Progress(),
        )

    offer = trio.run(main)
    assert offer.total_bytes == 0x10000
    assert (out / "bomb" / "big").read_bytes() == bytes(0x10000)
    assert peak and max(peak) < SMALL
    assert leftovers(tmp) == []


def test_a_directory_to_standard_output_is_refused_having_stored_nothing(places):
    out, tmp = places
    data = delta_bomb(256 << 20)
    read, write = os.pipe()

    async def main():
        destination = StreamDestination(write, "standard output")
        return await bob.receive_pack(Records(data), destination, announce=lambda offer: None)

    try:
        with pytest.raises(TransferFailed, match="takes a single file"):
            trio.run(main)
    finally:
        os.close(read)
        os.close(write)
    assert leftovers(out, tmp) == []


def test_a_file_of_unknown_size_is_written_once_accepted(places, monkeypatch):
    """Past the identification budget a delta's file shows no size, yet arrives whole."""
    out, tmp = places
    limits = pack.PackLimits(max_identified=0)
    monkeypatch.setattr(bob.pack, "PackReader", functools.partial(pack.PackReader, limits=limits))
    shown = []

    async def decide(offer):
        shown.append(offer.summary())
        return True

    offer = receive(delta_bomb(4 << 20), out, decide)
    assert shown == ["bomb/ (1 file, size unknown)"]
    assert offer.total_bytes == 4 << 20  # what arrived, as the receiver reports it
    assert (out / "bomb" / "big").read_bytes() == bytes(4 << 20)
    assert leftovers(tmp) == []
