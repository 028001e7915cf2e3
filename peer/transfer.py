"""Our own data phase: the messages inside the encrypted records, and both state machines.

This layer runs between two peer-relay peers once the secure room is open. It never
touches a socket or a file: the driver feeds each record plaintext to a session, gets
an event back, does the disk and network I/O, and asks the session for the next
outgoing plaintexts. The byte layouts and the reasoning are in ``docs/transfer.md``.

Every record plaintext is exactly one message: a type byte, then its body. The
receiver speaks first (HELLO) because bob's receiver never speaks at all, which is how
a sender will tell the two apart. No message type is 0x50 (``P``), so a receiver can
also tell our first message from the start of bob's ``PACK`` stream.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import os
import re
import struct
import unicodedata
from typing import ClassVar, Iterable, Union

import attrs

from peer import compression
from peer.records import MAX_BIG_RECORD_SIZE, MAX_RECORD_SIZE

__all__ = [
    "DIRECTORY",
    "FILE",
    "MAX_DATA_SIZE",
    "MAX_OFFER_ENTRIES",
    "PACK_ACK",
    "PROTOCOL_VERSION",
    "RESUME",
    "RESUME_CHUNK",
    "TEXT",
    "UNKNOWN_SIZE",
    "ZSTD",
    "Accepted",
    "Ack",
    "Answer",
    "Check",
    "ChunkChecked",
    "Completed",
    "CompressedData",
    "Data",
    "Declined",
    "Done",
    "Error",
    "FileData",
    "FileEnd",
    "FileFinished",
    "FileStart",
    "FileStarted",
    "HandshakeAltered",
    "Hello",
    "HelloReceived",
    "Offer",
    "OfferEntry",
    "OfferPart",
    "OfferReceived",
    "PeerError",
    "ProtocolError",
    "ReceiverSession",
    "SenderSession",
    "TransferDone",
    "TransferError",
    "TransferFailed",
    "decode_message",
    "format_size",
    "name_problem",
    "os_reason",
    "printable",
    "public_digest",
    "shown",
    "verification_string",
    "windows_problem",
]

PROTOCOL_VERSION = 1
"""The highest (and so far only) version of this data phase that we speak."""

MAGIC = b"peer-relay"
"""Starts every HELLO body, so a stray or foreign first record is recognised as such."""

MAX_DATA_SIZE = MAX_RECORD_SIZE - 1
"""File bytes per DATA record: a whole record minus the type byte."""
MAX_BIG_DATA_SIZE = MAX_BIG_RECORD_SIZE - 1
"""File bytes per DATA record under the feature big-records."""

DIGEST_SIZE = 32  # blake3
MAX_REASON_BYTES = 1024
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
MAX_CAPABILITIES = 64
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
RESUME_CHUNK = 16 * 1024 * 1024
"""Under resume, a CHECK follows every this many bytes of a file (counted from its start),
and a resume point is a multiple of it (or the file's size)."""
PACK_ACK = "pack-ack"
"""Feature, receiver only: a receiver that gets bob's PACK after its HELLO (the sender gave up
waiting for it) answers the verified PACK with an ACK, or an ERROR, before it closes. A
sender that saw this in a HELLO takes nothing less: a bare close is then no confirmation."""
PUBLIC_DIGEST_SIZE = 14
"""Bytes of the HELLO's digest of the sender's spoke public (see `public_digest`)."""
_PUBLIC_TAG = "pub-"
"""How the public's digest rides in HELLO: as one more capability-shaped item, ``pub-`` and
28 hex digits, because older senders skip capabilities they do not know but refuse any
other extra byte in a HELLO."""
_CAPABILITY = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_FILE_ID = re.compile(r"[0-9a-f]{1,64}")

FILE = "file"
DIRECTORY = "dir"

# The C0 and C1 control characters, line and paragraph separators, and the Unicode
# bidirectional controls: nothing a file name needs, and each can hide or reorder what
# a prompt shows (``invoice\u202efdp.exe`` displays as ``invoiceexe.pdf``).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_DRIVE_LETTER = re.compile(r"[A-Za-z]:")


class TransferError(Exception):
    """Base of this module's errors."""


class TransferFailed(Exception):
    """A transfer ended without the receiver's confirmation; the message is the user's one line."""


class ProtocolError(TransferError):
    """The peer sent something this data phase does not allow; the transfer must stop.

    The message is one line meant for the user; send it to the peer with `error()`.
    """


class HandshakeAltered(ProtocolError):
    """Our receiver was announced another sender public than the one we sent: the relay
    rewrote it (only the cipher ids can change without breaking the handshake)."""


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
        if len(tops) == 1 and not hidden_paths:
            return []
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
        return lines

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
        try:
            offer = cls(entries, text)
        except ValueError as exc:
            raise ProtocolError(f"invalid offer: {exc}") from None
        if document.get("file_count") != offer.file_count or document.get("total_bytes") != offer.total_bytes:
            raise ProtocolError("the offer's totals do not match its entries")
        return offer, version, frozenset(features)


# --- messages ------------------------------------------------------------------------

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_FILE_START = struct.Struct(">IQ")
_RESUME_POINT = struct.Struct(">IQ")
_ACK = struct.Struct(">QQ")
_HELLO_HEAD = struct.Struct(f">{len(MAGIC)}sHB")

_DECLINE = 0
_ACCEPT = 1
_OFFER_MORE = 0x01


def _reason_bytes(reason: str) -> bytes:
    """UTF-8, cut at a character boundary to fit MAX_REASON_BYTES."""
    return reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


def _reason_text(body: bytes | memoryview) -> str:
    if len(body) > MAX_REASON_BYTES:
        raise ProtocolError(f"reason is {len(body)} bytes, over {MAX_REASON_BYTES}")
    return printable(bytes(body).decode("utf-8", "replace"))


def public_digest(public: bytes) -> bytes:
    """What our receiver's HELLO says about the 34-byte spoke public it was announced.

    The handshake binds the salt and the iteration count (both peers stretch the code with
    them) but not the cipher ids, which a relay could rewrite to pass our sender off as bob.
    Inside the encrypted room this digest lets our sender compare the public it sent with
    the one our receiver got. Second preimages are what matter here, and a relay has at
    most a few fields to play with: 112 bits are plenty, and they fit a capability name.
    """
    return hashlib.blake2b(bytes(public), digest_size=PUBLIC_DIGEST_SIZE, person=b"peer-relay pub").digest()


@attrs.frozen
class Hello:
    """r→s, first message: who we are, the highest version and the optional features, and
    (since pack-ack) the digest of the sender's public as we received it.

    The digest travels as one more capability-shaped item (see _PUBLIC_TAG) so that older
    senders, which skip unknown capabilities, still read this HELLO; a HELLO without it
    comes from an older receiver, which cannot confirm the public.
    """

    TYPE: ClassVar[int] = 0x01
    version: int = PROTOCOL_VERSION
    capabilities: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    public_digest: bytes | None = None

    def encode(self) -> bytes:
        names = list(self.capabilities)
        for name in names:
            if not _CAPABILITY.fullmatch(name) or name.startswith(_PUBLIC_TAG):
                raise ValueError(f"invalid capability name {name!r}")
        if self.public_digest is not None:
            if len(self.public_digest) != PUBLIC_DIGEST_SIZE:
                raise ValueError(f"the public's digest must be {PUBLIC_DIGEST_SIZE} bytes")
            names.append(_PUBLIC_TAG + self.public_digest.hex())
        if len(names) > MAX_CAPABILITIES:
            raise ValueError("too many capabilities")
        parts = [bytes([self.TYPE]), _HELLO_HEAD.pack(MAGIC, self.version, len(names))]
        parts += [bytes([len(name)]) + name.encode("ascii") for name in names]
        return b"".join(parts)

    @classmethod
    def decode(cls, body: memoryview) -> Hello:
        if len(body) < _HELLO_HEAD.size:
            raise ProtocolError("hello is too short")
        magic, version, count = _HELLO_HEAD.unpack_from(body)
        if magic != MAGIC:
            raise ProtocolError("hello does not start with the peer-relay magic")
        offset = _HELLO_HEAD.size
        capabilities = []
        digest = None
        for index in range(count):
            if offset >= len(body):
                raise ProtocolError("hello is cut inside its capability list")
            size = body[offset]
            name = bytes(body[offset + 1 : offset + 1 + size])
            offset += 1 + size
            if len(name) != size:
                raise ProtocolError("hello is cut inside a capability name")
            text = name.decode("ascii", "replace")
            if not _CAPABILITY.fullmatch(text):
                raise ProtocolError(f"hello has an invalid capability name {printable(text)!r}")
            if text.startswith(_PUBLIC_TAG):
                if index != count - 1:
                    raise ProtocolError("hello has the digest of the public before its capabilities")
                digest = _public_tag_digest(text)
                continue
            capabilities.append(text)
        if offset != len(body):
            raise ProtocolError("hello has trailing bytes")
        return cls(version, capabilities, digest)


def _public_tag_digest(text: str) -> bytes:
    hexdigits = text[len(_PUBLIC_TAG) :]
    if len(hexdigits) != 2 * PUBLIC_DIGEST_SIZE or not re.fullmatch(r"[0-9a-f]+", hexdigits):
        raise ProtocolError(f"hello has a malformed digest of the public {text!r}")
    return bytes.fromhex(hexdigits)


@attrs.frozen
class OfferPart:
    """s→r: a piece of the OFFER JSON; `more` says another piece follows."""

    TYPE: ClassVar[int] = 0x02
    more: bool
    chunk: bytes = attrs.field(converter=bytes)

    def encode(self) -> bytes:
        if not 1 <= len(self.chunk) <= MAX_RECORD_SIZE - 2:
            raise ValueError("an offer piece must hold 1..32765 bytes")
        return bytes([self.TYPE, _OFFER_MORE if self.more else 0]) + self.chunk

    @classmethod
    def decode(cls, body: memoryview) -> OfferPart:
        if len(body) < 2:
            raise ProtocolError("offer piece is empty")
        flags = body[0]
        if flags & ~_OFFER_MORE:
            raise ProtocolError(f"offer piece has unknown flags {flags:#04x}")
        return cls(bool(flags & _OFFER_MORE), body[1:])


@attrs.frozen
class Answer:
    """r→s: accept (optionally with per-file resume points) or decline with a reason.

    Resume points are `(file entry index, byte offset)` pairs; this version never
    sends any, and refuses them unless a future "resume" feature was negotiated.
    """

    TYPE: ClassVar[int] = 0x03
    accepted: bool
    reason: str = ""
    resume_points: tuple[tuple[int, int], ...] = attrs.field(default=(), converter=tuple)

    def encode(self) -> bytes:
        if not self.accepted:
            if self.resume_points:
                raise ValueError("a decline has no resume points")
            return bytes([self.TYPE, _DECLINE]) + _reason_bytes(self.reason)
        if self.reason:
            raise ValueError("an acceptance has no reason")
        points = b"".join(_RESUME_POINT.pack(index, offset) for index, offset in self.resume_points)
        return bytes([self.TYPE, _ACCEPT]) + _U32.pack(len(self.resume_points)) + points

    @classmethod
    def decode(cls, body: memoryview) -> Answer:
        if len(body) < 1:
            raise ProtocolError("answer is empty")
        decision = body[0]
        if decision == _DECLINE:
            return cls(False, _reason_text(body[1:]))
        if decision != _ACCEPT:
            raise ProtocolError(f"answer has an unknown decision {decision}")
        if len(body) < 1 + _U32.size:
            raise ProtocolError("acceptance is too short")
        (count,) = _U32.unpack_from(body, 1)
        if len(body) != 1 + _U32.size + count * _RESUME_POINT.size:
            raise ProtocolError("acceptance length does not match its resume point count")
        points = [_RESUME_POINT.unpack_from(body, 5 + i * _RESUME_POINT.size) for i in range(count)]
        return cls(True, "", points)


class _FixedMessage:
    """A type byte and integer fields in a fixed struct layout (FILE and ACK)."""

    TYPE: ClassVar[int]
    WHAT: ClassVar[str]
    LAYOUT: ClassVar[struct.Struct]

    def encode(self) -> bytes:
        return bytes([self.TYPE]) + self.LAYOUT.pack(*attrs.astuple(self))

    @classmethod
    def decode(cls, body: memoryview):
        if len(body) != cls.LAYOUT.size:
            raise ProtocolError(f"{cls.WHAT} is {len(body)} bytes, expected {cls.LAYOUT.size}")
        return cls(*cls.LAYOUT.unpack(body))


@attrs.frozen
class FileStart(_FixedMessage):
    """s→r: the bytes of offer entry `index` follow, starting at `offset` (0 for now)."""

    TYPE: ClassVar[int] = 0x04
    WHAT: ClassVar[str] = "file start"
    LAYOUT: ClassVar[struct.Struct] = _FILE_START
    index: int
    offset: int = 0


@attrs.frozen
class Data:
    """s→r: raw bytes of the current file (1..32766 per record; up to MAX_BIG_DATA_SIZE
    under big-records).

    Senders should build these with `SenderSession.data_buffer` instead, which avoids
    copying; `encode` exists for tests and tools.
    """

    TYPE: ClassVar[int] = 0x05
    data: bytes | memoryview

    def encode(self) -> bytes:
        if not 1 <= len(self.data) <= MAX_DATA_SIZE:
            raise ValueError(f"a data message carries 1..{MAX_DATA_SIZE} bytes")
        return bytes([self.TYPE]) + bytes(self.data)

    @classmethod
    def decode(cls, body: memoryview) -> Data:
        if len(body) == 0:
            raise ProtocolError("data message is empty")
        return cls(body)


class _DigestMessage:
    """A type byte and a 32-byte blake3 digest (FILE_END and CHECK share the layout)."""

    TYPE: ClassVar[int]
    WHAT: ClassVar[str]
    digest: bytes

    def encode(self) -> bytes:
        if len(self.digest) != DIGEST_SIZE:
            raise ValueError(f"digest must be {DIGEST_SIZE} bytes")
        return bytes([self.TYPE]) + self.digest

    @classmethod
    def decode(cls, body: memoryview):
        if len(body) != DIGEST_SIZE:
            raise ProtocolError(f"{cls.WHAT} is {len(body)} bytes, expected {DIGEST_SIZE}")
        return cls(body)


@attrs.frozen
class FileEnd(_DigestMessage):
    """s→r: the current file is complete; `digest` is its blake3 over every byte sent."""

    TYPE: ClassVar[int] = 0x06
    WHAT: ClassVar[str] = "file end"
    digest: bytes = attrs.field(converter=bytes)


@attrs.frozen
class Done:
    """s→r: every offered file has been sent."""

    TYPE: ClassVar[int] = 0x07

    def encode(self) -> bytes:
        return bytes([self.TYPE])

    @classmethod
    def decode(cls, body: memoryview) -> Done:
        if len(body):
            raise ProtocolError("done has a body")
        return cls()


@attrs.frozen
class Ack(_FixedMessage):
    """r→s: everything is verified and in place; the counts let the sender cross-check."""

    TYPE: ClassVar[int] = 0x08
    WHAT: ClassVar[str] = "ack"
    LAYOUT: ClassVar[struct.Struct] = _ACK
    file_count: int
    total_bytes: int


@attrs.frozen
class Error:
    """Either way: the transfer is over, for this one-line reason; the sender then closes."""

    TYPE: ClassVar[int] = 0x09
    reason: str

    def encode(self) -> bytes:
        return bytes([self.TYPE]) + _reason_bytes(self.reason)

    @classmethod
    def decode(cls, body: memoryview) -> Error:
        return cls(_reason_text(body))


@attrs.frozen
class CompressedData:
    """s→r (feature zstd): a piece of one zstd frame of the current file; `more` pieces follow.

    The pieces of a frame are consecutive; the frame's rules are in peer/compression.py.
    """

    TYPE: ClassVar[int] = 0x0A
    more: bool
    chunk: bytes | memoryview

    def encode(self) -> bytes:
        if not 1 <= len(self.chunk) <= MAX_RECORD_SIZE - 2:
            raise ValueError("a compressed piece holds 1..32765 bytes")
        return bytes([self.TYPE, _OFFER_MORE if self.more else 0]) + bytes(self.chunk)

    @classmethod
    def decode(cls, body: memoryview) -> CompressedData:
        if len(body) < 2:
            raise ProtocolError("compressed piece is empty")
        flags = body[0]
        if flags & ~_OFFER_MORE:
            raise ProtocolError(f"compressed piece has unknown flags {flags:#04x}")
        return cls(bool(flags & _OFFER_MORE), body[1:])

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CompressedData)
            and self.more == other.more
            and bytes(self.chunk) == bytes(other.chunk)
        )


