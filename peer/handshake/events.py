"""What both handshake machines emit (their events), their limits, and what they share:
start-once, the terminal state and the relay's goodbyes (see ``peer.handshake``)."""

from __future__ import annotations

import enum
from typing import Union

import attrs

from peer import spoke
from relay import wire

DEFAULT_MAX_ATTEMPTS = 3
"""Failed handshakes a sender allows, and failed proofs from senders a receiver allows."""
SENDERS_PER_ATTEMPT = 10
"""A receiver answers at most this many senders per allowed failed proof, in all."""
DEFAULT_GRACE = 2.0
"""Seconds a receiver whose code was rejected waits for another sender before giving up."""
COSTLY_PATIENCE = 2.0
"""Seconds a receiver lets a handshake in flight go quiet before it answers a costly sender."""

RELAY_CLOSED_REASON = "the relay closed the connection"


@attrs.frozen
class SendFrame:
    """Write this frame to the relay; ``frame.uid`` is the destination (0000 = the relay)."""

    frame: wire.Frame


@attrs.frozen
class Registered:
    """The relay accepted us and told us our identity (the address it sees)."""

    identity: bytes


@attrs.frozen
class ReconnectPlain:
    """Receiver only: the relay did not take our scoped Hello (10). Close this connection,
    open a new one, then call ``reconnected``; ``reason`` is for a debug log."""

    reason: str


@attrs.frozen(kw_only=True)
class Verified:
    """Sender only, informational: a receiver proved it has the code; its user must now accept."""

    partner_uid: int
    partner_identity: bytes


@attrs.frozen(kw_only=True)
class Agreed:
    """Receiver only: a sender proved it has the code. Answer with ``accept`` or ``refuse``."""

    partner_uid: int
    partner_identity: bytes
    keys: spoke.SharedKeys
    public: spoke.Public | None = None
    """The sender's public as announced to us; only its salt and iterations are bound by the
    keys (its cipher ids are not: a relay may have rewritten them)."""


@attrs.frozen(kw_only=True)
class AgreementWithdrawn:
    """Receiver only: an agreed sender left before the deal was done; drop any prompt for it."""

    partner_uid: int
    partner_identity: bytes


@attrs.frozen(kw_only=True)
class Declined:
    """Sender only, informational: an agreed receiver's user refused us; we keep waiting."""

    partner_uid: int
    partner_identity: bytes


class AttemptKind(enum.StrEnum):
    """How a sender's failed handshake ended (see the module docstring)."""

    WRONG_CODE = "wrong_code"
    """The receiver showed it holds another code: a typo, or a wrong guess."""
    ABANDONED = "abandoned"
    """The receiver took our proof (06) and broke off without proving anything."""


@attrs.frozen(kw_only=True)
class AttemptFailed:
    """Sender only: a handshake ended without agreement, which spent one guess of the code."""

    reason: str
    partner_identity: bytes
    attempts_used: int
    attempts_allowed: int
    kind: AttemptKind


@attrs.frozen(kw_only=True)
class ProofFailed:
    """Receiver only: a sender's proof (06) did not match our code, one guess of it."""

    partner_identity: bytes
    failures: int
    failures_allowed: int


@attrs.frozen(kw_only=True)
class Paired:
    """Terminal: the handshake is done; go to the secure room with ``partner_identity``."""

    partner_uid: int
    partner_identity: bytes
    keys: spoke.SharedKeys
    ciphers: tuple[int, int]
    public: spoke.Public | None = None
    """The sender's public: the one we sent (sender), or the one announced to us (receiver)."""


class FailureKind(enum.StrEnum):
    """Why a handshake ended without pairing (compares equal to its string value)."""

    WRONG_CODE = "wrong_code"
    GUESSING_LIMIT = "guessing_limit"
    SENDER_LIMIT = "sender_limit"
    """Receiver only: it answered as many senders as it will, and none proved the code."""
    RELAY_CLOSED = "relay_closed"


@attrs.frozen
class Failed:
    """Terminal: the handshake cannot succeed on this connection; ``reason`` is for the user."""

    reason: str
    kind: FailureKind


Event = Union[
    SendFrame, Registered, ReconnectPlain, Verified, Agreed, AgreementWithdrawn, Declined, AttemptFailed,
    ProofFailed, Paired, Failed,
]


def _send(uid: int, packet: wire.Packet) -> SendFrame:
    return SendFrame(wire.Frame(uid, packet))


class _Machine:
    """What both roles share: start-once, the terminal state, and the relay's goodbyes."""

    def __init__(self) -> None:
        self._started = False
        self._finished = False

    @property
    def finished(self) -> bool:
        """True once Paired or Failed was emitted; every later input is ignored."""
        return self._finished

    def _start(self, hello: wire.Packet) -> list[Event]:
        if self._started:
            raise RuntimeError("start() was already called")
        self._started = True
        return [_send(wire.RELAY_UID, hello)]

    def _finish(self, event: Paired | Failed) -> list[Event]:
        self._finished = True
        return [event]

    def connection_lost(self, reason: str, now: float) -> list[Event]:
        """The driver lost the relay connection (closed, broken or garbled); ``reason`` is
        for the user if this ends the handshake."""
        if self.finished:
            return []
        return self._finish(Failed(reason, FailureKind.RELAY_CLOSED))

    def _relay_goodbye(self, frame: wire.Frame) -> list[Event] | None:
        """Failed for 0f or 09 0000; None when the frame is something else.

        Relay-only packets count only with UID 0000: through bob's relay a peer could
        otherwise forge a "09 0000" and end our session.
        """
        packet = frame.packet
        if frame.uid != wire.RELAY_UID:
            return None
        if isinstance(packet, wire.Timeout):
            reason = f"{RELAY_CLOSED_REASON} (handshake timeout)"
            return self._finish(Failed(reason, FailureKind.RELAY_CLOSED))
        if isinstance(packet, wire.Closed) and packet.peer_uid == wire.RELAY_UID:
            return self._finish(Failed(RELAY_CLOSED_REASON, FailureKind.RELAY_CLOSED))
        return None


def _from_relay(frame: wire.Frame) -> bool:
    return frame.uid == wire.RELAY_UID
