"""Encoding bob's pack: one file, or a directory, as record plaintexts cut as bob needs them.

bob's single-file receiver depends on record boundaries (docs/protocol.md §8.2); its
directory receiver parses the whole pack regardless of records.
"""

from __future__ import annotations

import hashlib
import os
import stat
import zlib
from typing import Iterable, Iterator

import attrs

from peer.offer import MAX_FILE_SIZE, name_problem, os_reason, shown
from peer.records import MAX_RECORD_SIZE
from peer.source import SourceError, kind_of_mode

from .format import (
    _READ_STEP,
    BLOB,
    COMMIT,
    DEFAULT_LEVEL,
    HEADER,
    MAGIC,
    MODE_DIRECTORY,
    MODE_FILE,
    TAG,
    TREE,
    VERSION,
    _git_id,
    _single_component_problem,
    object_header,
)

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)

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
    and a name that `peer.offer.name_problem` refuses raises SourceError. Every
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