@attrs.frozen
class Check(_DigestMessage):
    """s→r (feature resume): the blake3 of the RESUME_CHUNK bytes of the file just sent."""

    TYPE: ClassVar[int] = 0x0B
    WHAT: ClassVar[str] = "check"
    digest: bytes = attrs.field(converter=bytes)


Message = Union[Hello, OfferPart, Answer, FileStart, Data, FileEnd, Done, Ack, Error, CompressedData, Check]
_MESSAGE_TYPES = {
    cls.TYPE: cls
    for cls in (Hello, OfferPart, Answer, FileStart, Data, FileEnd, Done, Ack, Error, CompressedData, Check)
}
_NAMES = {
    Hello: "hello",
    OfferPart: "offer",
    Answer: "answer",
    FileStart: "file start",
    Data: "data",
    FileEnd: "file end",
    Done: "done",
    Ack: "ack",
    Error: "error",
    CompressedData: "compressed data",
    Check: "check",
}


def decode_message(plaintext: bytes | bytearray | memoryview, *, big: bool = False) -> Message:
    """Parse one record plaintext. Raises ProtocolError, and nothing else, on bad input.

    A Data message's `data` is a view into `plaintext`, not a copy. With `big` (we offered
    big-records), a DATA message may be up to MAX_BIG_RECORD_SIZE bytes.
    """
    view = memoryview(plaintext)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if not 1 <= len(view) <= MAX_RECORD_SIZE:
        if not (big and MAX_RECORD_SIZE < len(view) <= MAX_BIG_RECORD_SIZE and view[0] == Data.TYPE):
            largest = MAX_BIG_RECORD_SIZE if big else MAX_RECORD_SIZE
            raise ProtocolError(f"message of {len(view)} bytes (must be 1..{largest}, "
                                f"and only DATA may be over {MAX_RECORD_SIZE})")
    kind = _MESSAGE_TYPES.get(view[0])
    if kind is None:
        if bytes(view[:4]) == b"PACK":
            raise ProtocolError("the peer sends bob's PACK stream, not peer-relay messages")
        raise ProtocolError(f"unknown message type {view[0]:#04x}")
    return kind.decode(view[1:])


