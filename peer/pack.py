"""bob's payload: a Git PACK v2 stream inside the records (docs/protocol.md §8), sans I/O.

When the other peer is bob, the records carry a Git pack instead of our own messages
(peer/transfer.py). `PackReader` turns record plaintexts into events; the encoders
turn a file or a directory into record plaintexts cut the way bob's receiver needs
(docs/protocol.md §8.2). Nothing here touches a socket; the only disk access is
the reader's private spool (directories) and the encoders reading the files they send.

Pack layout: ``PACK``, u32 version 2, u32 object count, the objects, then the SHA-1 of
everything before it. Each object is a header (type in bits 4-6 of the first byte, the
inflated size as a varint, low bits first), for deltas a reference to the base, then
the zlib stream of its content. bob uses it two ways:

- one file: a type-4 object whose content is the file name, then the blob;
- a directory: Git blobs and trees (deltas allowed) plus a type-1 "root" object,
  ``<dir name>\\0<20-byte top tree id><count in decimal>``.

Names in a received pack come from the other peer: each one goes through
`peer.transfer.name_problem`, the project's one rule book for names.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import os
import stat
import struct
import tempfile
import zlib
from array import array
from typing import Iterable, Iterator, Union

import attrs

from peer.records import MAX_RECORD_SIZE
from peer.source import SourceError, kind_of_mode
from peer.transfer import (
    DIRECTORY,
    FILE,
    MAX_ENTRIES,
    MAX_FILE_SIZE,
    MAX_PATH_BYTES,
    Offer,
    OfferEntry,
    name_problem,
    os_reason,
    shown,
)

__all__ = [
    "DEFAULT_LIMITS",
    "Directory",
    "DirectoryPack",
    "FileData",
    "PackEnd",
    "PackError",
    "PackEvent",
    "PackLimits",
    "PackReader",
    "SingleFile",
    "TreeEntry",
    "directory_pack",
    "object_header",
    "single_file_records",
]

MAGIC = b"PACK"
VERSION = 2
HEADER = struct.Struct(">4sII")
TRAILER_SIZE = 20
ID_SIZE = 20

COMMIT, TREE, BLOB, TAG, OFS_DELTA, REF_DELTA = 1, 2, 3, 4, 6, 7
TYPE_NAMES = {COMMIT: b"commit", TREE: b"tree", BLOB: b"blob", TAG: b"tag"}
_DELTAS = (OFS_DELTA, REF_DELTA)
_DESCRIBED = {kind: name.decode() for kind, name in TYPE_NAMES.items()}
_DESCRIBED.update({OFS_DELTA: "OFS_DELTA", REF_DELTA: "REF_DELTA"})

MODE_DIRECTORY = b"40000"
MODE_FILE = b"100644"
MODE_EXECUTABLE = b"100755"
MODE_SYMLINK = b"120000"
MODE_GITLINK = b"160000"

DEFAULT_LEVEL = 4  # bob's zlib level; 0 is its --no-compression

# Inflating: at most this much input per zlib call and this much output per event, so
# one record that inflates 1000:1 still never sits whole in memory.
_INPUT_STEP = 64 * 1024
_OUTPUT_STEP = 256 * 1024
_READ_STEP = 1024 * 1024
_MAX_ROOT_SIZE = 64 * 1024
_BASE_CACHE = 16 * 1024 * 1024  # delta bases up to this size are read into memory once

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)


class PackError(Exception):
    """The received pack is malformed, corrupt or hostile; the message is one line."""


@attrs.frozen
class PackLimits:
    """Bounds on what a received pack may make us store, so a small hostile pack cannot
    fill the disk or the memory (zip bombs, delta bombs, tree bombs).

    Inflating alone cannot expand data more than about 1032:1. Deltas and trees that
    reuse one object many times can expand without bound, so everything a pack makes
    us spool, and the total size of the files its tree lists, must stay within
    `budget(pack size)`: ``max_expansion`` times the pack's size, and at least
    ``expansion_floor`` so that small packs of very compressible files still pass.
    """

    max_objects: int = 4_000_000  # about 60 bytes of memory each while receiving
    max_object_size: int = 1 << 40  # any one object of a directory, inflated
    max_tree_size: int = 32 * 1024 * 1024  # the trees from the root to one directory, together
    max_entries: int = MAX_ENTRIES  # the directory itself and everything in it (as an Offer)
    max_expansion: int = 4096
    expansion_floor: int = 1 << 30
    memory_spool: int = 16 * 1024 * 1024  # spooled bytes kept in memory before using a file

    def budget(self, pack_size: int) -> int:
        return max(self.expansion_floor, self.max_expansion * pack_size)


DEFAULT_LIMITS = PackLimits()


# --- events --------------------------------------------------------------------------


@attrs.frozen
class SingleFile:
    """The pack carries one file: its name (checked) and size. Its bytes follow as FileData."""

    name: str
    size: int


@attrs.frozen
class FileData:
    """The next piece of the single file. Unverified until PackEnd: keep it out of place."""

    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")


@attrs.frozen
class Directory:
    """The pack carries a directory, already verified whole: every name, mode and object.

    The counts cover the TreeEntry events that follow (the directory itself excluded).
    """

    name: str
    entry_count: int
    file_count: int
    total_size: int


@attrs.frozen
class TreeEntry:
    """One item of the directory, parents before children; `path` starts with its name.

    For a file, stream its content with `PackReader.iter_blob(entry.id)`.
    """

    path: str
    kind: str  # transfer.FILE or transfer.DIRECTORY
    size: int
    executable: bool
    id: bytes = attrs.field(repr=lambda oid: oid.hex())

    def offer_entry(self) -> OfferEntry:
        """The same item in the terms of our own data phase (for `Destination.plan`)."""
        if self.kind == FILE:
            return OfferEntry(FILE, self.path, self.size, self.executable)
        return OfferEntry(DIRECTORY, self.path)


@attrs.frozen
class PackEnd:
    """The last event: the SHA-1 trailer matched and everything has been handed out."""


PackEvent = Union[SingleFile, FileData, Directory, TreeEntry, PackEnd]


# --- small codecs --------------------------------------------------------------------


def object_header(kind: int, size: int) -> bytes:
    """A pack object header: type in bits 4-6 of the first byte, size low bits first."""
    if kind not in TYPE_NAMES and kind not in _DELTAS:
        raise ValueError(f"unknown object type {kind}")
    if size < 0:
        raise ValueError("negative object size")
    byte = (kind << 4) | (size & 0x0F)
    size >>= 4
    out = bytearray()
    while size:
        out.append(byte | 0x80)
        byte = size & 0x7F
        size >>= 7
    out.append(byte)
    return bytes(out)


def _git_id(kind: int, content: bytes) -> bytes:
    return hashlib.sha1(b"%s %d\0" % (TYPE_NAMES[kind], len(content)) + content).digest()


def _single_component_problem(name: str) -> str | None:
    """Why `name` cannot be one path component (a file name, a directory name)."""
    if isinstance(name, str) and "/" in name:
        return "contains a '/'"
    return name_problem(name)


def _decode_name(raw: bytes, what: str) -> str:
    """A received name as text, or PackError saying why it is refused."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PackError(f"{what} {shown(raw)} is not valid UTF-8") from None
    problem = _single_component_problem(name)
    if problem:
        raise PackError(f"{what} {shown(name)} {problem}")
    return name


