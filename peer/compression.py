"""zstd for our data phase: bounded frames on the wire, and when it pays to compress.

Each compressed piece of a file is one independent zstd frame of at most `FRAME_CONTENT`
bytes of content, whose header declares that size. The receiver checks the declaration
against its bounds *before* decompressing and gets exactly that many bytes or an error,
so a small hostile frame can never make it hold or write more than it agreed to: at most
1 MiB per frame, and never past the file's offered size.

Whether to compress is decided by `CompressionChoice`, sans I/O: a sample of each file
says whether it compresses at all, and for data that does, timed trials of both ways say
whether compressing makes the transfer faster. It does when the link is the bottleneck
and not when the CPU is (zstd level 1 runs at a few hundred MiB/s per core, about the
speed of our whole pipeline on loopback).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

try:
    import zstandard
except ImportError:  # the feature is simply not offered
    zstandard = None

__all__ = [
    "FRAME_CONTENT",
    "MAX_FRAME_BYTES",
    "CompressionChoice",
    "CompressionError",
    "available",
    "compress_block",
    "inflate_frame",
]

FRAME_CONTENT = 1024 * 1024
"""Content bytes per frame: the sender's block, and the most one frame may expand to."""
MAX_FRAME_BYTES = FRAME_CONTENT + 64 * 1024
"""The most compressed bytes a receiver gathers for one frame (a sender never sends a frame
larger than its content: it sends that block raw instead)."""
MAX_WINDOW = 8 * 1024 * 1024
LEVEL = 1
WORTH_IT = 0.9
"""A block is sent compressed only if that saves at least 10% of its bytes."""


class CompressionError(ValueError):
    """A frame breaks the rules (or is not zstd); the message is one line for the user."""


def available() -> bool:
    return zstandard is not None


_per_thread = threading.local()
"""A zstd compressor per thread: one must never be used by two threads at once (zstandard
says so, and it aborted the interpreter when many in-process senders shared one)."""


def compress_block(block: bytes | memoryview) -> bytes | None:
    """One zstd frame holding `block` (≤ FRAME_CONTENT bytes), or None if that does not pay.

    Safe to call from any thread, several at once.
    """
    if len(block) > FRAME_CONTENT:
        raise ValueError(f"a block holds at most {FRAME_CONTENT} bytes")
    compressor = getattr(_per_thread, "compressor", None)
    if compressor is None:
        compressor = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True, write_checksum=False)
        _per_thread.compressor = compressor
    frame = compressor.compress(block)
    if len(frame) > len(block) * WORTH_IT:
        return None
    return frame