# --- events --------------------------------------------------------------------------


@attrs.frozen
class HelloReceived:
    """Sender side: the receiver is a peer-relay peer; call `offer_messages()` next."""

    version: int
    capabilities: frozenset[str]


@attrs.frozen
class Accepted:
    """Sender side: the receiver accepted; start sending files."""


@attrs.frozen
class Declined:
    """Sender side: the receiver said no (`reason` may be empty). The session is over."""

    reason: str


@attrs.frozen
class Completed:
    """Sender side: the receiver confirmed every file and byte. Exit 0 after this only."""

    file_count: int
    total_bytes: int


@attrs.frozen
class OfferReceived:
    """Receiver side: show the offer, plan the destination, then `accept()` or `decline()`."""

    offer: Offer


@attrs.frozen
class FileStarted:
    """Receiver side: bytes of `entry` follow from `offset` (a resume point, else 0); open its
    temporary file."""

    entry: OfferEntry
    offset: int = 0


@attrs.frozen
class FileData:
    """Receiver side: the next bytes of the current file, a view valid until the next record."""

    entry: OfferEntry
    data: memoryview


@attrs.frozen
class ChunkChecked:
    """Receiver side (resume): the chunk ending at `offset` should hash to `digest`; verify it,
    make it durable, and journal it."""

    entry: OfferEntry
    offset: int
    digest: bytes