# --- the spool: where a directory's objects wait for the trailer ------------------------


class _Spool:
    """Append-only storage with random reads: memory while small, then a temporary file.

    The file comes from `tempfile.TemporaryFile`, which on Linux has no name at all and
    elsewhere is unlinked at once, so it disappears with `close()` or with the process.
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
        order = self._order
        position = bisect.bisect_left(order, object_id, key=self.id_of)
        if position < len(order) and self.id_of(order[position]) == object_id:
            return order[position]
        return None

    def read_whole(self, index: int, limit: int, what: str) -> bytes:
        length = self.lengths[index]
        if length > limit:
            raise PackError(f"{what} is {length} bytes, over the {limit}-byte limit")
        return self.spool.read(self.starts[index], length)


def _tree_entries(data: bytes, what: str) -> Iterator[tuple[bytes, bytes, bytes]]:
    """(mode, name, id) for each entry of a Git tree: ``<mode> <name>\\0<20-byte id>``."""
    position = 0
    while position < len(data):
        space = data.find(b" ", position, position + 7)
        if space < 0:
            raise PackError(f"{what} has an entry without a valid mode")
        null = data.find(b"\0", space + 1)
        if null < 0 or null + 1 + ID_SIZE > len(data):
            raise PackError(f"{what} has an entry cut short")
        yield data[position:space], data[space + 1 : null], data[null + 1 : null + 1 + ID_SIZE]
        position = null + 1 + ID_SIZE


# --- the reader ----------------------------------------------------------------------


class _State(enum.Enum):
    HEADER = "in its header"
    OBJECT_HEADER = "in an object header"
    OBJECT_DATA = "in an object's data"
    TRAILER = "before its SHA-1 trailer"
    AFTER_TRAILER = "after its trailer"
    DONE = "done"
    CLOSED = "closed"


class PackReader:
    """Decodes bob's pack from record plaintexts split anywhere, as events.

    Driving it::

        reader.feed(plaintext)                   # each record, in order
        while (event := reader.next_event()) is not None:
            ...                                  # SingleFile, FileData, ... PackEnd
        reader.eof()                             # the channel ended: PackError if early
        reader.close()                           # always (or use `with PackReader() as r`)

    One file gives ``SingleFile, FileData..., PackEnd``; the FileData pieces come as
    they inflate and are only vouched for by PackEnd (the trailer), so write them aside
    until then. A directory gives ``Directory, TreeEntry..., PackEnd``, all after the
    trailer, because its objects must be gathered to resolve deltas and trees first;
    they wait in a spool (memory, then an anonymous temporary file in `temp_dir`).
    Stream a file entry's content with `iter_blob(entry.id)`. Every problem with the
    received bytes raises PackError, then and on every later call.
    """

    def __init__(
        self, *, temp_dir: str | os.PathLike[str] | None = None, limits: PackLimits = DEFAULT_LIMITS
    ) -> None:
        self._limits = limits
        self._temp_dir = temp_dir
        self._buffer = bytearray()
        self._position = 0
        self._sha = hashlib.sha1()
        self._consumed = 0
        self._state = _State.HEADER
        self._failure: PackError | None = None
        self._count = 0
        self._index = 0
        self._single: bool | None = None
        # The object being inflated.
        self._kind = 0
        self._size = 0
        self._produced = 0
        self._inflater = None
        self._maybe_more_output = False
        # One file.
        self._name_bytes = bytearray()
        self._name: str | None = None
        self._file_size = 0
        # A directory.
        self._store: _ObjectStore | None = None
        self._spool: _Spool | None = None
        self._events: Iterator[PackEvent] | None = None
        self._root_name: str | None = None
        self._root_tree: bytes | None = None

    def __enter__(self) -> PackReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def bytes_consumed(self) -> int:
        """Pack bytes parsed so far (for a progress display)."""
        return self._consumed

    @property
    def finished(self) -> bool:
        """True once PackEnd has been returned."""
        return self._state is _State.DONE

    @property
    def trailer_seen(self) -> bool:
        """True once the whole pack arrived and its SHA-1 matched: stop reading the channel."""
        return self._state in (_State.AFTER_TRAILER, _State.DONE)

    def _fail(self, reason: str) -> PackError:
        self._failure = PackError(reason)
        return self._failure

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add the next bytes of the stream (usually one record's plaintext)."""
        if self._failure is not None:
            raise self._failure
        if self._state is _State.CLOSED:
            raise RuntimeError("feed() after close()")
        if not data:
            return
        if self.trailer_seen:
            raise self._fail("the sender sent data after the pack's SHA-1 trailer")
        if self._position:
            del self._buffer[: self._position]
            self._position = 0
        self._buffer += data

    def next_event(self) -> PackEvent | None:
        """The next event, or None when more input is needed (or all events are out)."""
        if self._failure is not None:
            raise self._failure
        if self._state is _State.CLOSED:
            raise RuntimeError("next_event() after close()")
        try:
            return self._next_event()
        except PackError as exc:
            self._failure = exc
            raise
        except zlib.error as exc:
            raise self._fail(f"object {self._index} has corrupt zlib data ({exc})") from None

    def eof(self) -> None:
        """The channel ended: fine after the trailer, PackError before it."""
        if self._failure is not None:
            raise self._failure
        if not self.trailer_seen and self._state is not _State.CLOSED:
            where = self._state.value
            if self._state in (_State.OBJECT_HEADER, _State.OBJECT_DATA):
                where = f"in object {self._index + 1} of {self._count}"
            raise self._fail(f"the pack stream ended early ({where}, after {self._consumed} bytes)")

    def close(self) -> None:
        """Drop everything, the spool file included. Safe to call more than once."""
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._spool is not None:
            self._spool.close()
        self._spool = None
        self._store = None
        self._buffer = bytearray()
        self._position = 0
        self._inflater = None
        self._state = _State.CLOSED

    # -- after the Directory event --

    def iter_blob(self, blob_id: bytes) -> Iterator[bytes]:
        """The content of a file entry of the directory, in pieces of at most 1 MiB.

        Raises KeyError at once for an id that is not a blob of this pack.
        """
        index = self._blob_index(blob_id)
        return self._blob_pieces(self._store.starts[index], self._store.lengths[index])

    def _blob_pieces(self, start: int, length: int) -> Iterator[bytes]:
        for offset in range(0, length, _READ_STEP):
            if self._spool is None:
                raise RuntimeError("the reader was closed while a blob was being read")
            yield self._spool.read(start + offset, min(_READ_STEP, length - offset))

    def _blob_index(self, blob_id: bytes) -> int:
        if self._store is None or self._root_tree is None:
            raise RuntimeError("blobs are available between the Directory event and close()")
        index = self._store.find(bytes(blob_id))
        if index is None or self._store.kinds[index] != BLOB:
            raise KeyError(f"no blob {bytes(blob_id).hex()} in this pack")
        return index

    def offer(self) -> Offer:
        """What the pack holds as our own data phase's Offer, for `Destination.plan`.

        Available after SingleFile (then the file is not verified yet) or Directory.
        """
        if self._name is not None:
            return Offer([OfferEntry(FILE, self._name, self._file_size)])
        if self._root_tree is None or self._store is None:
            raise RuntimeError("the offer is known after the SingleFile or Directory event")
        entries = [OfferEntry(DIRECTORY, self._root_name)]
        entries.extend(entry.offer_entry() for entry in self._walk())
        try:
            return Offer(entries)
        except ValueError as exc:
            raise PackError(f"the directory cannot be received: {exc}") from None

    # -- the parser --

    def _next_event(self) -> PackEvent | None:
        while True:
            state = self._state
            if state is _State.OBJECT_DATA:
                event = self._inflate_step()
                if event is not None or self._state is _State.OBJECT_DATA and not self._can_inflate():
                    return event
            elif state is _State.OBJECT_HEADER:
                event = self._parse_object_header()
                if event is not None or self._state is _State.OBJECT_HEADER:
                    return event
            elif state is _State.HEADER:
                if not self._parse_pack_header():
                    return None
            elif state is _State.TRAILER:
                event = self._check_trailer()
                if event is not None or self._state is _State.TRAILER:
                    return event
            elif state is _State.AFTER_TRAILER:
                event = next(self._events, None)
                if event is None or isinstance(event, PackEnd):
                    self._events = None
                    self._state = _State.DONE
                return event
            else:  # DONE
                return None

    def _available(self) -> int:
        return len(self._buffer) - self._position

    def _consume(self, size: int) -> bytes:
        data = bytes(self._buffer[self._position : self._position + size])
        self._sha.update(data)
        self._position += size
        self._consumed += size
        return data

    def _parse_pack_header(self) -> bool:
        if self._available() < HEADER.size:
            if self._buffer[self._position : self._position + 4] != MAGIC[: self._available()]:
                raise PackError("the stream is not a Git pack (no PACK signature)")
            return False
        magic, version, count = HEADER.unpack(self._consume(HEADER.size))
        if magic != MAGIC:
            raise PackError("the stream is not a Git pack (no PACK signature)")
        if version != VERSION:
            raise PackError(f"unsupported pack version {version} (expected {VERSION})")
        if count > self._limits.max_objects:
            raise PackError(f"the pack declares {count} objects, over the {self._limits.max_objects} limit")
        self._count = count
        self._state = _State.OBJECT_HEADER if count else _State.TRAILER
        return True

    def _read_header(self) -> tuple[int, int, int, bytes | None, int] | None:
        """(type, size, OFS_DELTA distance, REF_DELTA base id, length), None if incomplete."""
        buffer, start, end = self._buffer, self._position, len(self._buffer)
        position = start
        if position >= end:
            return None
        byte = buffer[position]
        position += 1
        kind = (byte >> 4) & 7
        size = byte & 0x0F
        shift = 4
        while byte & 0x80:
            if position >= end:
                return None
            byte = buffer[position]
            position += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if shift > 64:
                raise PackError(f"object {self._index} has a size header longer than 64 bits")
        distance = 0
        base_id = None
        if kind == OFS_DELTA:
            if position >= end:
                return None
            byte = buffer[position]
            position += 1
            distance = byte & 0x7F
            while byte & 0x80:
                if position >= end:
                    return None
                byte = buffer[position]
                position += 1
                distance = ((distance + 1) << 7) | (byte & 0x7F)
                if distance >= 1 << 64:
                    raise PackError(f"object {self._index} has a base offset longer than 64 bits")
        elif kind == REF_DELTA:
            if end - position < ID_SIZE:
                return None
            base_id = bytes(buffer[position : position + ID_SIZE])
            position += ID_SIZE
        elif kind not in TYPE_NAMES:
            raise PackError(f"object {self._index} has the unknown type {kind}")
        return kind, size, distance, base_id, position - start

    def _parse_object_header(self) -> PackEvent | None:
        offset = self._consumed
        header = self._read_header()
        if header is None:
            return None
        kind, size, distance, base_id, length = header
        self._consume(length)
        index = self._index
        if index == 0:
            self._single = kind == TAG
            if self._single:
                if self._count != 2:
                    raise PackError(f"a single-file pack holds 2 objects, this one declares {self._count}")
            else:
                self._spool = _Spool(self._limits.memory_spool, self._temp_dir)
                self._store = _ObjectStore(self._spool, self._limits)
        event = None
        if self._single:
            if index == 0 and size > MAX_PATH_BYTES:
                raise PackError(f"the file name is {size} bytes long, over {MAX_PATH_BYTES}")
            if index == 1:
                if kind != BLOB:
                    what = _DESCRIBED[kind]
                    raise PackError(f"the second object of a single-file pack is a {what}, not a blob")
                if size > MAX_FILE_SIZE:
                    raise PackError(f"the file is announced as {size} bytes, too large")
                self._file_size = size
                event = SingleFile(self._name, size)
        else:
            base_index = -1
            if kind == OFS_DELTA:
                base_offset = offset - distance
                if distance == 0 or base_offset < HEADER.size:
                    raise PackError(f"delta object {index} points at {base_offset}, outside the pack")
                base_index = self._store.index_at_offset(base_offset)
                if base_index is None:
                    raise PackError(f"delta object {index} points at {base_offset}, where no object starts")
            limit = self._limits.max_object_size
            if size > limit:
                raise PackError(f"object {index} is {size} bytes, over the {limit}-byte limit")
            self._store.begin(offset, kind, size, base_index, base_id)
        self._kind, self._size, self._produced = kind, size, 0
        self._inflater = zlib.decompressobj()
        self._maybe_more_output = False
        self._state = _State.OBJECT_DATA
        return event

    def _can_inflate(self) -> bool:
        return self._available() > 0 or self._maybe_more_output

    def _inflate_step(self) -> PackEvent | None:
        """Inflate a bounded piece of the current object; an event only for file data."""
        if not self._can_inflate():
            return None
        inflater = self._inflater
        step = min(self._available(), _INPUT_STEP)
        remaining = self._size - self._produced
        limit = min(_OUTPUT_STEP, remaining + 1)  # +1: an overlong object shows itself
        with memoryview(self._buffer) as whole, whole[self._position : self._position + step] as chunk:
            output = inflater.decompress(chunk, limit)
            # At the end of the stream the leftover input is `unused_data`; CPython
            # may then still show a stale `unconsumed_tail`, so never add the two.
            used = step - len(inflater.unused_data if inflater.eof else inflater.unconsumed_tail)
            with chunk[:used] as taken:
                self._sha.update(taken)
        self._position += used
        self._consumed += used
        # A full output buffer may leave inflated bytes inside zlib; ask again even if
        # no input is left, or a stream whose input is all here would never finish.
        self._maybe_more_output = len(output) == limit and not inflater.eof
        if len(output) > remaining:
            raise PackError(f"object {self._index} inflates to more than its declared {self._size} bytes")
        self._produced += len(output)
        event = None
        if self._single:
            if self._index == 0:
                self._name_bytes += output
            elif output:
                event = FileData(output)
        elif output:
            self._store.write(output)
            budget = self._limits.budget(self._consumed)
            if self._spool.size > budget:
                raise PackError(f"the pack's objects inflate past {budget} bytes, more than its size allows")
        if inflater.eof:
            self._end_object()
        return event

    def _end_object(self) -> None:
        if self._produced != self._size:
            raise PackError(
                f"object {self._index} inflates to {self._produced} bytes, its header says {self._size}"
            )
        self._inflater = None
        if self._single:
            if self._index == 0:
                self._name = _decode_name(bytes(self._name_bytes), "the file name")
        else:
            self._store.end()
        self._index += 1
        self._state = _State.OBJECT_HEADER if self._index < self._count else _State.TRAILER

    def _check_trailer(self) -> PackEvent | None:
        if self._available() < TRAILER_SIZE:
            return None
        expected = self._sha.digest()
        trailer = bytes(self._buffer[self._position : self._position + TRAILER_SIZE])
        self._position += TRAILER_SIZE
        self._consumed += TRAILER_SIZE
        if trailer != expected:
            raise PackError("the pack's SHA-1 trailer does not match its content (corrupted in transit)")
        if self._available():
            raise PackError("the sender sent data after the pack's SHA-1 trailer")
        if self._single is None:
            raise PackError("the pack holds no objects")
        if self._single:
            self._state = _State.DONE
            return PackEnd()
        self._state = _State.AFTER_TRAILER
        self._events = self._directory_events()
        return None

    # -- a directory, once the trailer matched --

    def _directory_events(self) -> Iterator[PackEvent]:
        store = self._store
        store.resolve(self._limits.budget(self._consumed))
        store.index_ids()
        self._find_root()
        # A first walk checks everything (names, modes, object types, bombs), so the
        # driver hears about a bad tree before it has written a single file.
        entries = files = total = 0
        for entry in self._walk():
            entries += 1
            if entry.kind == FILE:
                files += 1
                total += entry.size
        yield Directory(self._root_name, entries, files, total)
        yield from self._walk()
        yield PackEnd()

    def _find_root(self) -> None:
        store = self._store
        root = next((i for i, kind in enumerate(store.kinds) if kind == COMMIT), None)
        if root is None:
            raise PackError("the pack has neither a file nor a root object (type 1)")
        content = store.read_whole(root, _MAX_ROOT_SIZE, "the root object")
        null = content.find(b"\0")
        if null < 0:
            raise PackError("the root object has no NUL after the directory name")
        self._root_name = _decode_name(content[:null], "the directory name")
        tree_id = content[null + 1 : null + 1 + ID_SIZE]
        count = content[null + 1 + ID_SIZE :]
        if len(tree_id) != ID_SIZE or not count.isdigit() or len(count) > 20:
            raise PackError("the root object is not <name>\\0<tree id><count>")
        self._root_tree = tree_id

    def _tree(self, object_id: bytes, path: str, room: int) -> bytes:
        store = self._store
        index = store.find(object_id)
        if index is None or store.kinds[index] != TREE:
            raise PackError(f"the directory {shown(path)} has no tree {object_id.hex()} in the pack")
        if store.lengths[index] > room:
            raise PackError(f"the trees down to {shown(path)} hold over {self._limits.max_tree_size} bytes")
        return store.spool.read(store.starts[index], store.lengths[index])

    def _walk(self) -> Iterator[TreeEntry]:
        """Every entry below the root, depth first, each directory before its content.

        Bounded however the trees reuse each other: at most `max_entries` entries, file
        sizes adding up to the expansion budget, and `max_tree_size` bytes of trees held
        at once (the trees from the root down to the current directory).
        """
        store, limits = self._store, self._limits
        budget = limits.budget(self._consumed)
        content = self._tree(self._root_tree, self._root_name, limits.max_tree_size)
        held = len(content)
        what = f"the tree of {shown(self._root_name)}"
        stack = [(self._root_name, _tree_entries(content, what), set(), held)]
        count = total = 0
        while stack:
            parent, entries, seen, size = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                held -= size
                continue
            count += 1
            if count >= limits.max_entries:
                raise PackError(f"the directory has over {limits.max_entries} entries")
            mode, raw_name, object_id = entry
            name = _decode_name(raw_name, f"an entry of {shown(parent)}")
            if name in seen:
                raise PackError(f"{shown(parent)} lists {shown(name)} twice")
            seen.add(name)
            path = f"{parent}/{name}"
            problem = name_problem(path)
            if problem:
                raise PackError(f"the path {shown(path)} {problem}")
            if mode == MODE_DIRECTORY:
                content = self._tree(object_id, path, limits.max_tree_size - held)
                held += len(content)
                yield TreeEntry(path, DIRECTORY, 0, False, object_id)
                entries = _tree_entries(content, f"the tree of {shown(path)}")
                stack.append((path, entries, set(), len(content)))
            elif mode in (MODE_FILE, MODE_EXECUTABLE):
                index = store.find(object_id)
                if index is None or store.kinds[index] != BLOB:
                    raise PackError(f"the file {shown(path)} has no blob {object_id.hex()} in the pack")
                size = store.lengths[index]
                total += size
                if total > budget:
                    raise PackError(f"the directory's files add up to over {budget} bytes, too much for a pack")
                yield TreeEntry(path, FILE, size, mode == MODE_EXECUTABLE, object_id)
            elif mode == MODE_SYMLINK:
                raise PackError(f"{shown(path)} is a symbolic link, which is not supported")
            elif mode == MODE_GITLINK:
                raise PackError(f"{shown(path)} is a Git submodule link, which is not supported")
            else:
                text = mode.decode("ascii", "replace")
                raise PackError(f"{shown(path)} has the unknown mode {shown(text)}")


