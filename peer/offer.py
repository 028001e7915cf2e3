"""The offer: what a sender proposes, the rules its names obey, and the version and
features it declares.

The lowest layer of the data phase, apart from peer/errors.py: the messages
(peer/messages.py) and the state machines (peer/transfer.py) build on it, and the disk
sides (peer/source.py, peer/destination.py, peer/pack) use its one rule book for names.
Nothing here touches a socket or a file. The byte layouts and the reasoning are in
``docs/transfer.md``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import unicodedata
from typing import Iterable

import attrs

from peer.errors import ProtocolError

__all__ = [
    "BIG_RECORDS",
    "DIRECTORY",
    "FILE",
    "MAX_COMPONENT_BYTES",
    "MAX_ENTRIES",
    "MAX_FILE_SIZE",
    "MAX_OFFER_BYTES",
    "MAX_OFFER_ENTRIES",
    "MAX_PATH_BYTES",
    "PACK_ACK",
    "PROTOCOL_VERSION",
    "RESUME",
    "TEXT",
    "UNKNOWN_SIZE",
    "ZSTD",
    "Offer",
    "OfferEntry",
    "format_size",
    "name_problem",
    "os_reason",
    "printable",
    "same_name_key",
    "shown",
    "verification_string",
    "windows_problem",
]

PROTOCOL_VERSION = 1
"""The highest (and so far only) version of this data phase that we speak."""

MAX_OFFER_BYTES = 64 * 1024 * 1024
MAX_OFFER_ENTRIES = 100_000
"""The most entries (files and directories) one offer may list. Far more than anyone reviews
at a prompt, and it bounds what the receiver parses and plans before asking: an offer over
it is refused from a count of its entries, before the document is parsed."""
MAX_ENTRIES = MAX_OFFER_ENTRIES  # the same cap under its older name (bob's payload uses it)
MAX_LISTED = 20
"""Lines of top-level items the receiver's prompt shows before it says how many more."""
MAX_HIDDEN_LISTED = 10
"""Hidden (dot) paths named at the prompt before it says how many more."""
MAX_FILE_SIZE = 2**63 - 1
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_TEXT_BYTES = 1024 * 1024
"""A text message travels inside the offer; anything longer belongs in a file."""

TEXT = "text"
"""Feature: an offer may carry a text message instead of entries."""
UNKNOWN_SIZE = "unknown-size"
"""Feature: a file's size may be unknown (``null``) until its FILE_END, as for a pipe."""
ZSTD = "zstd"
"""Feature: file content may come as zstd frames (ZDATA) as well as raw DATA."""
BIG_RECORDS = "big-records"
"""Feature: DATA messages of up to MAX_BIG_DATA_SIZE bytes, in big records (peer/records.py).
Every other message keeps to MAX_RECORD_SIZE."""
RESUME = "resume"
"""Feature: CHECK messages every RESUME_CHUNK bytes, and resume points in ANSWER and FILE."""
PACK_ACK = "pack-ack"
"""Feature, receiver only: a receiver that gets bob's PACK after its HELLO (the sender gave up
waiting for it) answers the verified PACK with an ACK, or an ERROR, before it closes. A
sender that saw this in a HELLO takes nothing less: a bare close is then no confirmation."""
_CAPABILITY = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_FILE_ID = re.compile(r"[0-9a-f]{1,64}")

FILE = "file"
DIRECTORY = "dir"

# The C0 and C1 control characters, line and paragraph separators, and the Unicode
# bidirectional controls: nothing a file name needs, and each can hide or reorder what
# a prompt shows (``invoice\u202efdp.exe`` displays as ``invoiceexe.pdf``).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_DRIVE_LETTER = re.compile(r"[A-Za-z]:")


# --- names ---------------------------------------------------------------------------


