"""Reading bob's pack (docs/protocol.md §8), sans I/O: events out of record plaintexts.

A directory pack is read in two stages, so that a tiny hostile pack cannot fill a disk
before the user is asked (issue 16):

1. *Describing*, as the records arrive: the compressed bytes go to a spool (linear in
   what the sender sent), trees and the root object are inflated into memory (bounded
   by ``PackLimits.max_described``), each blob is inflated once only to hash it (its Git
   id is the hash of its content, and the trees name files by id), stored nowhere and
   stopped at its declared size, and of a delta only its header is kept (the size it
   builds). After the trailer, `Directory` and `offer()` describe the directory; a file
   whose content is a delta has an unknown size in that offer.
2. *Extracting*, once the driver asks for the next event: the spooled objects are inflated and
   the deltas resolved, each object to exactly its declared size and all of them within
   `unpacked_size`, which the driver checked against the free space before asking.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import os
import zlib
from array import array
from typing import Callable, Iterator

from peer.offer import DIRECTORY, FILE, MAX_FILE_SIZE, MAX_PATH_BYTES, Offer, OfferEntry, name_problem, shown

from .format import (
    _DELTAS,
    _DESCRIBED,
    _INPUT_STEP,
    _MAX_ROOT_SIZE,
    _OUTPUT_STEP,
    _READ_STEP,
    BLOB,
    COMMIT,
    DEFAULT_LIMITS,
    HEADER,
    ID_SIZE,
    MAGIC,
    MODE_DIRECTORY,
    MODE_EXECUTABLE,
    MODE_FILE,
    MODE_GITLINK,
    MODE_SYMLINK,
    OFS_DELTA,
    REF_DELTA,
    TAG,
    TRAILER_SIZE,
    TREE,
    TYPE_NAMES,
    VERSION,
    Directory,
    FileData,
    PackEnd,
    PackError,
    PackEvent,
    PackLimits,
    SingleFile,
    TreeEntry,
    _decode_name,
    _tree_entries,
)
from .store import DELTA_HEADER_MAX, _ObjectStore, _Spool, apply_small_delta, delta_sizes, find_sorted

_NO_ID = bytes(ID_SIZE)
_INSTRUCTION_WEIGHT = 32
"""How much one byte of delta instructions counts against ``max_identified``."""

# How the describing stage treats the data of the object being inflated.
_KEEP = 1  # into memory: trees, the root, tags, deltas of those
_HASH = 2  # a blob: hashed, stored nowhere
_HEAD = 3  # a delta of a blob: its header only


class _State(enum.Enum):
    HEADER = "in its header"
    OBJECT_HEADER = "in an object header"
    OBJECT_DATA = "in an object's data"
    TRAILER = "before its SHA-1 trailer"
    DESCRIBED = "waiting for the user's decision"
    AFTER_TRAILER = "after its trailer"
    DONE = "done"
    CLOSED = "closed"


class _Described:
    """What the describing stage learnt of a directory pack's objects, in compact arrays."""

    def __init__(self) -> None:
        self.offsets = array("Q")  # where each object starts in the pack
        self.data_starts = array("Q")  # where its zlib data starts
        self.kinds = bytearray()  # the pack type; a resolved tree delta gets its base's type
        self.sizes = array("Q")  # the inflated size its header declares
        self.bases = array("q")  # OFS_DELTA: the base's index, else -1
        self.ref_bases: dict[int, bytes] = {}
        self.ids = bytearray()  # zero while unknown (deltas of blobs)
        self.held: dict[int, bytes] = {}  # contents kept in memory
        self.held_ids: dict[bytes, int] = {}
        self.results: dict[int, int] = {}  # a delta of a blob: the size it builds
        self.identified: dict[int, int] = {}  # ... once its id is known before the decision
        self.blob_deltas = 0  # deltas still unknown when the offer is made
        self.largest_delta = 0  # the largest size one of those builds
        self._order: array | None = None

    def __len__(self) -> int:
        return len(self.kinds)

    def id_of(self, index: int) -> bytes:
        return bytes(self.ids[index * ID_SIZE : (index + 1) * ID_SIZE])

    def index_at_offset(self, offset: int) -> int | None:
        position = bisect.bisect_left(self.offsets, offset)
        if position < len(self.offsets) and self.offsets[position] == offset:
            return position
        return None

    def index_ids(self) -> None:
        known = [index for index in range(len(self.kinds)) if self.id_of(index) != _NO_ID]
        self._order = array("L", sorted(known, key=self.id_of))

    def find(self, object_id: bytes) -> int | None:
        return find_sorted(self._order, object_id, self.id_of)