# --- encoding ------------------------------------------------------------------------


class _Records:
    """Cuts a byte stream into record plaintexts of at most `size` bytes, hashing it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sha = hashlib.sha1()
        self._pending = bytearray()

    def add(self, data: bytes) -> Iterator[bytes]:
        """The full records `data` completes; the rest waits for more or for `flush`."""
        self.sha.update(data)
        with memoryview(data) as view:
            if self._pending:
                take = min(self.size - len(self._pending), len(view))
                self._pending += view[:take]
                view = view[take:]
                if len(self._pending) < self.size:
                    return
                yield bytes(self._pending)
                self._pending.clear()
            start = 0
            while len(view) - start >= self.size:
                yield bytes(view[start : start + self.size])
                start += self.size
            self._pending += view[start:]

    def flush(self) -> Iterator[bytes]:
        """What is left, as one record (none if nothing is)."""
        if self._pending:
            yield bytes(self._pending)
            self._pending.clear()

    def finish(self) -> Iterator[bytes]:
        """The SHA-1 trailer after what is left, in as few records as they fit."""
        digest = self.sha.digest()
        self.sha = None  # nothing may be added after the trailer
        self._pending += digest
        while self._pending:
            yield bytes(self._pending[: self.size])
            del self._pending[: self.size]


def _check_level_and_size(level: int, record_size: int) -> None:
    if not 0 <= level <= 9:
        raise ValueError(f"zlib level must be 0..9, got {level}")
    if not 1 <= record_size <= MAX_RECORD_SIZE:
        raise ValueError(f"record_size must be 1..{MAX_RECORD_SIZE}, got {record_size}")


def single_file_records(
    name: str,
    size: int,
    chunks: Iterable[bytes],
    level: int = DEFAULT_LEVEL,
    *,
    record_size: int = MAX_RECORD_SIZE,
) -> Iterator[bytes]:
    """The record plaintexts that send one file to bob, cut as its receiver needs them.

    bob's single-file receiver depends on record boundaries (docs/protocol.md §8.2):
    the pack header, the name object's header, the name's zlib data and the blob header
    each get their own record, the content follows in zlib chunks, and the SHA-1
    trailer comes alone in the last record; no record is empty. `chunks` (the file's
    bytes, read once) is consumed lazily; it must hold exactly `size` bytes, or
    SourceError is raised before anything past `size` is sent.

    `record_size` caps the content records. bob's own sender uses 2047; full records
    cost 16 times fewer seals, and bob's reader takes up to 0x7fff.
    """
    problem = _single_component_problem(name)
    if problem:
        raise ValueError(f"the file name {shown(name)} {problem}")
    if type(size) is not int or not 0 <= size <= MAX_FILE_SIZE:
        raise ValueError(f"invalid file size {size!r}")
    _check_level_and_size(level, record_size)
    return _single_file_records(name.encode("utf-8"), size, chunks, level, record_size)


def _single_file_records(
    name: bytes, size: int, chunks: Iterable[bytes], level: int, record_size: int
) -> Iterator[bytes]:
    records = _Records(record_size)
    compressed_name = zlib.compress(name, level)  # a name of <= 4096 bytes fits a record
    pack_header = HEADER.pack(MAGIC, VERSION, 2)
    for piece in (pack_header, object_header(TAG, len(name)), compressed_name, object_header(BLOB, size)):
        records.sha.update(piece)
        yield piece
    compressor = zlib.compressobj(level)
    total = 0
    for chunk in chunks:
        if not chunk:
            continue
        total += len(chunk)
        if total > size:
            raise SourceError(f"the file grew past its announced {size} bytes while it was being sent")
        yield from records.add(compressor.compress(chunk))
    if total != size:
        raise SourceError(f"the file ended after {total} of its announced {size} bytes")
    yield from records.add(compressor.flush())
    yield from records.flush()
    yield records.sha.digest()


# --- directories ---------------------------------------------------------------------


def _kind_of(mode: int) -> str:
    return "a symbolic link" if stat.S_ISLNK(mode) else kind_of_mode(mode)


def _open_regular(path: str, display: str) -> tuple[int, int]:
    """An fd on a regular file (never through a symlink) and its size."""
    try:
        fd = os.open(path, os.O_RDONLY | _CLOEXEC | _NONBLOCK | _BINARY | _NOFOLLOW)
    except OSError as exc:
        raise SourceError(f"cannot read {display}: {os_reason(exc)}") from None
    try:
        info = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise SourceError(f"cannot read {display}: {os_reason(exc)}") from None
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise SourceError(f"cannot send {display}: it is no longer a regular file")
    return fd, info.st_size


def _read_file(fd: int, size: int, display: str) -> Iterator[memoryview]:
    """The file's bytes in pieces (each valid until the next); exactly `size` of them."""
    buffer = bytearray(min(_READ_STEP, max(size, 1)))
    remaining = size
    with memoryview(buffer) as view:
        while remaining:
            try:
                count = os.readv(fd, [view[: min(len(view), remaining)]])
            except OSError as exc:
                raise SourceError(f"cannot read {display}: {os_reason(exc)}") from None
            if not count:
                raise SourceError(f"{display} shrank while it was being read")
            remaining -= count
            yield view[:count]
        try:
            extra = os.read(fd, 1)
        except OSError as exc:
            raise SourceError(f"cannot read {display}: {os_reason(exc)}") from None
        if extra:
            raise SourceError(f"{display} grew while it was being read")