@attrs.frozen
class FileFinished:
    """Receiver side: the file is complete; verify it against `digest` and commit it."""

    entry: OfferEntry
    digest: bytes


@attrs.frozen
class TransferDone:
    """Receiver side: everything was sent; after every commit succeeded, `acknowledge()`."""

    file_count: int
    total_bytes: int


@attrs.frozen
class PeerError:
    """Either side: the peer gave up, for this (printable, one-line) reason."""

    reason: str


SenderEvent = Union[HelloReceived, Accepted, Declined, Completed, PeerError]
ReceiverEvent = Union[OfferReceived, FileStarted, FileData, ChunkChecked, FileFinished, TransferDone, PeerError]


# --- state machines ------------------------------------------------------------------


class _Sender(enum.Enum):
    WAIT_HELLO = "waiting for the receiver's hello"
    HELLO_RECEIVED = "about to send the offer"
    WAIT_ANSWER = "waiting for the receiver's answer"
    SENDING = "between files"
    IN_FILE = "inside a file"
    WAIT_ACK = "waiting for the receiver's acknowledgement"
    PACK = "sending bob's PACK"
    PACK_GREETED = "sending bob's PACK to a peer-relay receiver"
    FINISHED = "finished"
    DECLINED = "declined"
    FAILED = "failed"


class _Receiver(enum.Enum):
    NEW = "not started"
    WAIT_OFFER = "waiting for the offer"
    DECIDING = "deciding on the offer"
    RECEIVING = "between files"
    IN_FILE = "inside a file"
    DONE_RECEIVED = "about to acknowledge"
    FINISHED = "finished"
    DECLINED = "declined"
    FAILED = "failed"


def _resume_problem(offer: Offer, points: Iterable[tuple[int, int]]) -> str | None:
    """Why these resume points are not acceptable for `offer`, or None."""
    seen: set[int] = set()
    for index, offset in points:
        if index in seen:
            return f"entry {index} is resumed twice"
        seen.add(index)
        entry = offer.entries[index] if 0 <= index < len(offer.entries) else None
        if entry is None or not entry.is_file or entry.size is None or entry.file_id is None:
            return f"entry {index} cannot be resumed"
        if not 0 < offset <= entry.size or (offset % RESUME_CHUNK and offset != entry.size):
            return f"{entry.path} cannot be resumed at byte {offset}"
    return None


class _Position:
    """Where a file stands under resume: a CHECK is due at each RESUME_CHUNK boundary."""

    def __init__(self, start: int, checking: bool) -> None:
        self.offset = start
        self.checking = checking
        self._checked = start

    @property
    def check_due(self) -> bool:
        return self.checking and self.offset != self._checked and self.offset % RESUME_CHUNK == 0

    def room(self) -> int | None:
        """Bytes until the next boundary (None when not checking)."""
        if not self.checking:
            return None
        return RESUME_CHUNK - self.offset % RESUME_CHUNK

    def checked(self) -> None:
        self._checked = self.offset


def _check_features(features: Iterable[str]) -> frozenset[str]:
    result = frozenset(features)
    for name in result:
        if not isinstance(name, str) or not _CAPABILITY.fullmatch(name):
            raise ValueError(f"invalid feature name {name!r}")
    return result