class PackReader:
    """Decodes bob's pack from record plaintexts split anywhere, as events.

    Driving it::

        reader.feed(plaintext)                   # each record, in order
        while (event := reader.next_event()) is not None:
            ...                                  # SingleFile, FileData, ... PackEnd
        reader.eof()                             # the channel ended: PackError if early
        reader.close()                           # always (or use `with PackReader() as r`)

    One file gives ``SingleFile, FileData..., PackEnd``; SingleFile comes before a byte
    of the file is inflated, so ask the user then. The FileData pieces come as they
    inflate, never past the declared size, and are only vouched for by PackEnd (the
    trailer), so write them aside until then.

    A directory gives ``Directory`` once the whole pack arrived and its trailer matched,
    before anything of its files is stored: ask the user then (`offer()`,
    `unpacked_size`, `most_bytes`); asking for the next event is the acceptance, and
    starts the extraction: ``TreeEntry..., PackEnd``. To decline, just `close()`. Stream a file entry's
    content with `iter_blob(entry.id)`. Until then the pack's compressed bytes wait in a
    spool (memory, then an anonymous temporary file in `temp_dir`, which the driver
    should make the destination), at most `spool_limit` bytes. Every problem with the
    received bytes raises PackError, then and on every later call.
    """

    def __init__(
        self,
        *,
        temp_dir: str | os.PathLike[str] | None = None,
        limits: PackLimits = DEFAULT_LIMITS,
        spool_limit: int | None = None,
    ) -> None:
        self._limits = limits
        self._temp_dir = temp_dir
        self._spool_limit = limits.max_pack_size if spool_limit is None else min(spool_limit, limits.max_pack_size)
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
        self._mode = 0
        self._kept = bytearray()
        self._hasher = None
        # One file.
        self._name_bytes = bytearray()
        self._name: str | None = None
        self._file_size = 0
        # A directory: described, then extracted.
        self._raw: _Spool | None = None
        self._described: _Described | None = None
        self._held_bytes = 0
        self._tree_delta_work = 0
        self._entries: list[TreeEntry] = []
        self._unpacked = 0
        self._needed: list[int] = []
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
        return self._state in (_State.DESCRIBED, _State.AFTER_TRAILER, _State.DONE)

    @property
    def is_directory(self) -> bool:
        """True as soon as the first object shows the pack carries a directory."""
        return self._single is False

    @property
    def spooled(self) -> int:
        """Bytes the reader holds in its spools now (compressed, then inflated)."""
        return sum(spool.size for spool in (self._raw, self._spool) if spool is not None)

    @property
    def unpacked_size(self) -> int:
        """After Directory: the bytes the extraction may inflate into its spool, at most.

        Every object's declared size plus every delta's declared result, the sizes the
        headers announce; extraction holds each object to its own.
        """
        return self._unpacked

    @property
    def most_bytes(self) -> int:
        """After Directory: the most the directory's files can add up to.

        The offer's total, plus for each file of unknown size (a delta's result) the
        largest result a delta of the pack declares.
        """
        unknown = sum(1 for entry in self._entries if entry.kind == FILE and entry.size is None)
        known = sum(entry.size for entry in self._entries if entry.kind == FILE and entry.size is not None)
        return known + unknown * (self._described.largest_delta if self._described else 0)

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
        if self._state is _State.DESCRIBED:
            # Asking for more after Directory is the acceptance: extraction starts now.
            self._events = self._extracted_events()
            self._state = _State.AFTER_TRAILER
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
        """Drop everything, the spool files included. Safe to call more than once."""
        if self._events is not None:
            self._events.close()
            self._events = None
        for spool in (self._raw, self._spool):
            if spool is not None:
                spool.close()
        self._raw = self._spool = None
        self._store = None
        self._described = None
        self._buffer = bytearray()
        self._kept = bytearray()
        self._position = 0
        self._inflater = None
        self._state = _State.CLOSED

    # -- once extracting --

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
        if self._store is None or self._store._order is None:
            raise RuntimeError("blobs are available between the first TreeEntry event and close()")
        index = self._store.find(bytes(blob_id))
        if index is None or self._store.kinds[index] != BLOB:
            raise KeyError(f"no blob {bytes(blob_id).hex()} in this pack")
        return index

    def offer(self) -> Offer:
        """What the pack holds as our own data phase's Offer, for `Destination.plan`.

        Available after SingleFile (then the file is not verified yet) or Directory (a
        file whose content is a delta has the size None there: unknown until extracted).
        """
        if self._name is not None:
            return Offer([OfferEntry(FILE, self._name, self._file_size)])
        if self._root_name is None:
            raise RuntimeError("the offer is known after the SingleFile or Directory event")
        entries = [OfferEntry(DIRECTORY, self._root_name)]
        entries.extend(entry.offer_entry() for entry in self._entries)
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

    def _keep_raw(self, data: bytes | memoryview) -> None:
        """A directory's compressed bytes, kept for extraction; bounded by `spool_limit`."""
        if self._raw is not None:
            if self._raw.size + len(data) > self._spool_limit:
                raise PackError(
                    f"the pack is over {self._spool_limit} bytes, more than the destination can hold"
                )
            self._raw.append(data)

    def _consume(self, size: int) -> bytes:
        data = bytes(self._buffer[self._position : self._position + size])
        self._sha.update(data)
        self._keep_raw(data)
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
        index = self._index
        if index == 0:
            self._single = kind == TAG
            if self._single:
                if self._count != 2:
                    raise PackError(f"a single-file pack holds 2 objects, this one declares {self._count}")
            else:
                self._raw = _Spool(self._limits.memory_spool, self._temp_dir)
                self._keep_raw(HEADER.pack(MAGIC, VERSION, self._count))
                self._described = _Described()
        self._consume(length)
        event = None
        self._mode = 0
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
            self._begin_described(index, offset, kind, size, distance, base_id)
        self._kind, self._size, self._produced = kind, size, 0
        self._inflater = zlib.decompressobj()
        self._maybe_more_output = False
        self._state = _State.OBJECT_DATA
        return event

    def _begin_described(
        self, index: int, offset: int, kind: int, size: int, distance: int, base_id: bytes | None
    ) -> None:
        described, limits = self._described, self._limits
        base_index = -1
        if kind == OFS_DELTA:
            base_offset = offset - distance
            if distance == 0 or base_offset < HEADER.size:
                raise PackError(f"delta object {index} points at {base_offset}, outside the pack")
            base_index = described.index_at_offset(base_offset)
            if base_index is None:
                raise PackError(f"delta object {index} points at {base_offset}, where no object starts")
        if size > limits.max_object_size:
            raise PackError(f"object {index} is {size} bytes, over the {limits.max_object_size}-byte limit")
        described.offsets.append(offset)
        described.data_starts.append(self._consumed)
        described.kinds.append(kind)
        described.sizes.append(size)
        described.bases.append(base_index)
        described.ids += _NO_ID
        if base_id is not None:
            described.ref_bases[index] = base_id
        if kind == BLOB:
            self._mode = _HASH
            self._hasher = hashlib.sha1(b"blob %d\0" % size)
            return
        if kind in _DELTAS:
            base = base_index if kind == OFS_DELTA else described.held_ids.get(base_id, -1)
            if base < 0 or base not in described.held:
                self._mode = _HEAD  # a delta of a blob (or of one not seen yet): its header only
                return
        self._mode = _KEEP
        if kind in _DELTAS:
            # Applied in Python, a step per instruction: counted like the blob deltas' ones.
            self._tree_delta_work += _INSTRUCTION_WEIGHT * size
            if self._tree_delta_work > limits.max_described:
                raise PackError(
                    f"the pack's tree deltas hold over {limits.max_described // _INSTRUCTION_WEIGHT} bytes "
                    "of instructions, too many to show before accepting"
                )
        if self._held_bytes + size > limits.max_described:
            raise PackError(
                f"the pack's trees hold over {limits.max_described} bytes, too many to show before accepting"
            )
        self._held_bytes += size
        self._kept = bytearray()

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
                self._keep_raw(taken)
        self._position += used
        self._consumed += used
        # A full output buffer may leave inflated bytes inside zlib; ask again even if
        # no input is left, or a stream whose input is all here would never finish.
        self._maybe_more_output = len(output) == limit and not inflater.eof
        if len(output) > remaining:
            raise PackError(f"object {self._index} inflates to more than its declared {self._size} bytes")
        event = None
        if self._single:
            if self._index == 0:
                self._name_bytes += output
            elif output:
                event = FileData(output)
        elif self._mode == _HASH:
            self._hasher.update(output)
        elif self._mode == _KEEP:
            self._kept += output
        elif self._produced < DELTA_HEADER_MAX:
            self._kept += output[: DELTA_HEADER_MAX - self._produced]
        self._produced += len(output)
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
            self._end_described()
        self._index += 1
        self._state = _State.OBJECT_HEADER if self._index < self._count else _State.TRAILER

    def _end_described(self) -> None:
        described, index, kind = self._described, self._index, self._kind
        content, self._kept = bytes(self._kept), bytearray()
        if kind in _DELTAS:
            what = f"delta object {index}"
            sizes = delta_sizes(content[:DELTA_HEADER_MAX], what)
            if sizes is None:
                raise PackError(f"{what} ends in the middle of its header")
            result_size = sizes[1]
            if result_size > self._limits.max_object_size:
                limit = self._limits.max_object_size
                raise PackError(f"{what} would be {result_size} bytes, over the {limit}-byte limit")
            if self._mode == _HEAD:
                described.results[index] = result_size
                return
            base = described.bases[index] if kind == OFS_DELTA else described.held_ids[described.ref_bases[index]]
            self._held_bytes += result_size
            if self._held_bytes > self._limits.max_described:
                limit = self._limits.max_described
                raise PackError(f"the pack's trees hold over {limit} bytes, too many to show before accepting")
            content = apply_small_delta(described.held[base], content, what)
            self._held_bytes -= self._size  # the instructions are let go
            kind = described.kinds[base]
            described.kinds[index] = kind
        if self._mode == _HASH:
            object_id = self._hasher.digest()
            self._hasher = None
        else:
            object_id = hashlib.sha1(b"%s %d\0" % (TYPE_NAMES[kind], len(content)) + content).digest()
            described.held[index] = content
            described.held_ids.setdefault(object_id, index)
        described.ids[index * ID_SIZE : (index + 1) * ID_SIZE] = object_id

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
        return self._describe()

    # -- a directory: described once the trailer matched, extracted once accepted --

    def _describe(self) -> Directory:
        described = self._described
        self._identify_deltas()
        described.index_ids()
        root = next((i for i, kind in enumerate(described.kinds) if kind == COMMIT and i in described.held), None)
        if root is None:
            raise PackError("the pack has neither a file nor a root object (type 1)")
        self._parse_root(described.held[root])

        def tree_of(object_id: bytes) -> bytes | None:
            index = described.find(object_id)
            if index is None or described.kinds[index] != TREE:
                return None
            return described.held[index]

        def blob_size(object_id: bytes, path: str) -> int | None:
            index = described.find(object_id)
            if index is not None and index in described.identified:
                return described.identified[index]
            if index is not None and described.kinds[index] == BLOB:
                return described.sizes[index]
            if index is None and described.blob_deltas:
                return None  # perhaps the result of a delta: known once extracted
            raise PackError(f"the file {shown(path)} has no blob {object_id.hex()} in the pack")

        self._entries = list(self._walk(tree_of, blob_size))
        self._needed = self._needed_objects()
        self._unpacked = sum(map(self._unpacked_size_of, self._needed))
        files = [entry for entry in self._entries if entry.kind == FILE]
        total = sum(entry.size or 0 for entry in files)
        self._state = _State.DESCRIBED
        return Directory(self._root_name, len(self._entries), len(files), total)

    def _unpacked_size_of(self, index: int) -> int:
        """What extraction stores for one object: its content, and for a delta what it builds."""
        described = self._described
        size = described.sizes[index]
        if _pack_kind(described, index) in _DELTAS:
            built = described.results.get(index)
            size += len(described.held[index]) if built is None else built
        return size

    def _needed_objects(self) -> list[int]:
        """The objects the offer needs, ascending: what extraction inflates, and nothing else.

        The trees, the root and the objects of every file the trees name, each with the
        chain of bases its deltas stand on. An object no tree names is never inflated:
        unless some file's size is unknown (a delta not identified), then all are.
        """
        described = self._described
        if any(entry.kind == FILE and entry.size is None for entry in self._entries):
            return list(range(len(described)))
        needed = set(described.held)
        for entry in self._entries:
            if entry.kind != FILE:
                continue
            index = described.find(entry.id)
            while index is not None and index not in needed:
                needed.add(index)
                if described.bases[index] >= 0:
                    index = described.bases[index]
                elif index in described.ref_bases:
                    index = described.find(described.ref_bases[index])
                else:
                    index = None
        return sorted(needed)

    def _parse_root(self, content: bytes) -> None:
        if len(content) > _MAX_ROOT_SIZE:
            raise PackError(f"the root object is {len(content)} bytes, over the {_MAX_ROOT_SIZE}-byte limit")
        null = content.find(b"\0")
        if null < 0:
            raise PackError("the root object has no NUL after the directory name")
        self._root_name = _decode_name(content[:null], "the directory name")
        tree_id = content[null + 1 : null + 1 + ID_SIZE]
        count = content[null + 1 + ID_SIZE :]
        if len(tree_id) != ID_SIZE or not count.isdigit() or len(count) > 20:
            raise PackError("the root object is not <name>\\0<tree id><count>")
        self._root_tree = tree_id

    def _extracted_events(self) -> Iterator[PackEvent]:
        """After acceptance: inflate every object to its declared size, resolve the deltas,
        then walk the trees again, now with every file's real size."""
        described, budget = self._described, self._unpacked
        self._spool = _Spool(self._limits.memory_spool, self._temp_dir)
        store = self._store = _ObjectStore(self._spool, self._limits)
        positions: dict[int, int] = {}  # an object's index in the pack -> in the store
        for index in self._needed:
            self._index = index
            positions[index] = len(store)
            self._inflate_spooled(store, index, positions, budget)
        described.held.clear()
        described.held_ids.clear()
        store.resolve(budget)
        store.index_ids()

        def tree_of(object_id: bytes) -> bytes | None:
            index = store.find(object_id)
            if index is None or store.kinds[index] != TREE:
                return None
            return store.spool.read(store.starts[index], store.lengths[index])

        def blob_size(object_id: bytes, path: str) -> int:
            index = store.find(object_id)
            if index is None or store.kinds[index] != BLOB:
                raise PackError(f"the file {shown(path)} has no blob {object_id.hex()} in the pack")
            return store.lengths[index]

        offered = iter(self._entries)
        for entry in self._walk(tree_of, blob_size):
            shown_entry = next(offered, None)
            if (
                shown_entry is None
                or (shown_entry.path, shown_entry.kind, shown_entry.id) != (entry.path, entry.kind, entry.id)
                or shown_entry.size not in (None, entry.size)
            ):
                raise PackError(f"{shown(entry.path)} is not what the offer described")
            yield entry
        if next(offered, None) is not None:
            raise PackError("the directory holds less than the offer described")
        yield PackEnd()

    def _inflate_spooled(self, store: _ObjectStore, index: int, positions: dict[int, int], budget: int) -> None:
        """One object from the compressed spool into the store: exactly its declared size."""
        described = self._described
        base = described.bases[index]
        base = positions[base] if base >= 0 else -1
        kind = _pack_kind(described, index)
        store.begin(described.offsets[index], kind, described.sizes[index], base, described.ref_bases.get(index))
        for piece in self._spooled_pieces(index):
            store.write(piece)
            if store.spool.size > budget:
                raise PackError(f"the pack's objects inflate past {budget} bytes, more than they declared")
        store.end()

    def _spooled_pieces(self, index: int) -> Iterator[bytes]:
        """An object's content inflated again from the compressed spool, held to its declared size."""
        raw, size = self._raw, self._described.sizes[index]
        inflater = zlib.decompressobj()
        position = self._described.data_starts[index]
        produced = 0
        pending = b""
        while not inflater.eof:
            if not pending:
                step = min(_INPUT_STEP, raw.size - position)
                if step <= 0:
                    raise PackError(f"object {index} is cut short in the spool")
                pending = raw.read(position, step)
                position += step
            output = inflater.decompress(pending, min(_OUTPUT_STEP, size - produced + 1))
            pending = inflater.unconsumed_tail
            if produced + len(output) > size:
                raise PackError(f"object {index} inflates to more than its declared {size} bytes")
            produced += len(output)
            yield output
        if produced != size:
            raise PackError(f"object {index} inflates to {produced} bytes, its header says {size}")

    def _identify_deltas(self) -> None:
        """Learn the Git id and size of the blobs that deltas build, in memory, within a budget.

        The trees name files by id, and a delta's id is the hash of what it builds, so
        this is the one way to show those files' sizes before the user decides. Every
        byte materialized counts against ``max_identified``; the deltas past it stay
        unknown (their files show no size) rather than make a small pack costly.
        """
        described = self._described
        children: dict[int, list[int]] = {}
        waiting: dict[bytes, list[int]] = {}
        for index, kind in enumerate(described.kinds):
            if kind == OFS_DELTA and index not in described.held:
                children.setdefault(described.bases[index], []).append(index)
            elif kind == REF_DELTA and index not in described.held:
                waiting.setdefault(described.ref_bases[index], []).append(index)
        if not children and not waiting:
            return
        budget = self._limits.max_identified

        def content_of(index: int) -> bytes:
            return b"".join(self._spooled_pieces(index))

        exhausted = False
        for root, kind in enumerate(described.kinds):
            if kind != BLOB or (root not in children and described.id_of(root) not in waiting):
                continue
            if described.sizes[root] > budget:
                exhausted = True
                continue
            budget -= described.sizes[root]
            stack = [(root, content_of(root))]
            while stack:
                node, content = stack.pop()
                for child in children.pop(node, []) + waiting.pop(described.id_of(node), []):
                    result_size = described.results[child]
                    # Instructions cost a Python step each where a copy costs one memcpy.
                    cost = _INSTRUCTION_WEIGHT * described.sizes[child] + result_size
                    if cost > budget:
                        exhausted = True
                        continue
                    budget -= cost
                    result = apply_small_delta(content, content_of(child), f"delta object {child}")
                    object_id = hashlib.sha1(b"blob %d\0" % result_size + result).digest()
                    described.ids[child * ID_SIZE : (child + 1) * ID_SIZE] = object_id
                    described.identified[child] = result_size
                    stack.append((child, result))
        if not exhausted:
            orphans = sum(map(len, children.values())) + sum(map(len, waiting.values()))
            if orphans:
                raise PackError(f"{orphans} delta object(s) refer to a base that is not in the pack")
        unknown = [index for index in described.results if index not in described.identified]
        described.blob_deltas = len(unknown)
        described.largest_delta = max((described.results[index] for index in unknown), default=0)

    def _walk(
        self, tree_of: Callable[[bytes], bytes | None], blob_size: Callable[[bytes, str], int | None]
    ) -> Iterator[TreeEntry]:
        """Every entry below the root, depth first, each directory before its content.

        Bounded however the trees reuse each other: at most `max_entries` entries and
        `max_tree_size` bytes of trees held at once (from the root down to the current
        directory).
        """
        limits = self._limits

        def tree(object_id: bytes, path: str, room: int) -> bytes:
            content = tree_of(object_id)
            if content is None:
                raise PackError(f"the directory {shown(path)} has no tree {object_id.hex()} in the pack")
            if len(content) > room:
                raise PackError(f"the trees down to {shown(path)} hold over {limits.max_tree_size} bytes")
            return content

        content = tree(self._root_tree, self._root_name, limits.max_tree_size)
        held = len(content)
        what = f"the tree of {shown(self._root_name)}"
        stack = [(self._root_name, _tree_entries(content, what), set(), held)]
        count = 0
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
                content = tree(object_id, path, limits.max_tree_size - held)
                held += len(content)
                yield TreeEntry(path, DIRECTORY, 0, False, object_id)
                entries = _tree_entries(content, f"the tree of {shown(path)}")
                stack.append((path, entries, set(), len(content)))
            elif mode in (MODE_FILE, MODE_EXECUTABLE):
                yield TreeEntry(path, FILE, blob_size(object_id, path), mode == MODE_EXECUTABLE, object_id)
            elif mode == MODE_SYMLINK:
                raise PackError(f"{shown(path)} is a symbolic link, which is not supported")
            elif mode == MODE_GITLINK:
                raise PackError(f"{shown(path)} is a Git submodule link, which is not supported")
            else:
                text = mode.decode("ascii", "replace")
                raise PackError(f"{shown(path)} has the unknown mode {shown(text)}")


def _pack_kind(described: _Described, index: int) -> int:
    """The type an object had in the pack (a tree delta was given its base's type when described)."""
    if described.bases[index] >= 0:
        return OFS_DELTA
    if index in described.ref_bases:
        return REF_DELTA
    return described.kinds[index]