def name_problem(path: str) -> str | None:
    """Why `path` is unsafe as an offered name, or None when it is acceptable.

    The one rule book for names: offers are parsed with it, the sender scans with it
    and the destination checks with it again, so a name one side accepts the other
    side accepts too. A name is a relative POSIX path of plain components; anything
    that could climb out of the destination (on any platform, a drive letter and a
    backslash included) or disguise itself on a terminal is refused everywhere. Names
    that are merely special on Windows (``CON``, ``a:b``, ``x.``) are legal POSIX names
    and stay legal here; a destination on Windows refuses them (`windows_problem`).
    """
    if not isinstance(path, str):
        return "is not a string"
    if not path:
        return "is empty"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if len(encoded) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    bad = _UNPRINTABLE.search(path)
    if bad:
        return f"contains the control character U+{ord(bad.group()):04X}"
    if "\\" in path:
        return "contains a backslash"
    if path.startswith("/"):
        return "is an absolute path"
    for component in path.split("/"):
        if not component:
            return "has an empty component"
        if component in (".", ".."):
            return f"contains a {component!r} component"
        if len(component.encode("utf-8")) > MAX_COMPONENT_BYTES:
            return f"has a component longer than {MAX_COMPONENT_BYTES} bytes"
        if _DRIVE_LETTER.match(component):
            return "looks like a Windows drive letter"
    return None


_WINDOWS_DEVICE = re.compile(r"(con|prn|aux|nul|com[0-9\u00b9\u00b2\u00b3]|lpt[0-9\u00b9\u00b2\u00b3]|conin\$|conout\$)(\..*)?",
                             re.IGNORECASE)
_WINDOWS_RESERVED = re.compile(r'[<>:"|?*]')


def windows_problem(path: str) -> str | None:
    """Why `path`, acceptable to `name_problem`, means something else to Windows; or None.

    Windows opens a device for ``CON`` or ``aux.txt`` in any directory, reads ``a:b`` as
    the stream ``b`` of the file ``a`` (so writing it changes an existing file behind the
    overwrite check), and drops trailing dots and spaces (so ``x.`` lands on ``x``).
    """
    for component in path.split("/"):
        if _WINDOWS_DEVICE.fullmatch(component.rstrip(" ")):
            return f"is the device name {component.partition('.')[0]!r} on Windows"
        reserved = _WINDOWS_RESERVED.search(component)
        if reserved:
            return f"contains {reserved.group()!r}, which means something else on Windows"
        if component[-1] in ". ":
            return "has a component ending with a dot or a space, which Windows drops"
    return None


def same_name_key(path: str) -> str:
    """`path` as a file system that normalises Unicode sees it (macOS, Windows): NFC."""
    return path if path.isascii() else unicodedata.normalize("NFC", path)


def os_reason(error: OSError) -> str:
    """An OSError as the end of a user's one-line message: "permission denied", "disk full"."""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "disk full"
    if error.errno is None:
        return str(error)
    text = os.strerror(error.errno)
    return text[:1].lower() + text[1:]


def printable(text: str) -> str:
    """`text` with every control character replaced, safe to print on one line.

    For anything a peer chose (error reasons): it must not move the cursor, recolour
    or fake a line of our own output.
    """
    return _UNPRINTABLE.sub("\ufffd", text)


def shown(path: object) -> str:
    """A name from a peer quoted for an error message: escaped, and cut if very long."""
    text = repr(path)
    return text if len(text) <= 80 else text[:76] + "...'"


