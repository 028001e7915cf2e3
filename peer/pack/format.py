"""The Git PACK v2 format as bob uses it: constants, object headers, names, limits, events.

Pack layout: ``PACK``, u32 version 2, u32 object count, the objects, then the SHA-1 of
everything before it. Each object is a header (type in bits 4-6 of the first byte, the
inflated size as a varint, low bits first), for deltas a reference to the base, then
the zlib stream of its content (docs/protocol.md §8).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Iterator, Union

import attrs

from peer.offer import DIRECTORY, FILE, MAX_ENTRIES, OfferEntry, name_problem, shown

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



class PackError(Exception):
    """The received pack is malformed, corrupt or hostile; the message is one line."""


@attrs.frozen
class PackLimits:
    """Bounds on what a received pack may make us hold, so a small hostile pack cannot fill
    the disk or the memory (zip bombs, delta bombs, tree bombs) — above all not before
    the user has said yes (issue 16).

    Before the decision a directory pack costs its own compressed bytes (spooled as they
    arrive, linear in traffic), at most ``max_described`` bytes of memory for its trees
    and at most ``max_identified`` bytes rebuilt in memory to learn what its deltas are. Only after acceptance are objects inflated to disk, each exactly to the size
    its header declares, all of them together to `PackReader.unpacked_size`.
    """

    max_objects: int = 4_000_000  # about 60 bytes of memory each while receiving
    max_object_size: int = 1 << 40  # any one object of a directory, inflated
    max_tree_size: int = 32 * 1024 * 1024  # the trees from the root to one directory, together
    max_described: int = 32 * 1024 * 1024  # every tree, root and tree delta, held before the decision
    max_identified: int = 128 * 1024 * 1024  # blobs and deltas rebuilt in memory to identify deltas, before it
    max_entries: int = MAX_ENTRIES  # the directory itself and everything in it (as an Offer)
    max_pack_size: int = 1 << 44  # compressed bytes spooled before the decision (also free space)
    memory_spool: int = 16 * 1024 * 1024  # spooled bytes kept in memory before using a file


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
    """The pack carries a directory; it arrived whole, its trailer matched, its trees are read.

    Nothing of its files is stored yet: ask the user before asking the reader for more. The
    counts cover the TreeEntry events that follow (the directory itself excluded);
    `total_size` adds up the sizes known before extraction (not those of deltas).
    """

    name: str
    entry_count: int
    file_count: int
    total_size: int


@attrs.frozen
class TreeEntry:
    """One item of the directory, parents before children; `path` starts with its name.

    For a file, stream its content with `PackReader.iter_blob(entry.id)`. Before the
    user accepts, a file whose content is a delta has the size None (unknown).
    """

    path: str
    kind: str  # offer.FILE or offer.DIRECTORY
    size: int | None
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