@attrs.frozen
class _Blob:
    path: str
    size: int
    display: str


@attrs.frozen
class _Folder:
    path: str
    name: str  # relative path, starting with the directory's own name
    display: str
    # (git sort key, mode, name bytes, child folder index or blob id)
    entries: list = attrs.field(factory=list)


class DirectoryPack:
    """A directory ready to send to bob as a pack; made by `directory_pack`.

    Every file is read twice: once in `directory_pack` for its Git id (trees hold the
    ids of their content and the pack header its object count, both needed before
    the first byte is sent, and identical files are sent once), and again in
    `records()` to send it, where a file that no longer matches its id stops the
    transfer. That costs a second read, never a temporary copy of the directory.
    """

    def __init__(
        self,
        name: str,
        tree_id: bytes,
        root: bytes,
        trees: dict[bytes, bytes],
        blobs: dict[bytes, _Blob],
        path_count: int,
        warnings: tuple[str, ...],
    ) -> None:
        self.name = name
        self.tree_id = tree_id
        self.path_count = path_count
        """Files and directories, the directory itself included (bob announces this + 1)."""
        self.warnings = warnings
        """What was left out (symbolic links, special files), one line each."""
        self.object_count = 1 + len(trees) + len(blobs)
        self.content_size = sum(blob.size for blob in blobs.values())
        """Bytes of distinct file content that `records()` will read and compress."""
        self.content_sent = 0
        """Bytes of file content `records()` has read so far (for a progress display)."""
        self._root = root
        self._trees = trees
        self._blobs = blobs

    def records(self, level: int = DEFAULT_LEVEL, *, record_size: int = MAX_RECORD_SIZE) -> Iterator[bytes]:
        """The pack as record plaintexts, each full-size but the last; reads each file again.

        Order: the root object, then trees and blobs by ascending id, no deltas.
        bob's directory receiver parses the whole pack with no regard for records.
        """
        _check_level_and_size(level, record_size)
        return self._records(level, record_size)

    def _records(self, level: int, record_size: int) -> Iterator[bytes]:
        records = _Records(record_size)
        self.content_sent = 0
        yield from records.add(HEADER.pack(MAGIC, VERSION, self.object_count))
        yield from records.add(object_header(COMMIT, len(self._root)) + zlib.compress(self._root, level))
        for object_id in sorted(self._trees.keys() | self._blobs.keys()):
            tree = self._trees.get(object_id)
            if tree is not None:
                yield from records.add(object_header(TREE, len(tree)) + zlib.compress(tree, level))
            else:
                yield from self._blob_records(records, object_id, self._blobs[object_id], level)
        yield from records.finish()

    def _blob_records(self, records: _Records, object_id: bytes, blob: _Blob, level: int) -> Iterator[bytes]:
        fd, size = _open_regular(blob.path, blob.display)
        try:
            if size != blob.size:
                raise SourceError(f"{blob.display} changed while being sent: {blob.size} bytes, now {size}")
            yield from records.add(object_header(BLOB, size))
            compressor = zlib.compressobj(level)
            hasher = hashlib.sha1(b"blob %d\0" % size)
            for piece in _read_file(fd, size, blob.display):
                hasher.update(piece)
                self.content_sent += len(piece)
                yield from records.add(compressor.compress(piece))
            if hasher.digest() != object_id:
                raise SourceError(f"{blob.display} changed while being sent")
            yield from records.add(compressor.flush())
        finally:
            os.close(fd)


