"""The receiver's side of the disk: every offered name is checked before anything is written.

Names come from the other peer and are never trusted. `Destination.plan` checks the
whole offer against the destination directory first (unsafe names, escapes through
existing symlinks, conflicts, free space). Each file is then written to a private
temporary name beside its target and only gets its real name after its blake3 matches
the sender's, so a name that appears is always a complete, verified file.

How one file is written and verified is `peer.partfile`'s; this module decides where.

Durability is paid once per batch of files, not once per file: verified files wait under
their temporary names until the batch is full or the transfer ends; then one flush makes
their bytes durable, they get their names, and a second flush makes the names durable
before the receiver acknowledges (see docs/transfer.md, "What is durable when").

Threat model: a hostile sender. A local user racing us inside the destination
directory (swapping directories for symlinks between our checks and our writes) is
out of scope; we re-check containment before the first file of each directory of a
transfer but do not use dir fds.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Iterator

import blake3

from peer import durable
from peer.journal import JOURNAL_SUFFIX, MAGIC as JOURNAL_MAGIC, Journal, journal_key
from peer.offer import (
    MAX_COMPONENT_BYTES,
    Offer,
    OfferEntry,
    format_size,
    name_problem,
    os_reason,
    same_name_key,
    shown,
    windows_problem,
)
from peer.partfile import (
    PART_SUFFIX,
    DestinationError,
    IntegrityError,
    PartFile,
    StreamPart,
    cut_name,
    link_or_rename,
    part_name,
)
from peer.transfer import RESUME_CHUNK

__all__ = [
    "Destination",
    "DestinationError",  # defined in peer.partfile, and part of this module's interface
    "IntegrityError",
    "StreamDestination",
    "numbered_name",
]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)

_KEY = re.compile(r"[0-9a-f]{16}")


def _journal_header(path: Path) -> dict:
    """The header of the journal at `path` ({} if there is none, or it is not one)."""
    try:
        fd = os.open(path, os.O_RDONLY | _CLOEXEC | _NOFOLLOW)
    except OSError:
        return {}
    try:
        line = os.read(fd, 64 * 1024).partition(b"\n")[0]
    except OSError:
        return {}
    finally:
        os.close(fd)
    if not line.startswith(JOURNAL_MAGIC.encode()):
        return {}
    try:
        header = json.loads(line[len(JOURNAL_MAGIC) :].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return header if isinstance(header, dict) else {}


def _tail_matches(part: Path, offset: int, digest: bytes) -> bool:
    """Whether the last verified chunk before `offset` is still what the journal says."""
    start = (offset - 1) // RESUME_CHUNK * RESUME_CHUNK
    try:
        with open(part, "rb", buffering=0) as file:
            if os.fstat(file.fileno()).st_size < offset:
                return False
            file.seek(start)
            data = file.read(offset - start)
    except OSError:
        return False
    return len(data) == offset - start and hmac.compare_digest(blake3.blake3(data).digest(), digest)


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    Setting it to read it back is process-wide, so another thread could create a file
    with the wrong mode in between; Linux exposes it in /proc instead.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


SYNC_BATCH_BYTES = 256 * 1024 * 1024
"""Verified files wait, unnamed, until this many of their bytes are pending (or the transfer
ends): one flush for them all. The number of flushes grows with the bytes, never with the
number of files."""

MAX_RENAME_TRIES = 10_000
"""How far ``--rename`` counts (``name (1)`` ... ) before giving up on finding a free name."""


def numbered_name(name: str, number: int, *, directory: bool = False) -> str:
    """``report.pdf`` -> ``report (2).pdf``; a directory or a dot-file keeps no extension.

    ``.tar.*`` stays whole (``logs (1).tar.gz``), and the stem is cut so the result stays
    within one 255-byte path component.
    """
    stem, extension = name, ""
    if not directory:
        dot = name.rfind(".")
        if dot > 0:
            stem, extension = name[:dot], name[dot:]
            if stem.lower().endswith(".tar") and len(stem) > 4:
                stem, extension = stem[:-4], stem[-4:] + extension
    suffix = f" ({number}){extension}"
    room = MAX_COMPONENT_BYTES - len(suffix.encode("utf-8"))
    if room < 1:  # an absurdly long extension: number the whole name instead
        stem, suffix = name, f" ({number})"
        room = MAX_COMPONENT_BYTES - len(suffix.encode("utf-8"))
    stem = stem.encode("utf-8")[:room].decode("utf-8", "ignore")
    return stem + suffix


class Destination:
    """Where a receiver puts an offer: `plan`, then per file `open_part` / `commit`, then `finish`.

    On any failure call `abort`: it removes every temporary file and every directory
    this object created that is still empty. Files already committed stay; each is
    complete and verified.

    What happens to a name that already exists is the user's choice: refused (the
    default), replaced (`overwrite`), or avoided (`rename`): the item the sender named
    gets the first free name ``name (1).ext``, ``name (2).ext``... chosen while planning
    and chosen again, atomically, if that name is taken by the time the item is written.
    An offered top-level directory that exists is refused too unless the user asked to
    `merge` (or to `overwrite`): otherwise a sender offering ``.git`` could add a hook to
    the checkout the receiver stands in. Files get no executable bit unless `keep_modes`.

    Two offered names that the destination's file system would take for one (``Docs``
    and ``docs`` where case is ignored; `case_insensitive` is probed when None) are
    refused; so are names Windows reads as devices or streams (`windows_names`, on by
    default on Windows and wherever case is ignored: a FAT, NTFS or SMB mount on Linux
    drops trailing dots and refuses ``a:b`` just as Windows would).
    """

    as_file = False
    """Whether the offer's one file is saved under a name of the user's (see peer/output.py)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        rename: bool = False,
        merge: bool = False,
        keep_modes: bool = False,
        resume: bool = True,
        case_insensitive: bool | None = None,
        windows_names: bool | None = None,
        single_name: str | None = None,
    ) -> None:
        if overwrite and rename:
            raise ValueError("choose overwrite or rename, not both")
        self.root = Path(root)
        self.overwrite = overwrite
        self.rename = rename
        self.merge = merge or overwrite
        """Write into top-level directories that exist already (files there stay refused
        unless `overwrite`)."""
        self.keep_modes = keep_modes
        self._case_insensitive = case_insensitive
        self._windows_names = windows_names
        self.supports_resume = resume
        """Offer the resume feature: keep verified partial files, and continue them later."""
        self._resuming = False
        self._resume_state: dict[str, tuple[int, Journal, bool]] = {}
        """Offered path -> (bytes already verified here, its journal, whether it is complete)."""
        self._resume_tops: set[str] | None = None
        """Top-level directories holding this offer's own journals (see _resumes_into)."""
        self._finished_journals: list[Journal] = []
        self._umask = _current_umask()
        self._real_root: str | None = None
        self._planned: dict[str, Path] = {}
        self._entries: dict[str, OfferEntry] = {}
        self._directories: list[OfferEntry] = []
        self._open: dict[str, PartFile] = {}
        self._committed: set[str] = set()
        self._created: list[Path] = []
        self._touched: set[Path] = set()
        self._ready: set[Path] = set()
        """Directories made or found, and checked to lie inside the root, in this transfer."""
        self._unsynced: list[PartFile] = []
        """Verified and closed files waiting for their batch's flush before they are named."""
        self._unsynced_bytes = 0
        self._local_top: dict[str, str] = {}
        """Offered top-level name -> the name it gets here (differs only with `rename`)."""
        self._claimed_tops: set[str] = set()
        self._taken_tops: set[str] = set()
        """Every offered top-level name and every name chosen for one (`rename`)."""
        self._inside_cache: dict[Path, bool] = {}
        self._leftovers: dict[Path, dict[str, list[str]]] = {}
        """Directory -> cut name -> partial-file and journal names found there (resume)."""
        self.single_name = single_name
        """The name (in `root`) for the offer's file when it offers one file and nothing else:
        ``peer recv -o NEWNAME``, as magic-wormhole users expect; ignored for other offers."""
        self.kept_partial = False
        """After `abort`: whether verified partial work was kept for a rerun to resume."""

    @property
    def renamed(self) -> dict[str, str]:
        """The top-level items saved under another name: offered name -> name used here."""
        return {offered: local for offered, local in self._local_top.items()
                if offered != local and local != self.single_name}

    # --- planning ----------------------------------------------------------------------

    def plan(self, offer: Offer, *, resume: bool = False) -> list[Path]:
        """Check the whole offer against the disk, writing nothing; the final path per entry.

        Raises DestinationError for an unsafe name, a name that would land outside the
        destination (through an existing symlink), an existing file when neither
        overwriting nor renaming, a file where a directory must go (or the reverse), or
        too little space.
        """
        try:
            info = os.stat(self.root)
        except OSError as exc:
            raise DestinationError(f"cannot use {self.root} as the destination: {os_reason(exc)}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise DestinationError(f"cannot use {self.root} as the destination: not a directory")
        self._real_root = os.path.realpath(self.root)
        self._inside_cache = {}
        for entry in offer.entries:
            problem = name_problem(entry.path)
            if problem is None and self.windows_names():
                problem = windows_problem(entry.path)
            if problem:
                raise DestinationError(f"refusing the name {shown(entry.path)}: it {problem}")
        self._refuse_collisions(offer.entries)
        self._local_top = self._choose_top_names(offer.entries)
        self._resuming = resume and self.supports_resume
        self._resume_state = self._find_resumable(offer) if self._resuming else {}
        self._resume_tops = None
        planned: dict[str, Path] = {}
        for entry in offer.entries:
            planned[entry.path] = self._check_entry(entry)
        self._inside_cache = {}  # from here on, containment is checked afresh before each write
        free = shutil.disk_usage(self.root).free
        if offer.total_bytes > free:
            raise DestinationError(
                f"not enough space in {self.root}: {format_size(offer.total_bytes)} offered, "
                f"{format_size(free)} free"
            )
        self._planned = planned
        self._entries = {entry.path: entry for entry in offer.entries}
        self._directories = [entry for entry in offer.entries if entry.is_directory]
        return [planned[entry.path] for entry in offer.entries]

    # --- resume -------------------------------------------------------------------------

    @staticmethod
    def _resumable(entry: OfferEntry) -> bool:
        return entry.is_file and entry.size is not None and entry.file_id is not None

    def _resume_paths(self, entry: OfferEntry) -> tuple[Path, Path, dict]:
        """The deterministic partial file and journal of this version of `entry`, and the
        journal's header."""
        final = self._target(entry.path)
        key = journal_key(entry.path, entry.size, entry.file_id)
        base = cut_name(final.name)
        header = {"path": entry.path, "size": entry.size, "id": entry.file_id, "chunk": RESUME_CHUNK}
        return final.with_name(f"{base}.{key}{PART_SUFFIX}"), final.with_name(f"{base}.{key}{JOURNAL_SUFFIX}"), header

    def _find_resumable(self, offer: Offer) -> dict[str, tuple[int, Journal, bool]]:
        """What earlier attempts of this offer left here: verified chunks, or complete files.

        Only the last journaled chunk is read back and hashed again (16 MiB at most), which
        catches a partial file that was cut or changed here without re-reading the rest.
        """
        found = {}
        for entry in offer.entries:
            if not self._resumable(entry):
                continue
            part, journal_path, header = self._resume_paths(entry)
            journal = Journal.load(journal_path, header)
            if journal is None:
                continue
            if journal.done is not None:
                try:
                    info = os.stat(self._target(entry.path), follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode) and (info.st_size, info.st_mtime_ns, info.st_ino) == journal.done:
                    found[entry.path] = (entry.size, journal, True)
                continue
            offset = min(len(journal.chunks) * RESUME_CHUNK, entry.size)
            if offset and _tail_matches(part, offset, journal.chunks[-1]):
                found[entry.path] = (offset, journal, False)
        return found

    def resume_points(self, offer: Offer) -> dict[int, int]:
        """For the ANSWER: offer entry index -> bytes already here (after `plan(resume=True)`)."""
        return {
            index: self._resume_state[entry.path][0]
            for index, entry in enumerate(offer.entries)
            if entry.path in self._resume_state
        }

    def _remove_stale(self, entry: OfferEntry, keep: Path) -> None:
        """Remove what attempts at *other* versions of this very file left beside it: the
        source changed since, so their bytes can never be resumed.

        A leftover is removed only when its journal names this offered path and its key is
        that journal's own: what other names left (another transfer's partial files, or a
        long name cut to the same first bytes) is never touched, whatever the sender offers.
        """
        final = self._planned[entry.path]
        own_key = keep.name[: -len(PART_SUFFIX)].rsplit(".", 1)[1]
        base = cut_name(final.name)
        for key in self._leftover_keys(final.parent, base):
            if key == own_key:
                continue
            journal = final.with_name(f"{base}.{key}{JOURNAL_SUFFIX}")
            header = _journal_header(journal)
            try:
                proven = header["path"] == entry.path and journal_key(header["path"], header["size"], header["id"]) == key
            except (KeyError, TypeError):
                proven = False
            if not proven:
                continue
            for leftover in (final.with_name(f"{base}.{key}{PART_SUFFIX}"), journal):
                try:
                    os.unlink(leftover)
                except OSError:
                    pass

    def _leftover_keys(self, directory: Path, base: str) -> list[str]:
        """The keys of the partial files and journals named ``base.<key>...`` in `directory`,
        which is listed once per transfer (not once per file: 20,000 files in one directory
        would make that quadratic)."""
        found = self._leftovers.get(directory)
        if found is None:
            found = self._leftovers[directory] = {}
            try:
                with os.scandir(directory) as items:
                    for item in items:
                        for suffix in (PART_SUFFIX, JOURNAL_SUFFIX):
                            if item.name.endswith(suffix):
                                stem, dot, key = item.name[: -len(suffix)].rpartition(".")
                                if dot and _KEY.fullmatch(key):
                                    keys = found.setdefault(stem, [])
                                    if key not in keys:
                                        keys.append(key)
            except OSError:
                pass
        return found.get(base, [])

    def _open_resumable(self, entry: OfferEntry, final: Path) -> PartFile:
        part_path, journal_path, header = self._resume_paths(entry)
        self._remove_stale(entry, part_path)
        offset, journal, complete = self._resume_state.get(entry.path, (0, None, False))
        if complete:
            return PartFile(entry, final, part_path, None, journal=journal, start=entry.size)
        flags = os.O_WRONLY | _CLOEXEC | _NOFOLLOW | _BINARY
        try:
            if offset:
                fd = os.open(part_path, flags)
                try:
                    os.ftruncate(fd, offset)  # drop what came after the last verified chunk
                    os.lseek(fd, offset, os.SEEK_SET)
                    journal.reopen()
                except BaseException:
                    os.close(fd)
                    raise
            else:
                own_key = part_path.name[: -len(PART_SUFFIX)].rsplit(".", 1)[1]
                if own_key in self._leftover_keys(final.parent, cut_name(final.name)):
                    for leftover in (part_path, journal_path):  # an attempt that verified nothing
                        try:
                            os.unlink(leftover)
                        except FileNotFoundError:
                            pass
                fd = os.open(part_path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                return PartFile(entry, final, part_path, fd, new_journal=(journal_path, header))
        except OSError as exc:
            raise DestinationError(f"cannot write {entry.path}: {os_reason(exc)}") from None
        return PartFile(entry, final, part_path, fd, journal=journal, start=offset)

    def check(self, part: PartFile, digest: bytes) -> None:
        """Under resume: verify, flush and journal the chunk just written (see PartFile.check)."""
        if self._open.get(part.entry.path) is not part:
            raise RuntimeError(f"{part.entry.path} is not being received")
        try:
            part.check(digest)
        except DestinationError:
            del self._open[part.entry.path]
            raise

    # --- planning, continued ----------------------------------------------------------

    def windows_names(self) -> bool:
        """Whether to refuse names that mean something else to Windows file systems."""
        if self._windows_names is None:
            self._windows_names = os.name == "nt" or self.case_insensitive()
        return self._windows_names

    def case_insensitive(self) -> bool:
        """Whether the destination's file system ignores case, probed on a name it holds.

        The root's own name is looked up in its parent, perhaps another file system, so a
        name inside the root is preferred; an empty root falls back to the root's name.
        """
        if self._case_insensitive is None:
            self._case_insensitive = False
            probes = []
            try:
                with os.scandir(self.root) as names:
                    for item in names:
                        if item.name.swapcase() != item.name:
                            probes.append(self.root / item.name)
                            break
            except OSError:
                pass
            if not probes:
                real = Path(os.path.realpath(self.root))
                probes = [real] if real.name.swapcase() != real.name else []
            for probe in probes:
                try:
                    one = os.stat(probe, follow_symlinks=False)
                    other = os.stat(probe.with_name(probe.name.swapcase()), follow_symlinks=False)
                except OSError:
                    continue
                self._case_insensitive = (one.st_dev, one.st_ino) == (other.st_dev, other.st_ino)
        return self._case_insensitive

    def _refuse_collisions(self, entries) -> None:
        """Two offered paths this file system takes for one: the second would overwrite, or
        merge into, the first. (Unicode spellings are refused by Offer already.)"""
        if not self.case_insensitive():
            return
        seen: dict[str, str] = {}
        for entry in entries:
            key = same_name_key(entry.path).casefold()
            other = seen.setdefault(key, entry.path)
            if other != entry.path:
                raise DestinationError(
                    f"refusing {shown(entry.path)}: it and {shown(other)} differ only in case, "
                    f"which {self.root} ignores"
                )

    def _choose_top_names(self, entries) -> dict[str, str]:
        """Offered top-level name -> the name it gets here; linear in the offer."""
        tops = [entry for entry in entries if "/" not in entry.path]
        self._taken_tops = {entry.path for entry in tops}
        wanted = {entry.path: entry.path for entry in tops}
        if self.single_name is not None and len(entries) == 1 and entries[0].is_file:
            wanted[entries[0].path] = self.single_name
            self._taken_tops.add(self.single_name)
        if not self.rename:
            return wanted
        chosen: dict[str, str] = {}
        for entry in tops:
            name = wanted[entry.path]
            if os.path.lexists(self.root / name):
                name = self._free_name(name, entry.is_directory)
            chosen[entry.path] = name
        return chosen

    def _free_name(self, name: str, directory: bool) -> str:
        """The first numbered variant of `name` free here and not offered; it is taken."""
        for number in range(1, MAX_RENAME_TRIES + 1):
            candidate = numbered_name(name, number, directory=directory)
            if candidate not in self._taken_tops and not os.path.lexists(self.root / candidate):
                self._taken_tops.add(candidate)
                return candidate
        raise DestinationError(f"cannot find a free name for {name} in {self.root}")

    def _target(self, path: str) -> Path:
        top, slash, rest = path.partition("/")
        local = self.root / self._local_top.get(top, top)
        return local.joinpath(*rest.split("/")) if slash else local

    def _inside(self, path: Path) -> bool:
        real = os.path.realpath(path)
        return os.path.commonpath([self._real_root, real]) == self._real_root

    def _inside_once(self, path: Path) -> bool:
        """`_inside` while planning: each directory is resolved once, so a large offer costs
        one lookup per directory, not one per file (writes check afresh)."""
        known = self._inside_cache.get(path)
        if known is None:
            known = self._inside_cache[path] = self._inside(path)
        return known

    def _resumes_into(self, top: str) -> bool:
        """Whether an earlier attempt at this very offer left verified work inside ``top``:
        then running the same command again resumes into it without --merge. Only a
        journal of an offered path, size and file id, written by this receiver, counts."""
        if self._resume_tops is None:
            self._resume_tops = {path.partition("/")[0] for path in self._resume_state if "/" in path}
        return top in self._resume_tops

    def _check_entry(self, entry: OfferEntry) -> Path:
        """Where `entry` goes; its name was checked already (`plan`)."""
        target = self._target(entry.path)
        # For a file only its directory is resolved: the file itself, even a symlink,
        # is replaced, never written through.
        if not self._inside_once(target if entry.is_directory else target.parent):
            raise DestinationError(f"refusing {entry.path}: it would be written outside {self.root}")
        if entry.is_directory:
            if os.path.lexists(target):
                if not target.is_dir():
                    raise DestinationError(f"cannot create the directory {entry.path}: a file of that name exists")
                if "/" not in entry.path and not self.merge and not self._resumes_into(entry.path):
                    raise DestinationError(
                        f"{entry.path} already exists in {self.root}; not writing into it "
                        "(--merge adds to it, --rename saves beside it)"
                    )
            return target
        if target.is_dir():
            raise DestinationError(f"cannot write {entry.path}: a directory of that name exists")
        state = self._resume_state.get(entry.path)
        if os.path.lexists(target) and not self.overwrite and not (state and state[2]):
            raise DestinationError(
                f"{entry.path} already exists in {self.root}; not overwriting it "
                "(--overwrite replaces it, --rename saves beside it)"
            )
        return target

    # --- writing ---------------------------------------------------------------------

    def _make_directory(self, path: Path) -> None:
        """Create `path` and its missing parents below the root, remembering what we made."""
        if path in self._ready:
            return
        missing = []
        current = path
        while current != self.root and not current.is_dir():
            missing.append(current)
            current = current.parent
        if not self._inside(current):
            raise DestinationError(f"refusing {path.relative_to(self.root)}: it now leads outside {self.root}")
        for directory in reversed(missing):
            try:
                os.mkdir(directory)
            except FileExistsError:
                if not directory.is_dir():
                    raise DestinationError(
                        f"cannot create {directory.relative_to(self.root)}: a file of that name exists"
                    ) from None
                continue
            except OSError as exc:
                raise DestinationError(
                    f"cannot create {directory.relative_to(self.root)}: {os_reason(exc)}"
                ) from None
            self._created.append(directory)
            self._touched.add(directory.parent)
        self._ready.add(path)

    def _claim_top(self, path: str) -> None:
        """With `rename`, create the top-level directory of `path` ourselves, exclusively.

        If its name was taken since planning, the next free one is chosen and every
        planned path below it follows; nothing below it has been written yet.
        """
        top = path.partition("/")[0]
        entry = self._entries.get(top)
        if not self.rename or entry is None or not entry.is_directory or top in self._claimed_tops:
            return
        for _ in range(MAX_RENAME_TRIES):
            target = self.root / self._local_top[top]
            if not self._inside(target.parent):
                raise DestinationError(f"refusing {top}: it now leads outside {self.root}")
            try:
                os.mkdir(target)
            except FileExistsError:
                self._local_top[top] = self._free_name(top, True)
                self._replan(top)
                continue
            except OSError as exc:
                raise DestinationError(f"cannot create {self._local_top[top]}: {os_reason(exc)}") from None
            self._created.append(target)
            self._touched.add(self.root)
            self._claimed_tops.add(top)
            return
        raise DestinationError(f"cannot find a free name for {top} in {self.root}")

    def _replan(self, top: str) -> None:
        for path in self._planned:
            if path == top or path.startswith(top + "/"):
                self._planned[path] = self._target(path)

    def open_part(self, entry: OfferEntry) -> PartFile:
        """Create the file's temporary twin (mode 0600, never an existing file) and return it."""
        final = self._planned.get(entry.path)
        if final is None or not entry.is_file:
            raise RuntimeError(f"{entry.path} is not a planned file")
        if entry.path in self._open or entry.path in self._committed:
            raise RuntimeError(f"{entry.path} was already received")
        self._claim_top(entry.path)
        final = self._planned[entry.path]
        self._make_directory(final.parent)
        if self._resuming and self._resumable(entry):
            handle = self._open_resumable(entry, final)
            self._open[entry.path] = handle
            return handle
        part = final.with_name(part_name(final.name))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC | _NOFOLLOW | _BINARY
        try:
            fd = os.open(part, flags, 0o600)
        except OSError as exc:
            raise DestinationError(f"cannot write {entry.path}: {os_reason(exc)}") from None
        handle = PartFile(entry, final, part, fd)
        self._open[entry.path] = handle
        return handle

    def commit(self, part: PartFile, digest: bytes) -> Path:
        """Verify the file and queue it for its real name; the path it is planned to get.

        A mismatch or a short file discards the temporary file and raises DestinationError.
        The name is given with the file's batch (see `SYNC_BATCH_BYTES`, `finish`), once its
        bytes are durable; a name that appeared meanwhile (without overwrite) is found then.
        """
        entry = part.entry
        if self._open.get(entry.path) is not part or part.closed:
            raise RuntimeError(f"{entry.path} is not being received")
        if part.complete:
            # Resumed with nothing left: verified and in place in an earlier attempt. The
            # sender's tail digest is then the hash of nothing.
            if not hmac.compare_digest(blake3.blake3().digest(), bytes(digest)):
                raise IntegrityError(f"{entry.path}: the sender sent bytes of a file that was complete")
            del self._open[entry.path]
            self._committed.add(entry.path)
            self._finished_journals.append(part.journal)
            return part.final_path
        try:
            if entry.size is not None and part.written != entry.size:
                raise DestinationError(f"{entry.path}: received {part.written} of {entry.size} bytes")
            if not hmac.compare_digest(part.digest(), bytes(digest)):
                raise IntegrityError(f"{entry.path} arrived corrupted (its hash does not match); discarded")
            executable = entry.executable and self.keep_modes
            part._flush_and_close((0o777 if executable else 0o666) & ~self._umask)
        except BaseException:
            part.discard()
            del self._open[entry.path]
            raise
        del self._open[entry.path]
        self._committed.add(entry.path)
        self._unsynced.append(part)
        self._unsynced_bytes += part.written
        if self._unsynced_bytes >= SYNC_BATCH_BYTES:
            self._name_batch(last=False)
        return part.final_path

    def _name_batch(self, *, last: bool) -> None:
        """Make the waiting files' bytes durable, then give each its name.

        Unless this is the `last` batch (the transfer's end, where the journals go anyway),
        each file's journal then says it is complete, so that an interrupted transfer does
        not send it again. On failure the files not yet named are discarded.
        """
        batch, self._unsynced, self._unsynced_bytes = self._unsynced, [], 0
        if not batch:
            return
        placed = 0
        try:
            self._flush([part.part_path for part in batch], {part.part_path.parent for part in batch})
            for part in batch:
                self._place(part)
                placed += 1
                self._touched.add(part.final_path.parent)
                if last:
                    if part.journal is not None:
                        part.journal.close()
                        self._finished_journals.append(part.journal)
                else:
                    self._mark_done(part)
        finally:
            for part in batch[placed:]:
                part.discard()

    def _mark_done(self, part: PartFile) -> None:
        if part.journal is None and part._new_journal is None:
            return
        try:
            if part.journal is None:
                part.journal = Journal.create(*part._new_journal)
            part.journal.mark_done(os.stat(part.final_path, follow_symlinks=False))
            part.journal.close()
            self._finished_journals.append(part.journal)
        except OSError:
            if part.journal is not None:
                part.journal.remove()

    def _flush(self, files: list[Path], directories) -> None:
        try:
            durable.flush(files, directories)
        except OSError as exc:
            where = os.path.commonpath([str(d) for d in directories]) if directories else self.root
            raise DestinationError(f"cannot flush the files received in {where} to disk: {os_reason(exc)}") from None

    def _place(self, part: PartFile) -> None:
        """Rename the verified file onto its final name, never over an existing one unless asked."""
        name = part.entry.path
        try:
            if self.overwrite:
                os.replace(part.part_path, part.final_path)
                return
            renaming = self.rename and "/" not in name
            for _ in range(MAX_RENAME_TRIES if renaming else 1):
                if link_or_rename(part.part_path, part.final_path):
                    return
                if not renaming:
                    break
                # --rename: the name was taken since planning; take the next free one.
                self._local_top[name] = self._free_name(name, False)
                part.final_path = self._planned[name] = self._target(name)
        except OSError as exc:
            raise DestinationError(f"cannot move {name} into place: {os_reason(exc)}") from None
        raise DestinationError(f"{name} appeared during the transfer; not overwriting it")

    def finish(self) -> None:
        """Create the offered directories still missing (empty ones), name the last batch of
        files, and make every name durable.

        Call it after the last commit and before acknowledging.
        """
        missing = set(self._planned) - self._committed - {entry.path for entry in self._directories}
        if missing:
            raise RuntimeError(f"{len(missing)} planned files were not committed")
        for entry in self._directories:
            self._claim_top(entry.path)
            self._make_directory(self._planned[entry.path])
        self._name_batch(last=True)
        for journal in self._finished_journals:
            journal.remove()
        self._finished_journals.clear()
        if self._touched:
            self._flush([], self._touched)

    @contextlib.contextmanager
    def all_or_nothing(self) -> Iterator[Destination]:
        """Whatever goes wrong inside (errors, cancellation, Ctrl-C), `abort` runs first."""
        try:
            yield self
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove every temporary file and every still-empty directory we created.

        Verified files still waiting for their names get them first (after a flush).
        Under resume, a partial file with verified chunks is kept with its journal instead,
        for the next attempt; so are the journals of files already complete.
        """
        kept = False
        for part in list(self._open.values()):
            if part.resumable:
                part.suspend()
                kept = True
            else:
                part.discard()
        try:
            self._name_batch(last=False)  # verified files keep their place, marked done
        except (DestinationError, OSError):
            pass  # the batch's files were discarded: what cannot be made durable is not named
        self.kept_partial = kept
        # The journals of complete files matter only if a later attempt has more to do.
        unfinished = kept or bool(set(self._planned) - self._committed - {e.path for e in self._directories})
        for journal in self._finished_journals:
            if unfinished:
                journal.close()
            else:
                journal.remove()
        self._finished_journals.clear()
        self._open.clear()
        for directory in reversed(self._created):
            try:
                os.rmdir(directory)
            except OSError:
                pass  # not empty: it holds committed files, or things that were already there
        self._created.clear()


class StreamDestination:
    """``peer recv --stdout``: the offer's single file goes to a descriptor, nothing to disk.

    It has `Destination`'s interface, so the same drivers (ours and bob's) use it. Bytes
    reach the reader as they arrive, before the final digest is checked: a failed check
    cannot take them back, so it is reported (exit status 1) instead of hidden.
    """

    kept_partial = False  # nothing is kept: standard output cannot resume
    as_file = False

    def __init__(self, fd: int = 1, display: str = "standard output") -> None:
        self._fd = fd
        self._display = display
        self._entry: OfferEntry | None = None
        self._part: StreamPart | None = None
        self.renamed: dict[str, str] = {}

    def plan(self, offer: Offer, *, resume: bool = False) -> list[Path]:
        """Refuse anything but a single file (or a text message, which writes nothing)."""
        if getattr(offer, "text", None) is not None:
            return []
        files = [entry for entry in offer.entries if entry.is_file]
        if len(offer.entries) != 1 or len(files) != 1:
            raise DestinationError(
                f"--stdout takes a single file, and the sender offers {len(files)} files "
                f"in {len(offer.entries)} entries"
            )
        problem = name_problem(files[0].path)
        if problem:
            raise DestinationError(f"refusing the name {shown(files[0].path)}: it {problem}")
        self._entry = files[0]
        return [Path(self._display)]

    def open_part(self, entry: OfferEntry) -> StreamPart:
        if entry != self._entry or self._part is not None:
            raise RuntimeError(f"{entry.path} is not the planned file")
        self._part = StreamPart(entry, self._fd, self._display)
        return self._part

    def commit(self, part: StreamPart, digest: bytes) -> Path:
        entry = part.entry
        if entry.size is not None and part.written != entry.size:
            raise DestinationError(f"{entry.path}: received {part.written} of {entry.size} bytes")
        if not hmac.compare_digest(part.digest(), bytes(digest)):
            raise IntegrityError(
                f"{entry.path} arrived corrupted (its hash does not match); what was written to "
                f"{self._display} is not the file sent"
            )
        return Path(self._display)

    def finish(self) -> None:
        if self._entry is not None and self._part is None:
            raise RuntimeError("the planned file was not received")

    @contextlib.contextmanager
    def all_or_nothing(self) -> Iterator[StreamDestination]:
        yield self  # nothing to undo: a stream cannot be taken back

    def abort(self) -> None:
        pass