class SenderSession:
    """The sender's half of the data phase.

    Order of calls for the driver::

        receive(hello) -> HelloReceived;  send each of offer_messages()
        receive(answer) -> Accepted | Declined
        while (entry := next_file()) is not None:
            send(begin_file(entry))
            while file_remaining:
                count = source.readinto(data_buffer())
                send(data_message(count))        # a view: seal it before reading again
            send(end_file(source_digest))
        send(done());  receive(ack) -> Completed

    or, when no hello came in time (bob's receiver says nothing)::

        fall_back_to_pack();  send bob's PACK
        receive(...) -> HelloReceived (a late hello: the receiver is ours), then Completed
        on a close: a confirmation only if not `pack_needs_ack`, and then an unconfirmed one

    `receive` may also return PeerError at any time (run it concurrently while
    sending); after that, or after `error()`, the session is over. Bad input raises
    ProtocolError; calls out of order raise RuntimeError (a driver bug).

    `public` is the spoke public we announced: a hello that carries the digest of another
    one raises HandshakeAltered.
    """

    def __init__(self, offer: Offer, *, features: Iterable[str] = (), public: bytes | None = None) -> None:
        self.offer = offer
        self._supported = _check_features(features)
        self._public = None if public is None else bytes(public)
        self.features: frozenset[str] = frozenset()
        """What both sides agreed to use, known once the hello has arrived."""
        self.hello: Hello | None = None
        """The receiver's hello, once it came (on time, or late while we sent a PACK)."""
        self.version = PROTOCOL_VERSION
        self._state = _Sender.WAIT_HELLO
        self._failure: ProtocolError | None = None
        self._file_indices = [i for i, entry in enumerate(offer.entries) if entry.is_file]
        self._next_position = 0
        self._current: OfferEntry | None = None
        self._remaining: int | None = 0
        self._unsized_bytes = 0
        self._resume_at: dict[int, int] = {}
        self._position = _Position(0, False)
        # One record-sized buffer reused for every DATA message: the file is read
        # straight into it after the type byte, and the sealer reads it from there.
        self._max_data = MAX_DATA_SIZE
        self._buffer = bytearray(MAX_RECORD_SIZE)
        self._buffer[0] = Data.TYPE
        self._view = memoryview(self._buffer)

    @property
    def finished(self) -> bool:
        """True when the session can do nothing more (completed, declined or failed)."""
        return self._state in (_Sender.FINISHED, _Sender.DECLINED, _Sender.FAILED)

    @property
    def succeeded(self) -> bool:
        """True only after the receiver's ACK matched what was sent."""
        return self._state is _Sender.FINISHED

    def _expect(self, *states: _Sender) -> None:
        if self._state not in states:
            raise RuntimeError(f"not allowed while the sender session is {self._state.value}")

    def receive(self, plaintext: bytes | memoryview) -> SenderEvent:
        """Handle one record from the receiver."""
        if self._failure is not None:
            raise self._failure
        if self.finished:
            raise self._fail("the receiver sent a message after the transfer ended")
        try:
            message = decode_message(plaintext)
        except ProtocolError as exc:
            if self._state is _Sender.WAIT_HELLO:
                raise self._fail(f"the receiver is not a peer-relay peer ({exc})") from None
            raise self._fail(str(exc)) from None
        if isinstance(message, Error):
            self._state = _Sender.FAILED
            return PeerError(message.reason)
        state = self._state
        if state is _Sender.WAIT_HELLO and isinstance(message, Hello):
            return self._on_hello(message)
        if state is _Sender.PACK and isinstance(message, Hello):
            greeted = self._on_hello(message)
            self._state = _Sender.PACK_GREETED
            return greeted
        if state is _Sender.PACK_GREETED and isinstance(message, Ack) and PACK_ACK in self.hello.capabilities:
            return self._on_ack(message)
        if state is _Sender.WAIT_ANSWER and isinstance(message, Answer):
            return self._on_answer(message)
        if state is _Sender.WAIT_ACK and isinstance(message, Ack):
            return self._on_ack(message)
        raise self._fail(f"the receiver sent {_NAMES[type(message)]} while the sender was {state.value}")

    def _fail(self, reason: str) -> ProtocolError:
        self._state = _Sender.FAILED
        self._failure = ProtocolError(reason)
        return self._failure

    def _on_hello(self, hello: Hello) -> HelloReceived:
        if hello.version < 1:
            raise self._fail(f"the receiver speaks version {hello.version}, this sender needs 1")
        if (hello.public_digest is not None and self._public is not None
                and hello.public_digest != public_digest(self._public)):
            self._state = _Sender.FAILED
            self._failure = HandshakeAltered(
                "the relay altered the handshake: the receiver was announced other sender "
                "parameters than we sent (cipher ids rewritten on the way)"
            )
            raise self._failure
        self.hello = hello
        self.version = min(hello.version, PROTOCOL_VERSION)
        self.features = self._supported & frozenset(hello.capabilities)
        if BIG_RECORDS in self.features:
            # The sealer must be told too: see `big_records`.
            self._max_data = MAX_BIG_DATA_SIZE
            self._buffer = bytearray(MAX_BIG_RECORD_SIZE)
            self._buffer[0] = Data.TYPE
            self._view = memoryview(self._buffer)
        self._state = _Sender.HELLO_RECEIVED
        return HelloReceived(hello.version, frozenset(hello.capabilities))

    def _on_answer(self, answer: Answer) -> Accepted | Declined:
        if not answer.accepted:
            self._state = _Sender.DECLINED
            return Declined(answer.reason)
        if answer.resume_points:
            if RESUME not in self.features:
                raise self._fail("the receiver asked to resume files, which was not negotiated")
            problem = _resume_problem(self.offer, answer.resume_points)
            if problem:
                raise self._fail(f"the receiver asked to resume wrongly: {problem}")
            self._resume_at = dict(answer.resume_points)
        self._state = _Sender.SENDING
        return Accepted()

    def _on_ack(self, ack: Ack) -> Completed:
        total = self.offer.total_bytes + self._unsized_bytes
        if (ack.file_count, ack.total_bytes) != (self.offer.file_count, total):
            raise self._fail(
                f"the receiver confirmed {ack.file_count} files and {ack.total_bytes} bytes, "
                f"but {self.offer.file_count} files and {total} bytes were sent"
            )
        self._state = _Sender.FINISHED
        return Completed(ack.file_count, ack.total_bytes)

    def fall_back_to_pack(self) -> None:
        """No hello came in time: we send bob's PACK instead of an offer. Our receiver reads
        that too, and if its hello was only late, it still arrives (see `pack_needs_ack`)."""
        self._expect(_Sender.WAIT_HELLO)
        self._state = _Sender.PACK

    @property
    def pack_needs_ack(self) -> bool:
        """After a PACK: the receiver turned out ours and promised an ACK (pack-ack), so its
        close alone confirms nothing. Without its hello the receiver may be bob, whose
        close after the whole PACK is all it ever says; an older receiver of ours said
        hello but cannot confirm a PACK either."""
        return self._state is _Sender.PACK_GREETED and PACK_ACK in self.hello.capabilities

    @property
    def missing_features(self) -> frozenset[str]:
        """What the offer needs that the receiver did not advertise (known after its hello).

        Not empty means the offer cannot be sent: tell the user (and the receiver) why.
        """
        return self.offer.needed_features() - self.features

    def offer_messages(self) -> list[bytes]:
        """The OFFER records, after the hello: as many as the JSON needs."""
        self._expect(_Sender.HELLO_RECEIVED)
        if self.missing_features:
            raise TransferError(f"the receiver lacks {', '.join(sorted(self.missing_features))}")
        document = self.offer.to_json(version=self.version, features=self.features, with_ids=RESUME in self.features)
        if len(document) > MAX_OFFER_BYTES:
            raise TransferError(
                f"the offer is {format_size(len(document))}, over the {format_size(MAX_OFFER_BYTES)} limit; "
                "send fewer files at once"
            )
        step = MAX_RECORD_SIZE - 2
        pieces = [document[i : i + step] for i in range(0, len(document), step)]
        self._state = _Sender.WAIT_ANSWER
        return [OfferPart(i < len(pieces) - 1, piece).encode() for i, piece in enumerate(pieces)]

    def next_file(self) -> OfferEntry | None:
        """The next file entry to send, or None when all are sent (then call `done()`)."""
        self._expect(_Sender.SENDING)
        if self._next_position == len(self._file_indices):
            return None
        return self.offer.entries[self._file_indices[self._next_position]]

    def start_offset(self, entry: OfferEntry) -> int:
        """Where `entry` starts: the receiver's resume point for it, else 0. Seek there."""
        if entry != self.next_file():
            raise RuntimeError(f"{entry.path} is not the next file to send")
        return self._resume_at.get(self._file_indices[self._next_position], 0)

    @property
    def resuming(self) -> bool:
        """True when CHECKs are due (resume was negotiated): read with chunk digests."""
        return RESUME in self.features

    def begin_file(self, entry: OfferEntry) -> bytes:
        """The FILE message for `entry`, which must be `next_file()`."""
        if entry != self.next_file():
            raise RuntimeError(f"{entry.path} is not the next file to send")
        index = self._file_indices[self._next_position]
        start = self._resume_at.get(index, 0)
        self._current = entry
        self._remaining = None if entry.size is None else entry.size - start
        self._position = _Position(start, self.resuming and entry.size is not None)
        self._state = _Sender.IN_FILE
        return FileStart(index, start).encode()

    @property
    def check_due(self) -> bool:
        """A RESUME_CHUNK boundary was reached: send `check(chunk digest)` before anything else."""
        return self._state is _Sender.IN_FILE and self._position.check_due

    def check(self, digest: bytes) -> bytes:
        """The CHECK message for the chunk that just ended."""
        self._expect(_Sender.IN_FILE)
        if not self._position.check_due:
            raise RuntimeError("no chunk boundary was reached")
        self._position.checked()
        return Check(digest).encode()

    @property
    def file_remaining(self) -> int | None:
        """Bytes of the current file still to send; None while sending a file of unknown size."""
        return self._remaining if self._state is _Sender.IN_FILE else 0

    @property
    def big_records(self) -> bool:
        """Whether DATA messages may be big: the channel's sealer must then allow them."""
        return BIG_RECORDS in self.features

    def _room(self, limit: int | None = None) -> int:
        if limit is None:
            limit = self._max_data
        if self._position.check_due:
            raise RuntimeError("a CHECK is due first")
        room = limit if self._remaining is None else min(limit, self._remaining)
        boundary = self._position.room()
        return room if boundary is None else min(room, boundary)

    def data_buffer(self) -> memoryview:
        """Where to read the next piece of the current file (at most its remaining size, and
        never across a RESUME_CHUNK boundary under resume)."""
        self._expect(_Sender.IN_FILE)
        return self._view[1 : 1 + self._room()]

    def data_message(self, count: int) -> memoryview:
        """The DATA message for the `count` bytes just read into `data_buffer()`.

        The result shares the buffer: seal or copy it before the next `data_buffer()`.
        """
        self._expect(_Sender.IN_FILE)
        if not 1 <= count <= self._room():
            raise ValueError(f"{count} bytes do not fit the data buffer ({self._remaining} remaining)")
        self._sent(count)
        return self._view[: 1 + count]

    def compressed_messages(self, frame: bytes, content_size: int) -> list[bytes]:
        """The ZDATA messages carrying `frame`, one zstd frame of `content_size` bytes of the file.

        Only when zstd was negotiated; the frame comes from `compression.compress_block`.
        """
        self._expect(_Sender.IN_FILE)
        if ZSTD not in self.features:
            raise RuntimeError("zstd was not negotiated")
        if not 1 <= content_size <= self._room(compression.FRAME_CONTENT):
            raise ValueError(f"a frame of {content_size} bytes does not fit ({self._remaining} remaining)")
        if not 1 <= len(frame) <= compression.MAX_FRAME_BYTES:
            raise ValueError(f"a frame of {len(frame)} compressed bytes is out of bounds")
        self._sent(content_size)
        step = MAX_RECORD_SIZE - 2
        last = (len(frame) - 1) // step
        return [
            CompressedData(i < last, frame[i * step : (i + 1) * step]).encode() for i in range(last + 1)
        ]

    def _sent(self, count: int) -> None:
        self._position.offset += count
        if self._remaining is None:
            self._unsized_bytes += count
        else:
            self._remaining -= count

    def end_file(self, digest: bytes) -> bytes:
        """The FILE_END message, once every byte of the file is sent."""
        self._expect(_Sender.IN_FILE)
        if self._remaining:
            raise RuntimeError(f"{self._current.path}: {self._remaining} bytes not sent yet")
        if self._position.check_due:
            raise RuntimeError("a CHECK is due first")
        message = FileEnd(digest).encode()
        self._current = None
        self._next_position += 1
        self._state = _Sender.SENDING
        return message

    def done(self) -> bytes:
        """The DONE message, after the last file; then wait for the ACK."""
        if self.next_file() is not None:
            raise RuntimeError("files are left to send")
        self._state = _Sender.WAIT_ACK
        return Done().encode()

    def error(self, reason: str) -> bytes:
        """An ERROR message telling the receiver why we stop; the session is over."""
        self._state = _Sender.FAILED
        return Error(reason).encode()