def inflate_frame(frame: bytes | bytearray, limit: int | None) -> bytes:
    """The content of one complete frame, checked: 1..min(FRAME_CONTENT, limit) bytes.

    `limit` is what is left of the file's offered size (None when the size is unknown).
    Raises CompressionError for anything else: a frame without a declared size, one that
    declares too much, a window over 8 MiB, trailing bytes, or damage.
    """
    if len(frame) > MAX_FRAME_BYTES:
        raise CompressionError(f"a compressed frame is over {MAX_FRAME_BYTES} bytes")
    try:
        parameters = zstandard.get_frame_parameters(bytes(frame[:18]))
    except zstandard.ZstdError:
        raise CompressionError("a compressed frame has no valid zstd header") from None
    size = parameters.content_size
    bound = FRAME_CONTENT if limit is None else min(FRAME_CONTENT, limit)
    if size == zstandard.CONTENTSIZE_UNKNOWN or size == zstandard.CONTENTSIZE_ERROR or size == 0:
        raise CompressionError("a compressed frame does not declare its size")
    if size > bound:
        raise CompressionError(f"a compressed frame declares {size} bytes, more than the {bound} allowed")
    if parameters.window_size > MAX_WINDOW:
        raise CompressionError(f"a compressed frame asks for a {parameters.window_size}-byte window")
    frame = bytes(frame)
    length = _frame_length(frame, parameters.has_checksum)
    if length > len(frame):
        raise CompressionError("a compressed frame is cut short")
    if length < len(frame):
        raise CompressionError("a compressed frame has trailing bytes")
    try:
        decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        content = decompressor.decompress(frame, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CompressionError(f"a compressed frame is damaged ({exc})") from None
    if len(content) != size:
        raise CompressionError(f"a compressed frame held {len(content)} bytes, not the {size} it declared")
    return content


def _frame_length(frame: bytes, has_checksum: bool) -> int:
    """The length of the zstd frame at the start of `frame`, from its block headers.

    One-shot decompression ignores whatever follows a frame; walking the block headers
    (3 bytes each, a few per MiB) lets a frame with trailing bytes be refused instead.
    """
    try:
        offset = zstandard.frame_header_size(frame)
    except zstandard.ZstdError:
        raise CompressionError("a compressed frame has no valid zstd header") from None
    while True:
        if offset + 3 > len(frame):
            raise CompressionError("a compressed frame is cut short")
        header = int.from_bytes(frame[offset : offset + 3], "little")
        offset += 3
        kind, size = (header >> 1) & 3, header >> 3
        offset += 1 if kind == 1 else size  # an RLE block stores its one byte
        if header & 1:
            return offset + (4 if has_checksum else 0)


class CompressionChoice:
    """Whether to compress the next block: ``always``, ``never``, or ``auto``.

    Sans I/O: the driver asks `compress_next()` before each block, reports with
    `block_sent()` once the block's records are handed to the network, and calls
    `begin_file()` at each file. In ``auto``:

    - The first block of each file is a sample: if zstd does not save 10% of it, the file
      goes raw, and is sampled again after 4 MiB, then 8, 16... up to every 64 MiB, so a
      file that turns compressible (an archive with a text tail) is noticed.
    - For data that compresses, trials time `TRIAL` bytes sent each way, back to back,
      and the faster way is kept for the next `RUN` bytes, then tried again. The time
      includes waiting for the network, so a slow link favours compression and a busy
      CPU (loopback) favours raw bytes. A trial costs at most `TRIAL` bytes sent the
      slower way, well within 10% of a long transfer.
    """

    TRIAL = 8 * 1024 * 1024
    RUN = 256 * 1024 * 1024
    FIRST_GAP = 4 * 1024 * 1024
    LAST_GAP = 64 * 1024 * 1024

    def __init__(self, mode: str = "auto", *, clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"unknown compression mode {mode!r}")
        self.mode = mode
        self._clock = clock
        self._compressible: bool | None = None
        self._raw_until_sample = 0
        self._gap = self.FIRST_GAP
        # Trials: the phase ("raw", "zstd") being timed, or None while running the winner.
        self._phase: str | None = "raw"
        self._phase_bytes = 0
        self._phase_started: float | None = None
        self._rates: dict[str, float] = {}
        self._winner = "zstd"
        self._run_left = 0
        self.content_bytes = {"raw": 0, "zstd": 0}
        """Content sent each way, for reports and tests."""

    def begin_file(self) -> None:
        self._compressible = None
        self._raw_until_sample = 0
        self._gap = self.FIRST_GAP

    def compress_next(self) -> bool:
        """Try zstd on the next block? (Its result may still be raw: see `compress_block`.)"""
        if self.mode != "auto":
            return self.mode == "always"
        if self._compressible is None:
            return True  # a sample
        if not self._compressible:
            return self._raw_until_sample <= 0  # a new sample, when due
        if self._phase is not None:
            return self._phase == "zstd"
        return self._winner == "zstd"

    def block_sent(self, size: int, tried: bool, compressed: bool) -> None:
        """`size` content bytes went out; `tried` zstd on them, `compressed` if it paid."""
        self.content_bytes["zstd" if compressed else "raw"] += size
        if self.mode != "auto":
            return
        if tried and not compressed:
            # A sample (or a block) that does not compress: raw until the next sample.
            self._compressible = False
            self._raw_until_sample = self._gap
            self._gap = min(self._gap * 2, self.LAST_GAP)
            return
        if not self._compressible:
            if tried:  # a sample that compressed
                self._compressible = True
                self._gap = self.FIRST_GAP
            else:
                self._raw_until_sample -= size
                return
        self._time(size, "zstd" if compressed else "raw")

    def _time(self, size: int, way: str) -> None:
        now = self._clock()
        if self._phase is None:
            self._run_left -= size
            if self._run_left <= 0:
                self._phase, self._phase_bytes, self._phase_started = "raw", 0, None
            return
        if way != self._phase:
            return
        if self._phase_started is None:
            # The first block of a phase only starts the clock: it may have gone into
            # empty socket buffers, which would flatter whichever way went first.
            self._phase_started = now
            return
        self._phase_bytes += size
        if self._phase_bytes < self.TRIAL:
            return
        self._rates[self._phase] = self._phase_bytes / max(now - self._phase_started, 1e-9)
        if self._phase == "raw":
            self._phase, self._phase_bytes, self._phase_started = "zstd", 0, None
            return
        self._winner = "zstd" if self._rates["zstd"] >= self._rates["raw"] else "raw"
        self._phase = None
        self._run_left = self.RUN

    @property
    def rates(self) -> dict[str, float]:
        """The last trial's content rates in bytes per second, by way ("raw", "zstd")."""
        return dict(self._rates)
