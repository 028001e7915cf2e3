"""The receiver's resume journal: which chunks of a partial file are verified and durable.

One small text file beside each resumable partial file, ``NAME.<key>.peer-journal`` next to
``NAME.<key>.peer-part``, where the key names the offered version of the file (its path,
size and the sender's file id). Lines:

    peer-relay journal 1 {"path": ..., "size": ..., "id": ..., "chunk": 16777216}
    chunk 0 <blake3 of bytes 0..16 MiB, hex>
    chunk 1 <...>
    done <size> <mtime_ns> <inode>          (the file got its final name)

A chunk line is appended only after the sender's CHECK matched and the part file was
flushed to disk (fdatasync), so every journaled chunk is on disk and verified. Lines are
appended with single writes; a torn last line (a kill mid-write) is ignored on reading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs
import blake3

__all__ = ["JOURNAL_SUFFIX", "Journal", "journal_key"]

JOURNAL_SUFFIX = ".peer-journal"
MAGIC = "peer-relay journal 1 "
MAX_JOURNAL_BYTES = 64 * 1024 * 1024  # 16 MiB chunks of a 2^63-byte file need far less... almost
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def journal_key(path: str, size: int, file_id: str) -> str:
    """16 hex digits naming one offered version of a file (its partial file and journal)."""
    text = json.dumps([path, size, file_id], ensure_ascii=False)
    return blake3.blake3(text.encode("utf-8")).hexdigest()[:16]


@attrs.define
class Journal:
    """An open journal: the verified chunk digests so far, appended to as chunks are checked."""

    path: Path
    header: dict
    chunks: list[bytes] = attrs.field(factory=list)
    done: tuple[int, int, int] | None = None
    _fd: int | None = attrs.field(default=None, repr=False)

    @classmethod
    def create(cls, path: Path, header: dict) -> Journal:
        """A new, empty journal (an old one at `path` is replaced)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | _CLOEXEC | _NOFOLLOW, 0o600)
        journal = cls(path, dict(header), fd=fd)
        journal._append(MAGIC + json.dumps(header, ensure_ascii=False, sort_keys=True))
        return journal

    @classmethod
    def load(cls, path: Path, header: dict) -> Journal | None:
        """The journal at `path` if it exists and is for exactly `header`; else None. Not opened
        for appending: see `reopen`."""
        try:
            fd = os.open(path, os.O_RDONLY | _CLOEXEC | _NOFOLLOW)
        except OSError:
            return None
        try:
            data = os.read(fd, MAX_JOURNAL_BYTES)
        except OSError:
            return None
        finally:
            os.close(fd)
        lines = data.split(b"\n")
        lines.pop()  # after the last newline: empty, or a torn line
        if not lines or not lines[0].startswith(MAGIC.encode()):
            return None
        try:
            found = json.loads(lines[0][len(MAGIC) :].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        if found != header:
            return None
        journal = cls(path, dict(header))
        for line in lines[1:]:
            words = line.split(b" ")
            if len(words) == 3 and words[0] == b"chunk" and words[1] == str(len(journal.chunks)).encode():
                try:
                    digest = bytes.fromhex(words[2].decode("ascii"))
                except ValueError:
                    break
                if len(digest) != 32:
                    break
                journal.chunks.append(digest)
            elif len(words) == 4 and words[0] == b"done" and all(word.isdigit() for word in words[1:]):
                journal.done = (int(words[1]), int(words[2]), int(words[3]))
                break
            else:
                break
        return journal

    def reopen(self) -> None:
        """Open a loaded journal for appending."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | _CLOEXEC | _NOFOLLOW)

    def _append(self, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to {self.path}")

    def add_chunk(self, digest: bytes) -> None:
        """Record the next chunk as verified (its bytes must already be on disk)."""
        self._append(f"chunk {len(self.chunks)} {bytes(digest).hex()}")
        self.chunks.append(bytes(digest))

    def mark_done(self, info: os.stat_result) -> None:
        """The file is complete under its final name, as `info` describes it."""
        self._append(f"done {info.st_size} {info.st_mtime_ns} {info.st_ino}")
        self.done = (info.st_size, info.st_mtime_ns, info.st_ino)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
