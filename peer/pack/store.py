"""Where a directory's objects wait: a spool (memory, then an anonymous file) and its index.

Used twice by the reader: before the decision the spool holds the pack's compressed
bytes as they arrived; after acceptance `_ObjectStore` inflates them into a second spool
to resolve deltas. Both spools live in the directory the driver names (the destination),
so their bytes count against the free space the user's disk really has.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import tempfile
from array import array

from .format import (
    _BASE_CACHE,
    _DELTAS,
    _READ_STEP,
    ID_SIZE,
    OFS_DELTA,
    REF_DELTA,
    TYPE_NAMES,
    PackError,
    PackLimits,
)

def find_sorted(order: array, object_id: bytes, id_of) -> int | None:
    """The object whose id is ``object_id``, in ``order`` (indexes sorted by id); or None."""
    position = bisect.bisect_left(order, object_id, key=id_of)
    if position < len(order) and id_of(order[position]) == object_id:
        return order[position]
    return None


class _Spool:
    """Append-only storage with random reads: memory while small, then a temporary file.

    The file comes from `tempfile.TemporaryFile` in the directory given (the driver gives
    the destination, so the bytes count against the free space they really use): created
    with O_EXCL and mode 0600, on Linux with no name at all (O_TMPFILE) and elsewhere
    unlinked at once, so it disappears with `close()` or with the process.
    """

    def __init__(self, memory_limit: int, directory: str | os.PathLike[str] | None) -> None:
        self._memory_limit = memory_limit
        self._directory = directory
        self._file = None
        self._on_disk = 0  # bytes [0, _on_disk) are in the file, the rest in _tail
        self._tail = bytearray()
        self.size = 0

    def append(self, data: bytes | bytearray | memoryview) -> None:
        self._tail += data
        self.size += len(data)
        if self._file is None and len(self._tail) > self._memory_limit:
            self._file = tempfile.TemporaryFile(dir=self._directory, prefix="peer-pack-", buffering=0)
        if self._file is not None and len(self._tail) >= _READ_STEP:
            self._flush()

    def _flush(self) -> None:
        with memoryview(self._tail) as view:
            written = 0
            while written < len(view):
                written += os.pwrite(self._file.fileno(), view[written:], self._on_disk + written)
        self._on_disk += len(self._tail)
        self._tail.clear()

    def read(self, offset: int, size: int) -> bytes:
        """`size` bytes from `offset`, which must lie within what was appended."""
        if offset < 0 or offset + size > self.size:
            raise ValueError("read outside the spool")
        parts = []
        if offset < self._on_disk:
            want = min(size, self._on_disk - offset)
            got = 0
            while got < want:
                piece = os.pread(self._file.fileno(), want - got, offset + got)
                if not piece:
                    raise OSError("the spool file is shorter than what was written to it")
                parts.append(piece)
                got += len(piece)
            offset += want
            size -= want
        if size:
            start = offset - self._on_disk
            parts.append(bytes(self._tail[start : start + size]))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tail = bytearray()
        self._on_disk = 0
        self.size = 0


class _Cursor:
    """Sequential reads over a spooled region (a delta's instructions) in bounded windows."""

    def __init__(self, spool: _Spool, start: int, length: int, what: str) -> None:
        self._spool = spool
        self._next = start
        self._end = start + length
        self._window = b""
        self._at = 0
        self._what = what

    def _fill(self, need: int) -> None:
        if len(self._window) - self._at >= need:
            return
        size = min(_READ_STEP, self._end - self._next)
        chunk = self._spool.read(self._next, size) if size else b""
        self._next += size
        self._window = self._window[self._at :] + chunk
        self._at = 0
        if len(self._window) < need:
            raise PackError(f"{self._what} ends in the middle of an instruction")

    @property
    def at_end(self) -> bool:
        return self._at >= len(self._window) and self._next >= self._end

    def byte(self) -> int:
        self._fill(1)
        value = self._window[self._at]
        self._at += 1
        return value

    def take(self, size: int) -> bytes:
        self._fill(size)
        data = self._window[self._at : self._at + size]
        self._at += size
        return data

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value
            if shift > 63:
                raise PackError(f"{self._what} has a size that does not fit 64 bits")


class _ObjectStore:
    """Every object of a directory pack, spooled, with its metadata in compact arrays.

    Per object about 60 bytes of memory (no Python object each), so millions of
    objects fit; the contents themselves stay in the spool.
    """

    def __init__(self, spool: _Spool, limits: PackLimits) -> None:
        self.spool = spool
        self.limits = limits
        self.offsets = array("Q")  # where the object starts in the pack (for OFS_DELTA)
        self.kinds = bytearray()  # the pack type; after resolution, the resolved type
        self.starts = array("Q")  # where its content (or delta) starts in the spool
        self.lengths = array("Q")
        self.bases = array("q")  # OFS_DELTA: the base's index, else -1
        self.ids = bytearray()
        self.ref_bases: dict[int, bytes] = {}  # REF_DELTA: index -> base id
        self._hash = None
        self._order: array | None = None

    def __len__(self) -> int:
        return len(self.kinds)

    def index_at_offset(self, offset: int) -> int | None:
        position = bisect.bisect_left(self.offsets, offset)
        if position < len(self.offsets) and self.offsets[position] == offset:
            return position
        return None

    def begin(self, offset: int, kind: int, size: int, base_index: int, base_id: bytes | None) -> None:
        index = len(self.kinds)
        self.offsets.append(offset)
        self.kinds.append(kind)
        self.starts.append(self.spool.size)
        self.lengths.append(0)
        self.bases.append(base_index)
        self.ids += bytes(ID_SIZE)
        if base_id is not None:
            self.ref_bases[index] = base_id
        # Non-delta ids are computed while inflating, sparing a second read.
        self._hash = hashlib.sha1(b"%s %d\0" % (TYPE_NAMES[kind], size)) if kind in TYPE_NAMES else None

    def write(self, data: bytes) -> None:
        self.spool.append(data)
        if self._hash is not None:
            self._hash.update(data)

    def end(self) -> None:
        index = len(self.kinds) - 1
        self.lengths[index] = self.spool.size - self.starts[index]
        if self._hash is not None:
            self.ids[index * ID_SIZE : (index + 1) * ID_SIZE] = self._hash.digest()
        self._hash = None

    def id_of(self, index: int) -> bytes:
        return bytes(self.ids[index * ID_SIZE : (index + 1) * ID_SIZE])

    # -- deltas --

    def resolve(self, budget: int) -> None:
        """Apply every delta, bases first, however the pack orders them."""
        children: dict[int, list[int]] = {}
        waiting: dict[bytes, list[int]] = {}
        deltas = 0
        for index, kind in enumerate(self.kinds):
            if kind == OFS_DELTA:
                children.setdefault(self.bases[index], []).append(index)
                deltas += 1
            elif kind == REF_DELTA:
                waiting.setdefault(self.ref_bases[index], []).append(index)
                deltas += 1
        resolved = 0
        for index, kind in enumerate(self.kinds):
            if kind in _DELTAS:
                continue
            # Iterative, so a chain of a million deltas cannot exhaust the Python stack.
            stack = [(index, -1)]
            while stack:
                target, base = stack.pop()
                if base >= 0:
                    self._apply_delta(target, base, budget)
                    resolved += 1
                stack.extend((child, target) for child in children.pop(target, ()))
                stack.extend((child, target) for child in waiting.pop(self.id_of(target), ()))
        if resolved != deltas:
            raise PackError(f"{deltas - resolved} delta object(s) refer to a base that is not in the pack")
        self.ref_bases.clear()

    def _apply_delta(self, target: int, base: int, budget: int) -> None:
        """Rebuild one object from its base and Git's copy/insert instructions."""
        what = f"delta object {target}"
        base_start, base_length = self.starts[base], self.lengths[base]
        kind = self.kinds[base]
        instructions = _Cursor(self.spool, self.starts[target], self.lengths[target], what)
        expected_base = instructions.varint()
        result_size = instructions.varint()
        if expected_base != base_length:
            raise PackError(f"{what} expects a base of {expected_base} bytes, its base has {base_length}")
        if result_size > self.limits.max_object_size:
            limit = self.limits.max_object_size
            raise PackError(f"{what} would be {result_size} bytes, over the {limit}-byte limit")
        if self.spool.size + result_size > budget:
            raise PackError(f"{what} would expand the pack past {budget} bytes")
        cached = self.spool.read(base_start, base_length) if base_length <= _BASE_CACHE else None
        hasher = hashlib.sha1(b"%s %d\0" % (TYPE_NAMES[kind], result_size))
        result_start = self.spool.size
        pending = bytearray()
        written = 0
        while not instructions.at_end:
            opcode = instructions.byte()
            if opcode & 0x80:
                offset = size = 0
                for bit, shift in ((0x01, 0), (0x02, 8), (0x04, 16), (0x08, 24)):
                    if opcode & bit:
                        offset |= instructions.byte() << shift
                for bit, shift in ((0x10, 0), (0x20, 8), (0x40, 16)):
                    if opcode & bit:
                        size |= instructions.byte() << shift
                if size == 0:
                    size = 0x10000
                if offset + size > base_length:
                    raise PackError(
                        f"{what} copies bytes {offset}..{offset + size} from a {base_length}-byte base"
                    )
                if written + size > result_size:
                    raise PackError(f"{what} writes more than its declared {result_size} bytes")
                if cached is not None:
                    pending += cached[offset : offset + size]
                else:
                    done = 0
                    while done < size:
                        step = min(_READ_STEP, size - done)
                        pending += self.spool.read(base_start + offset + done, step)
                        done += step
                written += size
            elif opcode:
                if written + opcode > result_size:
                    raise PackError(f"{what} writes more than its declared {result_size} bytes")
                pending += instructions.take(opcode)
                written += opcode
            else:
                raise PackError(f"{what} uses the reserved instruction 0")
            if len(pending) >= _READ_STEP:
                hasher.update(pending)
                self.spool.append(pending)
                pending.clear()
        if written != result_size:
            raise PackError(f"{what} builds {written} bytes, its header says {result_size}")
        hasher.update(pending)
        self.spool.append(pending)
        self.kinds[target] = kind
        self.starts[target] = result_start
        self.lengths[target] = result_size
        self.ids[target * ID_SIZE : (target + 1) * ID_SIZE] = hasher.digest()

    # -- lookups, once every id is known --

    def index_ids(self) -> None:
        self._order = array("L", sorted(range(len(self.kinds)), key=self.id_of))

    def find(self, object_id: bytes) -> int | None:
        return find_sorted(self._order, object_id, self.id_of)

    def read_whole(self, index: int, limit: int, what: str) -> bytes:
        length = self.lengths[index]
        if length > limit:
            raise PackError(f"{what} is {length} bytes, over the {limit}-byte limit")
        return self.spool.read(self.starts[index], length)


def delta_sizes(prefix: bytes, what: str) -> tuple[int, int] | None:
    """(base size, result size) from the start of a delta's instructions; None if cut short."""
    values = []
    value = shift = 0
    for byte in prefix:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(value)
            if len(values) == 2:
                return values[0], values[1]
            value = shift = 0
        elif shift > 63:
            raise PackError(f"{what} has a size that does not fit 64 bits")
    return None


DELTA_HEADER_MAX = 20
"""Two 64-bit varints: the most of a delta that must be inflated to learn its result size."""


def apply_small_delta(base: bytes, instructions: bytes, what: str) -> bytes:
    """A delta applied in memory: for trees, which are small, before the user decides."""
    sizes = delta_sizes(instructions[:DELTA_HEADER_MAX], what)
    if sizes is None:
        raise PackError(f"{what} ends in the middle of its header")
    expected_base, result_size = sizes
    if expected_base != len(base):
        raise PackError(f"{what} expects a base of {expected_base} bytes, its base has {len(base)}")
    position = 0
    for _ in range(2):
        while instructions[position] & 0x80:
            position += 1
        position += 1
    out = bytearray()
    end = len(instructions)
    while position < end:
        opcode = instructions[position]
        position += 1
        if opcode & 0x80:
            offset = size = 0
            for bit, shift in ((0x01, 0), (0x02, 8), (0x04, 16), (0x08, 24), (0x10, 32), (0x20, 40), (0x40, 48)):
                if opcode & bit:
                    if position >= end:
                        raise PackError(f"{what} ends in the middle of an instruction")
                    if shift < 32:
                        offset |= instructions[position] << shift
                    else:
                        size |= instructions[position] << (shift - 32)
                    position += 1
            size = size or 0x10000
            if offset + size > len(base):
                raise PackError(f"{what} copies bytes {offset}..{offset + size} from a {len(base)}-byte base")
            if len(out) + size > result_size:
                raise PackError(f"{what} writes more than its declared {result_size} bytes")
            out += base[offset : offset + size]
        elif opcode:
            if position + opcode > end:
                raise PackError(f"{what} ends in the middle of an instruction")
            if len(out) + opcode > result_size:
                raise PackError(f"{what} writes more than its declared {result_size} bytes")
            out += instructions[position : position + opcode]
            position += opcode
        else:
            raise PackError(f"{what} uses the reserved instruction 0")
    if len(out) != result_size:
        raise PackError(f"{what} builds {len(out)} bytes, its header says {result_size}")
    return bytes(out)
