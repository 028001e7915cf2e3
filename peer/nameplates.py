"""Nameplates: the public number a code starts with, and the scoped rendezvous it allows.

A code like ``417-cobalt-lemon-unicycle`` has the nameplate 417 (docs/protocol.md §10). Our
sender writes it big-endian into the first two bytes of its spoke salt; our receiver registers
with packet 10 (Hello_as_a_scoped_client) so that the relay announces only the senders of that
nameplate, and it still filters announcements by salt itself, since a relay may announce more.

bob's relay does not know packet 10: it stops reading a connection at an unknown type and
neither answers nor closes it. So a receiver that gets no 03 within ``SCOPED_PATIENCE`` of its
10, or whose connection ends before 03, registers again with 01 on a new connection (the old
one may be deaf). ``ScopedRegistration`` keeps that decision sans-I/O: the driver reports the
clock and lost connections and carries out the reconnection it is told to.
"""

from __future__ import annotations

import enum
import os

from relay import wire

from . import spoke

__all__ = [
    "MAX_NAMEPLATE",
    "SCOPED_PATIENCE",
    "ScopedRegistration",
    "nameplate_of",
    "salt_for",
    "salt_matches",
]

MAX_NAMEPLATE = 0xFFFF
SCOPED_PATIENCE = 3.0
"""Seconds a receiver waits for the relay's 03 after a scoped Hello (10) before it falls back
to a plain one (01) on a new connection: a relay that knows 10 answers at once."""

_NAMEPLATE_DIGITS = 5
_NAMEPLATE_SIZE = 2
_SALT_OFFSET = spoke.PUBLIC_SIZE - spoke.SALT_SIZE
"""Where the salt starts in an encoded public (the raw 04 body is filtered before decoding)."""


def nameplate_of(password: bytes) -> int | None:
    """The public number a code starts with (``417-...`` → 417), or None for other passwords.

    One to five ASCII digits, a dash, then anything; the value must fit the two salt bytes.
    """
    dash = password.find(b"-")
    if not 1 <= dash <= _NAMEPLATE_DIGITS:
        return None
    digits = password[:dash]
    if not all(0x30 <= c <= 0x39 for c in digits):
        return None
    value = int(digits)
    return value if value <= MAX_NAMEPLATE else None


def salt_for(nameplate: int | None) -> bytes:
    """A fresh spoke salt, led by the nameplate (big-endian) when there is one."""
    if nameplate is None:
        return os.urandom(spoke.SALT_SIZE)
    prefix = nameplate.to_bytes(_NAMEPLATE_SIZE, "big")
    return prefix + os.urandom(spoke.SALT_SIZE - _NAMEPLATE_SIZE)


def salt_matches(public: bytes, nameplate: int) -> bool:
    """Whether an encoded public (a 04's raw bytes) carries ``nameplate`` in its salt."""
    start = _SALT_OFFSET
    return public[start : start + _NAMEPLATE_SIZE] == nameplate.to_bytes(_NAMEPLATE_SIZE, "big")


class Stage(enum.Enum):
    SCOPED = enum.auto()  # 10 sent, no 03 yet: the deadline runs
    FALLING_BACK = enum.auto()  # the driver must open a new connection and call reconnected()
    PLAIN = enum.auto()  # 01 sent (no nameplate, or after falling back)
    REGISTERED = enum.auto()  # 03 came


class ScopedRegistration:
    """Which Hello a receiver sends, and when it gives up on the scoped one.

    ``hello`` gives the first Hello; ``registered`` is called on 03; ``expired(now)`` and
    ``lost()`` say whether the receiver must fall back (True once, then the driver reconnects
    and ``plain_hello`` gives the 01 for the new connection).
    """

    def __init__(self, nameplate: int | None, *, scoped: bool = True) -> None:
        self.nameplate = nameplate
        self._scoped = scoped and nameplate is not None
        self.stage: Stage | None = None
        self.deadline: float | None = None
        self.fell_back = False
        """True once a scoped Hello went unanswered and the receiver registered plainly."""

    @property
    def scoped(self) -> bool:
        """True when the relay accepted our scoped Hello (03 after 10)."""
        return self.stage is Stage.REGISTERED and not self.fell_back and self._scoped

    @property
    def awaiting_reconnection(self) -> bool:
        return self.stage is Stage.FALLING_BACK

    def hello(self, now: float) -> wire.Packet:
        if not self._scoped:
            self.stage = Stage.PLAIN
            return wire.HelloClient()
        assert self.nameplate is not None
        self.stage = Stage.SCOPED
        self.deadline = now + SCOPED_PATIENCE
        return wire.HelloScopedClient(self.nameplate)

    def registered(self) -> None:
        self.stage = Stage.REGISTERED
        self.deadline = None

    def expired(self, now: float) -> bool:
        """True (once) when the scoped Hello's deadline has passed without a 03."""
        if self.stage is not Stage.SCOPED or self.deadline is None or now < self.deadline:
            return False
        return self._fall_back()

    def lost(self) -> bool:
        """The connection ended: True when that calls for a plain Hello on a new one."""
        if self.stage is not Stage.SCOPED:
            return False
        return self._fall_back()

    def _fall_back(self) -> bool:
        self.stage = Stage.FALLING_BACK
        self.deadline = None
        self.fell_back = True
        return True

    def plain_hello(self) -> wire.Packet:
        if self.stage is not Stage.FALLING_BACK:
            raise RuntimeError("reconnected() without a ReconnectPlain to answer")
        self.stage = Stage.PLAIN
        return wire.HelloClient()