def format_size(size: int) -> str:
    """A byte count for people: ``0 B``, ``999 B``, ``1.5 KiB``, ``3.0 GiB``."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def verification_string(key: bytes) -> str:
    """A short string both peers print so their users can compare them.

    `key` is sub-key 0 (`SharedKeys.sender_to_receiver`), equal on both sides after a
    good handshake. The hash is personalised so the string cannot be confused with
    any other use of the key, and 64 bits reveal nothing useful about its 512.
    """
    if len(key) < 32:
        raise ValueError(f"expected a session sub-key, got {len(key)} bytes")
    digest = hashlib.blake2b(bytes(key), digest_size=8, person=b"peer-relay:check").hexdigest()
    return "-".join(digest[i : i + 4] for i in range(0, 16, 4))


# --- the offer -----------------------------------------------------------------------


@attrs.frozen
class OfferEntry:
    """One item of an offer: a file (with its size, None when unknown) or a directory.

    `file_id` is the sender's short name for this version of the file (see
    ``docs/transfer.md``, resume); the receiver only compares it.
    """

    kind: str
    path: str
    size: int | None = 0
    executable: bool = False
    file_id: str | None = attrs.field(default=None, eq=False)

    @property
    def is_file(self) -> bool:
        return self.kind == FILE

    @property
    def is_directory(self) -> bool:
        return self.kind == DIRECTORY


def _entry_problem(entry: OfferEntry) -> str | None:
    problem = name_problem(entry.path)
    if problem:
        return f"the name {shown(entry.path)} {problem}"
    if entry.kind == FILE:
        if entry.size is None:
            pass  # unknown until FILE_END; only with the unknown-size feature
        elif type(entry.size) is not int or not 0 <= entry.size <= MAX_FILE_SIZE:
            return f"{entry.path}: invalid size {entry.size!r}"
        if type(entry.executable) is not bool:
            return f"{entry.path}: invalid executable flag {entry.executable!r}"
    elif entry.kind == DIRECTORY:
        if entry.size != 0 or entry.executable is not False:
            return f"{entry.path}: a directory has no size or executable flag"
    else:
        return f"{entry.path}: unknown kind {entry.kind!r}"
    return None


@attrs.frozen
class Offer:
    """What the sender proposes: entries in sending order, each parent before its children.

    Construction checks every rule (names, sizes, unique paths, parents declared
    first), so any Offer in hand is safe to plan from. Violations raise ValueError.
    """

    entries: tuple[OfferEntry, ...] = attrs.field(converter=tuple)
    text: str | None = None
    """A text message for the receiver to print; such an offer has no entries."""
    skipped: tuple[str, ...] = attrs.field(default=(), converter=tuple, kw_only=True)
    """Paths the sender left out because it could not read them (``--skip-unreadable``):
    told, not offered, so the receiver knows what it will not get."""
    file_count: int = attrs.field(init=False)
    total_bytes: int = attrs.field(init=False)
    """The sum of the known sizes (all of them unless `sizes_known` is false)."""

    def __attrs_post_init__(self) -> None:
        if self.text is not None:
            if not isinstance(self.text, str):
                raise ValueError("the text is not a string")
            try:
                encoded = self.text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("the text is not valid UTF-8") from None
            if len(encoded) > MAX_TEXT_BYTES:
                raise ValueError(f"the text is over {format_size(MAX_TEXT_BYTES)}; send it as a file")
            if self.entries:
                raise ValueError("an offer carries either a text or entries, not both")
        elif not self.entries:
            raise ValueError("the offer is empty")
        if len(self.skipped) > MAX_OFFER_ENTRIES or not all(isinstance(path, str) for path in self.skipped):
            raise ValueError("the list of skipped paths is malformed")
        if len(self.entries) > MAX_OFFER_ENTRIES:
            raise ValueError(f"the offer has over {MAX_OFFER_ENTRIES:,} entries (the limit)")
        directories: set[str] = set()
        seen: set[str] = set()
        normalised: set[str] = set()
        files = 0
        total = 0
        for entry in self.entries:
            if not isinstance(entry, OfferEntry):
                raise ValueError(f"not an offer entry: {entry!r}")
            problem = _entry_problem(entry)
            if problem:
                raise ValueError(problem)
            key = same_name_key(entry.path)
            if entry.path in seen or key in normalised:
                # Two spellings of one name (NFC and NFD) are one file where names are
                # normalised: the second would overwrite or merge into the first.
                raise ValueError(f"{printable(entry.path)} is offered twice")
            seen.add(entry.path)
            normalised.add(key)
            parent, slash, _ = entry.path.rpartition("/")
            if slash and parent not in directories:
                # Also rules out a file being used as a directory ("a" and "a/b").
                raise ValueError(f"{entry.path} comes before (or without) its directory {parent}")
            if entry.is_directory:
                directories.add(entry.path)
            else:
                files += 1
                total += entry.size or 0
        object.__setattr__(self, "file_count", files)
        object.__setattr__(self, "total_bytes", total)

    @property
    def sizes_known(self) -> bool:
        return all(entry.size is not None for entry in self.entries)

    def needed_features(self) -> frozenset[str]:
        """What a receiver must support to take this offer at all."""
        needed = set()
        if self.text is not None:
            needed.add(TEXT)
        if not self.sizes_known:
            needed.add(UNKNOWN_SIZE)
        return frozenset(needed)

    @property
    def files(self) -> list[OfferEntry]:
        return [entry for entry in self.entries if entry.is_file]

    @property
    def top_level(self) -> list[OfferEntry]:
        """The items the sender named on its command line."""
        return [entry for entry in self.entries if "/" not in entry.path]

    def summary(self) -> str:
        """One line for the receiver's prompt, e.g. ``photos/ (12 files, 3.1 MiB)``."""
        if self.text is not None:
            return f"a text message ({format_size(len(self.text.encode('utf-8')))})"
        tops = self.top_level
        names = [entry.path + ("/" if entry.is_directory else "") for entry in tops[:3]]
        if len(tops) > 3:
            names.append(f"and {len(tops) - 3} more")
        size = format_size(self.total_bytes)
        if not self.sizes_known:
            size = f"{size} and more" if self.total_bytes else "size unknown"
        if len(tops) == 1 and tops[0].is_file:
            return f"{names[0]} ({size})"
        plural = "" if self.file_count == 1 else "s"
        listing = ", ".join(names)
        if len(tops) > 1:
            listing = f"{len(tops)} items: {listing}"
        return f"{listing} ({self.file_count} file{plural}, {size})"

    def listing(self) -> list[str]:
        """Lines that show the receiver everything it would get, under `summary`.

        Every top-level item (up to MAX_LISTED of them; then how many more), and always
        every hidden path, nested ones included: a sender must not slip ``.git/hooks/...``
        past the prompt behind a few harmless names. Nothing for a single visible item,
        which `summary` already shows whole.
        """
        if self.text is not None:
            return []
        files: dict[str, int] = {}
        sizes: dict[str, int] = {}
        parents: set[str] = set()
        hidden: list[str] = []
        tops: list[OfferEntry] = []
        for entry in self.entries:
            top, slash, _ = entry.path.partition("/")
            if not slash:
                tops.append(entry)
            else:
                parents.add(entry.path.rpartition("/")[0])
            if entry.is_file:
                files[top] = files.get(top, 0) + 1
                sizes[top] = sizes.get(top, 0) + (entry.size or 0)
            if entry.path.startswith(".") or "/." in entry.path:
                hidden.append(entry)
        # A hidden path is named by its files (and its empty directories), not each level.
        hidden_paths = [e.path for e in hidden if e.is_file or e.path not in parents]
        skipped = []
        if self.skipped:
            count = len(self.skipped)
            names = ", ".join(printable(path) for path in self.skipped[:MAX_HIDDEN_LISTED])
            more = f" and {count - MAX_HIDDEN_LISTED} more" if count > MAX_HIDDEN_LISTED else ""
            skipped = [f"  the sender skipped {count} unreadable file{'' if count == 1 else 's'}: {names}{more}"]
        if len(tops) == 1 and not hidden_paths:
            return skipped
        lines = []
        for entry in tops[:MAX_LISTED]:
            if entry.is_file:
                size = "size unknown" if entry.size is None else format_size(entry.size)
                lines.append(f"  {printable(entry.path)} ({size})")
            else:
                count = files.get(entry.path, 0)
                lines.append(f"  {printable(entry.path)}/ (directory, {count} file{'' if count == 1 else 's'}, "
                             f"{format_size(sizes.get(entry.path, 0))})")
        if len(tops) > MAX_LISTED:
            lines.append(f"  and {len(tops) - MAX_LISTED} more")
        if hidden_paths:
            shown_paths = ", ".join(printable(path) for path in hidden_paths[:MAX_HIDDEN_LISTED])
            more = len(hidden_paths) - MAX_HIDDEN_LISTED
            lines.append(f"  includes hidden paths: {shown_paths}" + (f" and {more} more" if more > 0 else ""))
        return lines + skipped

    def to_json(
        self, *, version: int = PROTOCOL_VERSION, features: Iterable[str] = (), with_ids: bool = False
    ) -> bytes:
        """The OFFER document (docs/transfer.md), compact UTF-8 JSON; file ids only `with_ids`."""
        entries = []
        for entry in self.entries:
            if entry.is_file:
                item = {"kind": FILE, "path": entry.path, "size": entry.size, "executable": entry.executable}
                if with_ids and entry.file_id is not None:
                    item["id"] = entry.file_id
                entries.append(item)
            else:
                entries.append({"kind": DIRECTORY, "path": entry.path})
        document = {
            "version": version,
            "features": sorted(features),
            "file_count": self.file_count,
            "total_bytes": self.total_bytes,
            "entries": entries,
        }
        if self.text is not None:
            document["text"] = self.text
        if self.skipped:
            document["skipped"] = list(self.skipped)  # optional: older receivers ignore it
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> tuple[Offer, int, frozenset[str]]:
        """Parse an OFFER document: (offer, version, features). Raises ProtocolError.

        Unknown keys are ignored so that later versions can add information; anything
        that changes meaning bumps the version instead.
        """
        data = bytes(data)
        # Every entry has a "kind" key (inside a JSON string a quote is escaped, so names
        # cannot add to the count): a hostile document over the cap costs a count, not a parse.
        if data.count(b'"kind"') > MAX_OFFER_ENTRIES:
            raise ProtocolError(f"the offer has over {MAX_OFFER_ENTRIES:,} entries (the limit)")
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ProtocolError(f"the offer is not valid JSON: {exc.__class__.__name__}") from None
        if not isinstance(document, dict):
            raise ProtocolError("the offer is not a JSON object")
        version = document.get("version")
        if type(version) is not int:
            raise ProtocolError("the offer has no version")
        features = document.get("features", [])
        if not isinstance(features, list) or not all(
            isinstance(f, str) and _CAPABILITY.fullmatch(f) for f in features
        ):
            raise ProtocolError("the offer's feature list is malformed")
        raw_entries = document.get("entries")
        if not isinstance(raw_entries, list):
            raise ProtocolError("the offer has no entry list")
        if len(raw_entries) > MAX_OFFER_ENTRIES:
            raise ProtocolError(f"the offer has over {MAX_OFFER_ENTRIES:,} entries (the limit)")
        entries = []
        for raw in raw_entries:
            if not isinstance(raw, dict):
                raise ProtocolError("an offer entry is not a JSON object")
            kind = raw.get("kind")
            path = raw.get("path")
            if kind == FILE:
                if "size" not in raw:
                    raise ProtocolError(f"the offer entry {shown(path)} has no size")
                file_id = raw.get("id")
                if file_id is not None and not (isinstance(file_id, str) and _FILE_ID.fullmatch(file_id)):
                    raise ProtocolError(f"the offer entry {shown(path)} has a malformed id")
                entry = OfferEntry(FILE, path, raw["size"], raw.get("executable", False), file_id)
            elif kind == DIRECTORY:
                entry = OfferEntry(DIRECTORY, path)
            else:
                raise ProtocolError(f"an offer entry has an unknown kind {printable(str(kind))!r}")
            entries.append(entry)
        text = document.get("text")
        if text is not None and not isinstance(text, str):
            raise ProtocolError("the offer's text is not a string")
        skipped = document.get("skipped", [])
        if not isinstance(skipped, list) or not all(isinstance(path, str) for path in skipped):
            raise ProtocolError("the offer's list of skipped paths is malformed")
        try:
            offer = cls(entries, text, skipped=skipped)
        except ValueError as exc:
            raise ProtocolError(f"invalid offer: {exc}") from None
        if document.get("file_count") != offer.file_count or document.get("total_bytes") != offer.total_bytes:
            raise ProtocolError("the offer's totals do not match its entries")
        return offer, version, frozenset(features)