def directory_pack(root: str | os.PathLike[str], name: str | None = None) -> DirectoryPack:
    """Scan `root` and hash its files: the first of the two reads (see DirectoryPack).

    Sent under `name` (default: the directory's own name). Dot-files are sent too,
    unlike bob; symbolic links and special files inside are skipped with a warning,
    and a name that `peer.transfer.name_problem` refuses raises SourceError. Every
    file goes as mode 100644 and every directory as 40000: bob's receiver refuses any
    other mode, so the executable bit is lost.
    """
    display_root = os.fspath(root)
    top = os.path.abspath(display_root)
    if name is None:
        name = os.path.basename(top)
    problem = _single_component_problem(name)
    if problem:
        raise SourceError(f"cannot send {display_root}: its name {shown(name)} {problem}")
    try:
        info = os.stat(top)
    except OSError as exc:
        raise SourceError(f"cannot read {display_root}: {os_reason(exc)}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SourceError(f"cannot send {display_root} as a directory: it is not one")

    folders = [_Folder(top, name, display_root)]
    blobs: dict[bytes, _Blob] = {}
    warnings: list[str] = []
    paths = 1
    pending = [0]
    while pending:
        folder = folders[pending.pop()]
        try:
            with os.scandir(folder.path) as listing:
                children = sorted(listing, key=lambda child: child.name)
        except OSError as exc:
            raise SourceError(f"cannot read {folder.display}: {os_reason(exc)}") from None
        for child in children:
            child_name = f"{folder.name}/{child.name}"
            child_display = os.path.join(folder.display, child.name)
            try:
                mode = child.stat(follow_symlinks=False).st_mode
            except OSError as exc:
                raise SourceError(f"cannot read {child_display}: {os_reason(exc)}") from None
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                warnings.append(f"skipped {child_display}: it is {_kind_of(mode)}")
                continue
            problem = name_problem(child_name)
            if problem:
                raise SourceError(f"cannot send {child_display}: its name {problem}")
            raw = child.name.encode("utf-8")
            paths += 1
            if stat.S_ISDIR(mode):
                folders.append(_Folder(child.path, child_name, child_display))
                pending.append(len(folders) - 1)
                folder.entries.append((raw + b"/", MODE_DIRECTORY, raw, len(folders) - 1))
            else:
                object_id, size = _hash_file(child.path, child_display)
                blobs.setdefault(object_id, _Blob(child.path, size, child_display))
                folder.entries.append((raw, MODE_FILE, raw, object_id))
    # A folder's subfolders come after it in `folders`, so going backwards builds every
    # tree after the trees it contains.
    tree_ids: list[bytes] = [b""] * len(folders)
    trees: dict[bytes, bytes] = {}
    for index in range(len(folders) - 1, -1, -1):
        parts = []
        for _, mode, raw, target in sorted(folders[index].entries):
            object_id = tree_ids[target] if mode == MODE_DIRECTORY else target
            parts.append(b"%s %s\0%s" % (mode, raw, object_id))
        content = b"".join(parts)
        tree_ids[index] = _git_id(TREE, content)
        trees.setdefault(tree_ids[index], content)
    root_content = b"%s\0%s%d" % (name.encode("utf-8"), tree_ids[0], paths + 1)
    return DirectoryPack(name, tree_ids[0], root_content, trees, blobs, paths, tuple(warnings))


def _hash_file(path: str, display: str) -> tuple[bytes, int]:
    fd, size = _open_regular(path, display)
    try:
        hasher = hashlib.sha1(b"blob %d\0" % size)
        for piece in _read_file(fd, size, display):
            hasher.update(piece)
        return hasher.digest(), size
    finally:
        os.close(fd)