class ReceiverSession:
    """The receiver's half of the data phase.

    Order of calls for the driver::

        send(hello())
        receive(...) -> None (more offer pieces) ... -> OfferReceived
        send(accept())   or   send(decline(reason)) and stop
        receive(...) -> FileStarted | FileData | FileFinished, per file, then TransferDone
        send(acknowledge())   # only once every file is committed

    If the sender sends bob's PACK instead (it did not get our hello in time), the driver
    reads that and, with the feature pack-ack, sends `acknowledge_pack(...)` once it is
    verified and in place, or `error(reason)`.

    `sender_public` is the spoke public we were announced: the hello carries its digest.

    `receive` returns PeerError if the sender gives up. Anything the sender does wrong
    (order, sizes, malformed messages) raises ProtocolError, the only exception bad
    input can cause; send `error(str(exc))` and stop. Calls out of order raise
    RuntimeError (a driver bug).
    """

    def __init__(self, *, features: Iterable[str] = (), sender_public: bytes | None = None) -> None:
        self._supported = _check_features(features)
        self._public_digest = None if sender_public is None else public_digest(sender_public)
        self.features: frozenset[str] = frozenset()
        """What the sender chose to use, known once the offer has arrived."""
        self.offer: Offer | None = None
        self._state = _Receiver.NEW
        self._failure: ProtocolError | None = None
        self._offer_buffer = bytearray()
        self._file_indices: list[int] = []
        self._next_position = 0
        self._current: OfferEntry | None = None
        self._remaining: int | None = 0
        self._unsized_bytes = 0
        """Bytes received for files of unknown size: they count in the ACK's total."""
        self._frame = bytearray()
        """The compressed frame being gathered, piece by piece (feature zstd)."""
        self._resume_at: dict[int, int] = {}
        self._position = _Position(0, False)
        self._big = BIG_RECORDS in self._supported

    @property
    def finished(self) -> bool:
        """True when the session can do nothing more (acknowledged, declined or failed)."""
        return self._state in (_Receiver.FINISHED, _Receiver.DECLINED, _Receiver.FAILED)

    def _expect(self, *states: _Receiver) -> None:
        if self._state not in states:
            raise RuntimeError(f"not allowed while the receiver session is {self._state.value}")

    def _fail(self, reason: str) -> ProtocolError:
        self._state = _Receiver.FAILED
        self._failure = ProtocolError(reason)
        return self._failure

    @property
    def big_records(self) -> bool:
        """Whether we offer big records: the channel's opener must then accept them."""
        return self._big

    def hello(self) -> bytes:
        """Our first message, sent as soon as the secure room opens."""
        self._expect(_Receiver.NEW)
        self._state = _Receiver.WAIT_OFFER
        return Hello(PROTOCOL_VERSION, sorted(self._supported), self._public_digest).encode()

    def receive(self, plaintext: bytes | memoryview) -> ReceiverEvent | None:
        """Handle one record from the sender; None means "nothing to do yet"."""
        if self._failure is not None:
            raise self._failure
        if self._state is _Receiver.NEW:
            raise RuntimeError("send hello() before receiving")
        if self.finished:
            raise self._fail("the sender sent a message after the transfer ended")
        try:
            message = decode_message(plaintext, big=self._big)
        except ProtocolError as exc:
            raise self._fail(str(exc)) from None
        if isinstance(message, Error):
            self._state = _Receiver.FAILED
            return PeerError(message.reason)
        state = self._state
        if state is _Receiver.WAIT_OFFER and isinstance(message, OfferPart):
            return self._on_offer_part(message)
        if state is _Receiver.RECEIVING and isinstance(message, FileStart):
            return self._on_file_start(message)
        if state is _Receiver.RECEIVING and isinstance(message, Done):
            return self._on_done()
        if self._frame and not isinstance(message, CompressedData):
            raise self._fail(f"the sender sent {_NAMES[type(message)]} inside a compressed frame")
        if state is _Receiver.IN_FILE and self._position.check_due:
            if not isinstance(message, Check):
                raise self._fail(f"the sender sent {_NAMES[type(message)]} where a check was due")
            self._position.checked()
            return ChunkChecked(self._current, self._position.offset, message.digest)
        if state is _Receiver.IN_FILE and isinstance(message, Data):
            return self._on_data(message)
        if state is _Receiver.IN_FILE and isinstance(message, CompressedData) and ZSTD in self.features:
            return self._on_compressed(message)
        if state is _Receiver.IN_FILE and isinstance(message, FileEnd):
            return self._on_file_end(message)
        raise self._fail(f"the sender sent {_NAMES[type(message)]} while the receiver was {state.value}")

    def _on_offer_part(self, part: OfferPart) -> OfferReceived | None:
        if len(self._offer_buffer) + len(part.chunk) > MAX_OFFER_BYTES:
            raise self._fail(f"the offer is larger than {format_size(MAX_OFFER_BYTES)}")
        self._offer_buffer += part.chunk
        if part.more:
            return None
        try:
            offer, version, features = Offer.from_json(self._offer_buffer)
        except ProtocolError as exc:
            raise self._fail(str(exc)) from None
        self._offer_buffer = bytearray()
        if version != PROTOCOL_VERSION:
            raise self._fail(f"the sender uses version {version}, this receiver speaks {PROTOCOL_VERSION}")
        if not features <= self._supported:
            unknown = ", ".join(sorted(features - self._supported))
            raise self._fail(f"the sender uses features this receiver did not offer: {unknown}")
        if not offer.needed_features() <= features:
            missing = ", ".join(sorted(offer.needed_features() - features))
            raise self._fail(f"the offer needs features the sender did not choose: {missing}")
        self.offer = offer
        self.features = features
        self._file_indices = [i for i, entry in enumerate(offer.entries) if entry.is_file]
        self._state = _Receiver.DECIDING
        return OfferReceived(offer)

    def _on_file_start(self, start: FileStart) -> FileStarted:
        if self._next_position == len(self._file_indices):
            raise self._fail("the sender started a file after the last offered one")
        expected = self._file_indices[self._next_position]
        if start.index != expected:
            raise self._fail(f"the sender started entry {start.index}, expected entry {expected}")
        wanted = self._resume_at.get(expected, 0)
        if start.offset != wanted:
            if not self._resume_at:
                raise self._fail("the sender resumed a file, which was not asked for")
            raise self._fail(f"the sender started entry {expected} at byte {start.offset}, not {wanted}")
        self._current = self.offer.entries[expected]
        size = self._current.size
        self._remaining = None if size is None else size - wanted
        self._position = _Position(wanted, RESUME in self.features and size is not None)
        self._state = _Receiver.IN_FILE
        return FileStarted(self._current, wanted)

    def _on_data(self, data: Data) -> FileData:
        self._count(len(data.data))
        return FileData(self._current, data.data)

    def _on_compressed(self, piece: CompressedData) -> FileData | None:
        if len(self._frame) + len(piece.chunk) > compression.MAX_FRAME_BYTES:
            raise self._fail(f"{self._current.path}: a compressed frame is over {compression.MAX_FRAME_BYTES} bytes")
        self._frame += piece.chunk
        if piece.more:
            return None
        frame, self._frame = self._frame, bytearray()
        try:
            content = compression.inflate_frame(frame, self._remaining)
        except compression.CompressionError as exc:
            raise self._fail(f"{self._current.path}: {exc}") from None
        self._count(len(content))
        return FileData(self._current, memoryview(content))

    def _count(self, size: int) -> None:
        boundary = self._position.room()
        if boundary is not None and size > boundary:
            raise self._fail(f"{self._current.path}: the sender ran past a check point")
        self._position.offset += size
        if self._remaining is None:
            self._unsized_bytes += size
            return
        if size > self._remaining:
            raise self._fail(f"{self._current.path}: the sender sent more bytes than offered")
        self._remaining -= size

    def _on_file_end(self, end: FileEnd) -> FileFinished:
        entry = self._current
        if self._remaining:  # None (size unknown) ends whenever the sender says so
            raise self._fail(
                f"{entry.path}: the sender ended the file after {entry.size - self._remaining} "
                f"of {entry.size} bytes"
            )
        self._current = None
        self._next_position += 1
        self._state = _Receiver.RECEIVING
        return FileFinished(entry, end.digest)

    def _on_done(self) -> TransferDone:
        if self._next_position != len(self._file_indices):
            raise self._fail(
                f"the sender finished after {self._next_position} of {len(self._file_indices)} files"
            )
        self._state = _Receiver.DONE_RECEIVED
        return TransferDone(self.offer.file_count, self.offer.total_bytes + self._unsized_bytes)

    def accept(self, resume_points: dict[int, int] | None = None) -> bytes:
        """ANSWER accepting the offer (after planning the destination).

        `resume_points` maps offer entry indices to the bytes already verified here
        (feature resume); the sender then starts those files there.
        """
        self._expect(_Receiver.DECIDING)
        points = sorted((resume_points or {}).items())
        if points:
            if RESUME not in self.features:
                raise RuntimeError("resume was not negotiated")
            problem = _resume_problem(self.offer, points)
            if problem:
                raise ValueError(problem)
        self._resume_at = dict(points)
        self._state = _Receiver.RECEIVING
        return Answer(True, "", points).encode()

    def decline(self, reason: str = "") -> bytes:
        """ANSWER declining the offer; the session is over."""
        self._expect(_Receiver.DECIDING)
        self._state = _Receiver.DECLINED
        return Answer(False, reason).encode()

    def acknowledge(self) -> bytes:
        """The ACK: call it only once every file is verified and renamed into place."""
        self._expect(_Receiver.DONE_RECEIVED)
        self._state = _Receiver.FINISHED
        return Ack(self.offer.file_count, self.offer.total_bytes + self._unsized_bytes).encode()

    def acknowledge_pack(self, file_count: int, total_bytes: int) -> bytes:
        """The ACK of bob's PACK, which came instead of an offer: call it only once the PACK's
        trailer matched and every file is in place (feature pack-ack)."""
        self._expect(_Receiver.WAIT_OFFER)
        if PACK_ACK not in self._supported:
            raise RuntimeError("pack-ack was not offered")
        self._state = _Receiver.FINISHED
        return Ack(file_count, total_bytes).encode()

    def error(self, reason: str) -> bytes:
        """An ERROR message telling the sender why we stop; the session is over."""
        self._state = _Receiver.FAILED
        return Error(reason).encode()
