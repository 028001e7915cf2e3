"""The sender's side of the disk: what to offer, and reading each file exactly once.

`scan` turns the command-line paths into an `Offer` before anything is sent, so every
problem the user can fix (a typo, an unreadable file, an unsendable name) is reported
up front. `Selection.open` then streams one file, hashing it as it goes, and notices
a file that changes while it is being sent.
"""

from __future__ import annotations

import errno
import os
import select
import stat
from typing import Iterable, Mapping

import attrs
import blake3

from peer.offer import DIRECTORY, FILE, MAX_OFFER_BYTES, Offer, OfferEntry, format_size, name_problem, os_reason

__all__ = ["FileReader", "Selection", "SourceError", "StreamReader", "scan", "stdin_selection", "text_selection"]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # never block on a FIFO swapped in after the scan
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)


class SourceError(Exception):
    """A one-line reason why the selected paths cannot be sent (or stopped being sendable)."""


def kind_of_mode(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


@attrs.frozen
class _Origin:
    """Where an offered file lives on this machine, and how to name it in messages."""

    path: str
    display: str
    follow_symlinks: bool  # only for a symlink the user named on the command line


@attrs.frozen
class Selection:
    """The result of `scan`: the offer to send, what was left out, and the way back to disk."""

    offer: Offer
    warnings: tuple[str, ...]
    origins: Mapping[str, _Origin] = attrs.field(repr=False)

    def open(self, entry: OfferEntry, *, start: int = 0, chunk: int | None = None) -> FileReader | StreamReader:
        """Start reading one offered file (use it as a context manager).

        `start` skips what the receiver already has (resume) without reading it; with
        `chunk`, the reader also hashes each `chunk` bytes on their own (resume CHECKs).
        """
        origin = self.origins[entry.path]
        if isinstance(origin, _StreamOrigin):
            return StreamReader(origin.fd, origin.display)
        return FileReader(
            origin.path, entry.size, origin.display, follow_symlinks=origin.follow_symlinks, start=start, chunk=chunk
        )


@attrs.frozen
class _StreamOrigin:
    """An offered file that is a stream (stdin): read to its end, size unknown until then."""

    fd: int
    display: str


def stdin_selection(name: str = "stdin", fd: int = 0) -> Selection:
    """Offer what arrives on `fd` (standard input) as one file called `name`, size unknown."""
    problem = name_problem(name)
    if problem or "/" in name:
        raise SourceError(f"cannot offer standard input as {name!r}: the name {problem or 'has a slash'}")
    offer = Offer([OfferEntry(FILE, name, None)])
    return Selection(offer, (), {name: _StreamOrigin(fd, "standard input")})


def text_selection(text: str) -> Selection:
    """A text message to send instead of files (the receiver prints it)."""
    try:
        offer = Offer((), text)
    except ValueError as exc:
        raise SourceError(f"cannot send this text: {exc}") from None
    return Selection(offer, (), {})


class _Builder:
    def __init__(self, *, skip_unreadable: bool = False) -> None:
        self.entries: list[OfferEntry] = []
        self.origins: dict[str, _Origin] = {}
        self.warnings: list[str] = []
        self.skip_unreadable = skip_unreadable
        self.skipped: list[str] = []
        """Offered names left out as unreadable (--skip-unreadable); the offer lists them."""

    def unreadable(self, name: str, display: str, exc: OSError, *, inside: bool) -> None:
        """A path we cannot read: the end of the scan, unless asked to leave it out (only
        inside a directory: a path named on the command line is always wanted)."""
        if not (inside and self.skip_unreadable):
            raise SourceError(f"cannot read {display}: {os_reason(exc)}")
        self.skipped.append(name)
        self.warnings.append(f"skipped {display}: {os_reason(exc)}")

    def add_directory(self, name: str) -> None:
        self.entries.append(OfferEntry(DIRECTORY, name))

    def add_file(self, path: str, name: str, display: str, info: os.stat_result, *, follow: bool) -> None:
        # Open once now so that an unreadable file stops us before the handshake,
        # not halfway through the transfer.
        flags = os.O_RDONLY | _CLOEXEC | _NONBLOCK | _BINARY | (0 if follow else _NOFOLLOW)
        try:
            os.close(os.open(path, flags))
        except OSError as exc:
            self.unreadable(name, display, exc, inside=not follow)
            return
        executable = bool(info.st_mode & stat.S_IXUSR)
        self.entries.append(OfferEntry(FILE, name, info.st_size, executable, file_id(info)))
        self.origins[name] = _Origin(path, display, follow)


def file_id(info: os.stat_result) -> str:
    """A short name for this version of a file, for resume: device, inode, size and mtime.

    Like rsync's quick check, a file rewritten in place that keeps its size and gets its
    old modification time back is not noticed; anything else (an editor's save, a copy, a
    touch) changes it. Hashed, so the receiver learns nothing of the sender's disk.
    """
    text = f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"
    return blake3.blake3(text.encode()).hexdigest()[:32]


def _check_name(name: str, display: str) -> None:
    problem = name_problem(name)
    if problem:
        raise SourceError(f"cannot send {display}: its name {problem}")


def scan(paths: Iterable[str | os.PathLike[str]], *, skip_unreadable: bool = False) -> Selection:
    """Build the offer for `paths` (files and directories), or raise SourceError.

    Each path is offered under its own name (``photos/`` becomes ``photos/...``).
    Symbolic links are followed when named on the command line and skipped, with a
    warning, inside directories (which also rules out loops); FIFOs, sockets and
    devices inside directories are skipped the same way. With `skip_unreadable`, so are
    the files and directories inside them that cannot be read; the offer names them.
    """
    builder = _Builder(skip_unreadable=skip_unreadable)
    top_names: dict[str, str] = {}
    for given in paths:
        display = os.fspath(given)
        absolute = os.path.abspath(display)
        name = os.path.basename(absolute)
        if not name:
            raise SourceError(f"cannot send {display}: it has no name to offer")
        if name in top_names:
            raise SourceError(f"cannot send two items named {name!r}: {top_names[name]} and {display}")
        top_names[name] = display
        try:
            info = os.stat(absolute)
        except FileNotFoundError:
            if os.path.lexists(absolute):
                raise SourceError(f"cannot read {display}: it is a broken symbolic link") from None
            raise SourceError(f"cannot read {display}: no such file or directory") from None
        except OSError as exc:
            raise SourceError(f"cannot read {display}: {os_reason(exc)}") from None
        _check_name(name, display)
        if stat.S_ISDIR(info.st_mode):
            _walk(builder, absolute, name, display)
        elif stat.S_ISREG(info.st_mode):
            builder.add_file(absolute, name, display, info, follow=True)
        else:
            raise SourceError(f"cannot send {display}: it is {kind_of_mode(info.st_mode)}")
    if not top_names:
        raise SourceError("nothing to send")
    try:
        offer = Offer(builder.entries, skipped=tuple(builder.skipped))
    except ValueError as exc:
        raise SourceError(f"cannot send this selection: {exc}") from None
    size = len(offer.to_json())
    if size > MAX_OFFER_BYTES:
        raise SourceError(
            f"cannot send this selection: its list of {len(offer.entries)} names takes {format_size(size)}, "
            f"over the {format_size(MAX_OFFER_BYTES)} limit; send fewer files at once"
        )
    return Selection(offer, tuple(builder.warnings), builder.origins)


def _walk(builder: _Builder, top_path: str, top_name: str, top_display: str) -> None:
    """Add a directory tree, each directory before what it contains, in name order."""
    pending = [(top_path, top_name, top_display)]
    while pending:
        path, name, display = pending.pop()
        builder.add_directory(name)
        try:
            with os.scandir(path) as listing:
                children = sorted(listing, key=lambda child: child.name)
        except OSError as exc:
            builder.unreadable(name, display, exc, inside="/" in name)
            builder.entries.pop()  # its entry, just added: nothing of it is offered
            continue
        subdirectories = []
        for child in children:
            child_name = f"{name}/{child.name}"
            child_display = os.path.join(display, child.name)
            try:
                if child.is_symlink():
                    builder.warnings.append(f"skipped {child_display}: it is a symbolic link")
                    continue
                info = child.stat(follow_symlinks=False)
            except OSError as exc:
                builder.unreadable(child_name, child_display, exc, inside=True)
                continue
            if stat.S_ISDIR(info.st_mode):
                _check_name(child_name, child_display)
                subdirectories.append((child.path, child_name, child_display))
            elif stat.S_ISREG(info.st_mode):
                _check_name(child_name, child_display)
                builder.add_file(child.path, child_name, child_display, info, follow=False)
            else:
                builder.warnings.append(f"skipped {child_display}: it is {kind_of_mode(info.st_mode)}")
        pending.extend(reversed(subdirectories))


class FileReader:
    """One offered file being sent: read once, hashed while read, held to its offered size.

    A file that is not the size it was at scan time, that shrinks or grows while it
    is read, or whose modification time moves, raises SourceError: the receiver would
    otherwise get a verified copy of something that never existed on disk.
    """

    def __init__(
        self,
        path: str,
        size: int,
        display: str,
        *,
        follow_symlinks: bool = True,
        start: int = 0,
        chunk: int | None = None,
    ) -> None:
        self.display = display
        self.size = size
        if not 0 <= start <= size:
            raise ValueError(f"cannot start {display} at byte {start}")
        flags = os.O_RDONLY | _CLOEXEC | _NONBLOCK | _BINARY | (0 if follow_symlinks else _NOFOLLOW)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP and not follow_symlinks:
                raise SourceError(f"cannot read {display}: it was replaced by a symbolic link") from None
            raise SourceError(f"cannot read {display}: {os_reason(exc)}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SourceError(f"cannot send {display}: it is no longer a regular file")
            if info.st_size != size:
                raise SourceError(f"{display} changed after it was offered: {size} bytes then, {info.st_size} now")
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, start, 0, os.POSIX_FADV_SEQUENTIAL)
            if start:
                os.lseek(fd, start, os.SEEK_SET)  # resume: what is before is never read
        except BaseException:
            os.close(fd)
            raise
        self._mtime = info.st_mtime_ns
        self._file = open(fd, "rb", buffering=0)
        self._hasher = blake3.blake3()
        self._remaining = size - start
        self._chunk = chunk
        self._position = start

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def remaining(self) -> int:
        return self._remaining

    @property
    def position(self) -> int:
        """The offset in the file of the next byte to read."""
        return self._position

    def readinto(self, buffer: memoryview) -> int:
        """Fill the start of `buffer` with the next bytes (never past the offered size)."""
        want = min(len(buffer), self._remaining)
        if self._chunk:
            want = min(want, self._chunk - self._position % self._chunk)  # never across a chunk
        if want == 0:
            return 0
        target = buffer[:want]
        try:
            count = self._file.readinto(target)
        except OSError as exc:
            raise SourceError(f"cannot read {self.display}: {os_reason(exc)}") from None
        if not count:
            raise SourceError(f"{self.display} shrank while it was being sent")
        self._hasher.update(target[:count])
        self._remaining -= count
        self._position += count
        return count

    def chunk_digest(self) -> bytes:
        """With `chunk`: the blake3 of the chunk just read; the next one starts afresh."""
        if not self._chunk or self._position % self._chunk:
            raise RuntimeError(f"{self.display}: not at the end of a chunk")
        digest = self._hasher.digest()
        self._hasher = blake3.blake3()
        return digest

    def digest(self) -> bytes:
        """The blake3 of everything read, once the whole file is read and found unchanged.

        With `chunk`, only of what was read since the last `chunk_digest()` (the tail)."""
        if self._remaining:
            raise RuntimeError(f"{self.display}: {self._remaining} bytes not read yet")
        try:
            extra = self._file.read(1)
            info = os.fstat(self._file.fileno())
        except OSError as exc:
            raise SourceError(f"cannot read {self.display}: {os_reason(exc)}") from None
        if extra:
            raise SourceError(f"{self.display} grew while it was being sent")
        if info.st_size != self.size or info.st_mtime_ns != self._mtime:
            raise SourceError(f"{self.display} changed while it was being sent")
        return self._hasher.digest()


class StreamReader:
    """Standard input (or any pipe) being sent: read to its end, hashed while read.

    `readinto` may block until data comes, so drivers call it from a worker thread. It
    gathers up to a whole buffer while data is already waiting, and returns what it has
    as soon as the pipe runs dry, so a slow producer's bytes are not held back.
    """

    size = None

    def __init__(self, fd: int, display: str) -> None:
        self.display = display
        self._fd = fd
        self._hasher = blake3.blake3()
        self.read_bytes = 0
        self._ended = False

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """The descriptor is the caller's (stdin): left open."""

    @property
    def remaining(self) -> None:
        return None

    def readinto(self, buffer: memoryview) -> int:
        """Fill the start of `buffer`; 0 only at the end of the stream."""
        filled = 0
        while filled < len(buffer) and not self._ended:
            if filled and not _readable_now(self._fd):
                break
            try:
                count = os.readv(self._fd, [buffer[filled:]])
            except BlockingIOError:
                select.select([self._fd], [], [])
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                raise SourceError(f"cannot read {self.display}: {os_reason(exc)}") from None
            if count == 0:
                self._ended = True
                break
            filled += count
        self._hasher.update(buffer[:filled])
        self.read_bytes += filled
        return filled

    def digest(self) -> bytes:
        if not self._ended:
            raise RuntimeError(f"{self.display} is not read to its end yet")
        return self._hasher.digest()


def _readable_now(fd: int) -> bool:
    try:
        ready, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(ready)
