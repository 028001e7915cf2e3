"""The handshake of both peer roles as sans-I/O state machines (docs/protocol.md §3–§5).

A driver owns the relay connection: it decodes the relay's stream with ``relay.wire.Parser``,
hands each frame to ``receive(frame, now)`` and writes the frame of every ``SendFrame`` event
it gets back (its UID is the destination). The machines never read a clock or a socket; the
receiver's one timer is exposed through ``next_deadline()`` / ``tick(now)``, so tests can run
whole exchanges with a fake clock and the driver can use any event loop.

Roles keep bob's names in the protocol docs: the sender is spoke's *server*, the receiver
its *client*. The packets and their order are bob's byte for byte, so either machine works
against bob's peers through either relay. Where we behave differently, it is in what we do
with the same packets:

Guessing limit (sender). Each handshake a stranger runs against our sender is one *online*
guess of the code: after receiving Y and our validator (packet 06) it can test one password
offline, whether it then answers or just walks away. The sender therefore counts every
handshake that got a 06 and did not end in an agreement, and gives up after
``max_attempts`` (default 3). Handshakes still in flight count against the budget too, so a
stranger cannot open many at once to get more guesses. With our default codes (three words
of the EFF large list, about 38.8 bits) three guesses succeed with probability 3 / 2**38.8,
under 1e-11; three also leaves room for the honest "I mistyped it" once or twice. bob has
no limit at all.

Each failed attempt has a kind (``AttemptKind``), so that the user can tell a typo from a
stranger. *wrong_code*: the receiver showed it holds another code, by a validator (05) that
did not match ours or by Spoke_failure 1 ("your validator does not match my code"), which is
what an honest receiver with a mistyped code sends. *abandoned*: it took our 06 and went
away (09) or broke off with another Spoke_failure code, which no honest receiver sends after
a valid 06; that is how a stranger collects guesses without the code. Both kinds cost an
attempt, since the 06 was already out. A handshake that ends before our 06 (a 07 whose X is
not a valid point gets Spoke_failure 0 instead) revealed nothing and costs nothing. Neither
kind is proof, since a stranger can send either; so when the sender gives up, the message
names the kinds, and says that someone else may be guessing when any was abandoned.

Guessing limit (receiver). A sender's validator (06) that does not match our code was one
online guess of it by whoever runs that sender, so the receiver stops after
``max_attempts`` such senders (the same default, 3), naming the nameplate they used. A
sender that breaks off before its 06 (a Spoke_failure, a departure) learnt nothing and is
no guess, but each one costs us a stretching of the code; so the receiver answers at most
``SENDERS_PER_ATTEMPT * max_attempts`` senders in all (30 by default, far more than share a
nameplate honestly) and then stops too. Once a sender has proved the code, the limits only
stop us answering new senders: that agreement is left to finish.

Nameplates (both roles). On a busy relay every receiver is told about every waiting sender,
and bob's receiver runs a handshake with each of them. Our codes start with a number, the
nameplate (``417-cobalt-lemon-unicycle``); our sender puts it in the first two bytes of its
spoke salt and our receiver only answers senders whose salt starts with its own nameplate.
That cuts cross-talk and wasted guesses without changing a byte of the protocol: a bob
receiver still tries every sender and finds ours, and our receiver with a bob password (no
nameplate) still tries everyone. The nameplate is public by design (the salt is sent in
clear to every receiver); the secret is the rest of the code, and only that part counts as
its entropy. Our receiver also registers with the scoped Hello (10) so that our relay announces
only the senders of its nameplate; against a relay that does not answer 10 it emits
``ReconnectPlain`` and registers with 01 on a new connection (``peer.nameplates`` says why).

Wrong code (receiver). The receiver learns that its code is wrong when a sender's validator
does not match (it answers Spoke_failure 1). Another sender may still be coming, so it waits
a short grace period with no handshake in progress before giving up; once any sender has
proved the same code, later mismatches are other people's senders and never end the session.

Costly senders (receiver). Anyone on a relay can read a sender's nameplate and announce
look-alikes whose publics ask for up to spoke.MAX_ITERATIONS of stretching (half a second of
our CPU each). Answered as they came, ten of them held an honest handshake up by four
seconds. So a public asking for more stretching than our own senders use waits until no
handshake has made progress for COSTLY_PATIENCE seconds, and then the cheapest goes first,
one per ``tick``; the driver handles waiting frames before each.
"""

from __future__ import annotations

import enum
import math
from typing import Callable, Union

import attrs

from peer import spoke
from peer.nameplates import SCOPED_PATIENCE, ScopedRegistration, nameplate_of, salt_for, salt_matches
from relay import wire

__all__ = [
    "COSTLY_PATIENCE",
    "DEFAULT_GRACE",
    "DEFAULT_MAX_ATTEMPTS",
    "AgreementWithdrawn",
    "Agreed",
    "AttemptFailed",
    "AttemptKind",
    "Declined",
    "Event",
    "Failed",
    "FailureKind",
    "Paired",
    "ProofFailed",
    "ReceiverHandshake",
    "ReconnectPlain",
    "SCOPED_PATIENCE",
    "Registered",
    "SENDERS_PER_ATTEMPT",
    "SendFrame",
    "SenderHandshake",
    "Verified",
    "nameplate_of",
    "salt_for",
]

DEFAULT_MAX_ATTEMPTS = 3
"""Failed handshakes a sender allows, and failed proofs from senders a receiver allows."""
SENDERS_PER_ATTEMPT = 10
"""A receiver answers at most this many senders per allowed failed proof, in all."""
DEFAULT_GRACE = 2.0
"""Seconds a receiver whose code was rejected waits for another sender before giving up."""
COSTLY_PATIENCE = 2.0
"""Seconds a receiver lets a handshake in flight go quiet before it answers a costly sender."""

RELAY_CLOSED_REASON = "the relay closed the connection"


# --- events ---------------------------------------------------------------------------------


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


# --- shared machinery -----------------------------------------------------------------------


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


# --- sender ---------------------------------------------------------------------------------


@attrs.define
class _ReceiverSlot:
    """One receiver we sent a 06 to; ``keys`` is set once its validator (05) checked out."""

    identity: bytes
    state: spoke.ServerState = attrs.field(repr=False)
    keys: spoke.SharedKeys | None = attrs.field(default=None, repr=False)


class SenderHandshake(_Machine):
    """The sending peer (spoke's server): publish our public, answer receivers, await 0a.

    Unlike bob it keeps one agreement per receiver instead of one slot (a second receiver
    cannot overwrite the first) and counts failed handshakes against ``max_attempts``.
    ``salt`` and ``make_scalar`` exist for test vectors; leave them out.
    """

    def __init__(
        self,
        password: bytes,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        iterations: int | None = None,
        ciphers: tuple[int, int] = (spoke.CIPHER_AES256_GCM, spoke.CIPHER_AES256_GCM),
        salt: bytes | None = None,
        make_scalar: Callable[[], bytes] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        super().__init__()
        self.max_attempts = max_attempts
        self.nameplate = nameplate_of(password)
        if salt is None:
            salt = salt_for(self.nameplate)
        self._secret, self.public = spoke.generate(
            password,
            salt=salt,
            iterations=spoke.DEFAULT_ITERATIONS if iterations is None else iterations,
            ciphers=ciphers,
        )
        self._make_scalar = make_scalar
        self.identity: bytes | None = None
        self.attempts_used = 0
        self.attempts_by_kind = {kind: 0 for kind in AttemptKind}
        self._receivers: dict[int, _ReceiverSlot] = {}

    def start(self, now: float) -> list[Event]:
        """Register with the relay as a sender (packet 00)."""
        return self._start(wire.HelloServer(self.public.encode()))

    def next_deadline(self) -> float | None:
        """The sender has no timer of its own; the relay's timeout bounds the wait."""
        return None

    def tick(self, now: float) -> list[Event]:
        return []

    def receive(self, frame: wire.Frame, now: float) -> list[Event]:
        if self.finished:
            return []
        goodbye = self._relay_goodbye(frame)
        if goodbye is not None:
            return goodbye
        packet, uid = frame.packet, frame.uid
        if _from_relay(frame):
            if isinstance(packet, wire.ServerIdentity):
                self.identity = packet.identity
                return [Registered(packet.identity)]
            if isinstance(packet, wire.Closed):
                return self._receiver_left(packet.peer_uid)
            return []
        if isinstance(packet, wire.XAndClientIdentity):
            return self._on_x(uid, packet)
        if isinstance(packet, wire.ClientValidator):
            return self._on_validator(uid, packet.validator)
        if isinstance(packet, wire.Accepted):
            return self._on_accepted(uid)
        if isinstance(packet, wire.Refused):
            return self._on_refused(uid)
        if isinstance(packet, wire.SpokeFailure):
            return self._on_spoke_failure(uid, packet.code)
        return []

    def _in_flight(self) -> int:
        return sum(1 for slot in self._receivers.values() if slot.keys is None)

    def _on_x(self, uid: int, packet: wire.XAndClientIdentity) -> list[Event]:
        # Before 02 we cannot hash our identity; a repeated 07 would be a second guess on
        # one handshake. Neither happens with an honest relay and receiver: no answer.
        if self.identity is None or uid in self._receivers:
            return []
        if self.attempts_used + self._in_flight() >= self.max_attempts:
            return []
        scalar = None if self._make_scalar is None else self._make_scalar()
        try:
            state, body = spoke.server_compute(
                self._secret,
                packet.x,
                client_identity=packet.identity,
                server_identity=self.identity,
                scalar=scalar,
            )
        except spoke.SpokeError as error:
            # The receiver got nothing it could test a guess with: not an attempt.
            return [_send(uid, wire.SpokeFailure(error.code))]
        self._receivers[uid] = _ReceiverSlot(packet.identity, state)
        y, validator = body[: spoke.POINT_SIZE], body[spoke.POINT_SIZE :]
        return [_send(uid, wire.YAndServerValidator(y, validator))]

    def _on_validator(self, uid: int, validator: bytes) -> list[Event]:
        slot = self._receivers.get(uid)
        if slot is None or slot.keys is not None:
            return [_send(wire.RELAY_UID, wire.RelayFailure(b"C", uid))]
        try:
            slot.keys = spoke.server_finalize(slot.state, validator)
        except spoke.SpokeError as error:
            del self._receivers[uid]
            events: list[Event] = [_send(uid, wire.SpokeFailure(error.code))]
            return events + self._spend(slot, AttemptKind.WRONG_CODE,
                                        "its proof of the code did not match ours")
        return [
            _send(uid, wire.Agreement()),
            Verified(partner_uid=uid, partner_identity=slot.identity),
        ]

    def _on_accepted(self, uid: int) -> list[Event]:
        slot = self._receivers.get(uid)
        if slot is None or slot.keys is None:
            return [_send(wire.RELAY_UID, wire.RelayFailure(b"H", uid))]
        return self._finish(
            Paired(
                partner_uid=uid,
                partner_identity=slot.identity,
                keys=slot.keys,
                ciphers=slot.keys.ciphers,
                public=self.public,
            )
        )

    def _on_refused(self, uid: int) -> list[Event]:
        slot = self._receivers.get(uid)
        if slot is None:
            return [_send(wire.RELAY_UID, wire.RelayFailure(b"H", uid))]
        del self._receivers[uid]
        if slot.keys is None:
            # Refused before its proof: no honest receiver does that, and our relay ends the
            # pair, so no Closed would ever free this slot. It saw our 06: a guess.
            return self._spend(slot, AttemptKind.ABANDONED, "it refused before proving the code")
        return [Declined(partner_uid=uid, partner_identity=slot.identity)]

    def _on_spoke_failure(self, uid: int, code: int) -> list[Event]:
        slot = self._receivers.pop(uid, None)
        if slot is None or slot.keys is not None:
            return []
        if code == spoke.FAILURE_BAD_CLIENT_VALIDATOR:
            return self._spend(slot, AttemptKind.WRONG_CODE,
                               "it says our proof does not match its code")
        return self._spend(slot, AttemptKind.ABANDONED, f"it broke off (spoke failure {code})")

    def _receiver_left(self, uid: int) -> list[Event]:
        slot = self._receivers.pop(uid, None)
        if slot is None or slot.keys is not None:
            return []
        return self._spend(slot, AttemptKind.ABANDONED, "it left without proving the code")

    def _spend(self, slot: _ReceiverSlot, kind: AttemptKind, reason: str) -> list[Event]:
        self.attempts_used += 1
        self.attempts_by_kind[kind] += 1
        events: list[Event] = [
            AttemptFailed(
                reason=reason,
                partner_identity=slot.identity,
                attempts_used=self.attempts_used,
                attempts_allowed=self.max_attempts,
                kind=kind,
            )
        ]
        if self.attempts_used >= self.max_attempts:
            events += self._finish(Failed(self._giving_up(), FailureKind.GUESSING_LIMIT))
        return events

    def _giving_up(self) -> str:
        """What the user reads when the attempts are spent: how many of each kind, and who
        is likely to blame (a typo leaves wrong codes; only a stranger abandons)."""
        wrong = self.attempts_by_kind[AttemptKind.WRONG_CODE]
        abandoned = self.attempts_by_kind[AttemptKind.ABANDONED]
        kinds = []
        if wrong:
            kinds.append(f"{wrong} wrong code{'' if wrong == 1 else 's'}")
        if abandoned:
            kinds.append(f"{abandoned} abandoned after seeing our proof")
        plural = "" if self.attempts_used == 1 else "s"
        if abandoned:
            blame = "someone else on the relay may be guessing the code"
        else:
            blame = "the receiver mistyped the code, or someone else on the relay is guessing it"
        return (f"gave up after {self.attempts_used} failed handshake{plural} "
                f"({', '.join(kinds)}): {blame}; send again to get a new code")


# --- receiver -------------------------------------------------------------------------------


class _Stage(enum.Enum):
    AWAITING_Y = enum.auto()  # 07 sent, waiting for 06
    AWAITING_AGREEMENT = enum.auto()  # 05 sent, waiting for 08
    AWAITING_DECISION = enum.auto()  # Agreed emitted, the driver must accept or refuse
    ACCEPTED = enum.auto()  # 0a sent, waiting for the relay's 0e


@attrs.define
class _SenderSlot:
    """One sender we are running a handshake with."""

    identity: bytes
    public: spoke.Public
    state: spoke.ClientState | None = attrs.field(repr=False)
    stage: _Stage = _Stage.AWAITING_Y
    keys: spoke.SharedKeys | None = attrs.field(default=None, repr=False)
    since: float = 0.0
    """When this handshake last made progress (our 07 or our 05 sent)."""


class ReceiverHandshake(_Machine):
    """The receiving peer (spoke's client): answer announced senders, let the driver choose.

    Like bob it runs a handshake with every sender it is told about (minus those with
    another nameplate) and may see several agreements; it acts on only one: after
    ``accept``, any later agreement is refused. Unlike bob it stops after ``max_attempts``
    senders failed to prove the code, or after answering ``SENDERS_PER_ATTEMPT`` times that
    many senders in all (the module docstring says why). ``make_scalar`` is for test vectors.
    """

    def __init__(
        self,
        password: bytes,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        grace: float = DEFAULT_GRACE,
        scoped: bool = True,
        make_scalar: Callable[[], bytes] | None = None,
    ) -> None:
        if grace < 0:
            raise ValueError(f"grace must not be negative, not {grace}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        super().__init__()
        self._password = password
        self.grace = grace
        self.max_attempts = max_attempts
        self.max_senders = SENDERS_PER_ATTEMPT * max_attempts
        self.failed_proofs = 0
        """Senders whose validator (06) did not match our code: each was one guess of it."""
        self.senders_answered = 0
        """Senders we sent our X (07) to, whatever came of it."""
        self.nameplate = nameplate_of(password)
        self.registration = ScopedRegistration(self.nameplate, scoped=scoped)
        """Which Hello we sent and whether the relay took the scoped one (``.scoped``)."""
        self._make_scalar = make_scalar
        self.identity: bytes | None = None
        self._senders: dict[int, _SenderSlot] = {}
        self._costly: dict[int, tuple[wire.NewServer, spoke.Public]] = {}
        """Senders whose publics ask for more stretching than ours do (see COSTLY_PATIENCE)."""
        self._accepted: int | None = None
        self._code_rejected = False
        self._code_confirmed = False
        self._deadline: float | None = None

    def start(self, now: float) -> list[Event]:
        """Register with the relay as a receiver: packet 10 with a nameplate, else 01."""
        return self._start(self.registration.hello(now))

    def reconnected(self, now: float) -> list[Event]:
        """The driver opened a new connection after ``ReconnectPlain``: register with 01."""
        return [_send(wire.RELAY_UID, self.registration.plain_hello())]

    def connection_lost(self, reason: str, now: float) -> list[Event]:
        """Before 03 to a scoped Hello, a lost connection means a relay that refused 10."""
        if not self.finished and self.registration.lost():
            return [ReconnectPlain(f"no answer to the scoped Hello: {reason}")]
        return super().connection_lost(reason, now)

    def next_deadline(self) -> float | None:
        """When ``tick`` must be called: the end of the scoped Hello's wait or of the
        wrong-code grace period, or when a costly sender may be answered (maybe past)."""
        if self.finished or self.registration.awaiting_reconnection:
            return None
        due = [t for t in (self._costly_due(), self._deadline, self.registration.deadline)
               if t is not None]
        return min(due) if due else None

    def tick(self, now: float) -> list[Event]:
        """Fall back to 01, fail after the grace period, or answer the costly sender that is
        due, if any."""
        if self.finished:
            return []
        if self.registration.expired(now):
            return [ReconnectPlain(f"no answer to the scoped Hello in {SCOPED_PATIENCE:g} s")]
        if self._deadline is not None and now >= self._deadline:
            return self._finish(
                Failed(
                    "wrong code: the sender's proof did not match "
                    "(check the code, or ask for a new one)",
                    FailureKind.WRONG_CODE,
                )
            )
        due = self._costly_due()
        if due is None or now < due:
            return []
        uid = min(self._costly, key=lambda u: self._costly[u][1].iterations)
        return self._answer(*self._costly.pop(uid), now)

    def _costly_due(self) -> float | None:
        """When the cheapest costly sender may be answered: once no handshake has made
        progress for COSTLY_PATIENCE seconds (at once when none is in flight)."""
        if not self._costly or self._accepted is not None:
            return None
        in_flight = [slot.since for slot in self._senders.values()
                     if slot.stage in (_Stage.AWAITING_Y, _Stage.AWAITING_AGREEMENT)]
        return max(in_flight) + COSTLY_PATIENCE if in_flight else -math.inf

    def accept(self, uid: int) -> list[Event]:
        """Take the agreement with ``uid`` (sends 0a) and refuse every other open one.

        Returns [] when ``uid`` is no longer an open agreement (it left meanwhile and an
        AgreementWithdrawn was emitted), or when another one was already accepted.
        """
        slot = self._senders.get(uid)
        if self.finished or self._accepted is not None or not self._is_open(slot):
            return []
        # Refusals go first: a relay pairs us on 0a and may drop whatever we write after it.
        events: list[Event] = []
        for other in [u for u, s in self._senders.items() if u != uid and self._is_open(s)]:
            del self._senders[other]
            events.append(_send(other, wire.Refused()))
        self._costly.clear()
        slot.stage = _Stage.ACCEPTED
        self._accepted = uid
        events.append(_send(uid, wire.Accepted()))
        return events

    def refuse(self, uid: int) -> list[Event]:
        """Decline the agreement with ``uid`` (sends 0b) and keep waiting for others.

        Returns [] when ``uid`` is not an open agreement. Once a limit was reached, no other
        sender will be answered: refusing the last open one ends the handshake (Failed).
        """
        if self.finished or not self._is_open(self._senders.get(uid)):
            return []
        del self._senders[uid]
        return [_send(uid, wire.Refused())] + self._give_up_if_spent()

    @staticmethod
    def _is_open(slot: _SenderSlot | None) -> bool:
        """An agreement the driver has been told about and not yet answered."""
        return slot is not None and slot.stage is _Stage.AWAITING_DECISION

    def receive(self, frame: wire.Frame, now: float) -> list[Event]:
        if self.finished:
            return []
        if self.registration.awaiting_reconnection:
            return []  # late frames of the connection we were told to drop
        goodbye = self._relay_goodbye(frame)
        if goodbye is not None:
            return goodbye
        packet, uid = frame.packet, frame.uid
        if _from_relay(frame):
            if isinstance(packet, wire.ClientIdentity):
                self.registration.registered()
                self.identity = packet.identity
                return [Registered(packet.identity)]
            if isinstance(packet, wire.NewServer):
                return self._on_new_server(packet, now)
            if isinstance(packet, wire.Done):
                return self._on_done()
            if isinstance(packet, wire.Closed):
                return self._forget(packet.peer_uid, now)
            return []
        if isinstance(packet, wire.YAndServerValidator):
            return self._on_y(uid, packet, now)
        if isinstance(packet, wire.Agreement):
            return self._on_agreement(uid)
        if isinstance(packet, wire.SpokeFailure):
            # Code 2 (the sender rejected our validator) can only follow a validator of theirs
            # that we accepted, so it is not evidence of a wrong code: just forget the sender.
            return self._forget(uid, now)
        return []

    def _on_new_server(self, packet: wire.NewServer, now: float) -> list[Event]:
        uid = packet.server_uid
        # Before 03 we cannot put our identity in 07; after accepting, new senders are moot.
        if self.identity is None or self._accepted is not None:
            return []
        if uid == wire.RELAY_UID or uid in self._senders or uid in self._costly:
            return []
        if self._stopped_answering():
            return []
        if self.nameplate is not None and not salt_matches(packet.public, self.nameplate):
            return []  # someone else's transfer: do not spend their guesses or our CPU
        try:
            public = spoke.Public.decode(packet.public)
        except spoke.SpokeError as error:
            return [_send(uid, wire.SpokeFailure(error.code))]
        if public.iterations > spoke.DEFAULT_ITERATIONS:
            self._costly[uid] = (packet, public)
            self._deadline = None
            return []
        return self._answer(packet, public, now)

    def _answer(self, packet: wire.NewServer, public: spoke.Public, now: float) -> list[Event]:
        """Stretch the code for this sender and send it our X (packet 07)."""
        assert self.identity is not None
        uid = packet.server_uid
        scalar = None if self._make_scalar is None else self._make_scalar()
        state, x = spoke.hello(self._password, public, scalar=scalar)
        self._senders[uid] = _SenderSlot(packet.identity, public, state, since=now)
        self._deadline = None
        self.senders_answered += 1
        if self._stopped_answering():
            self._costly.clear()
        return [_send(uid, wire.XAndClientIdentity(x, self.identity))]

    def _stopped_answering(self) -> bool:
        return self.failed_proofs >= self.max_attempts or self.senders_answered >= self.max_senders

    def _proof_failed(self, slot: _SenderSlot) -> list[Event]:
        """Count a sender's wrong validator: one guess of our code by whoever runs it."""
        self.failed_proofs += 1
        events: list[Event] = [ProofFailed(partner_identity=slot.identity,
                                           failures=self.failed_proofs,
                                           failures_allowed=self.max_attempts)]
        if self.failed_proofs >= self.max_attempts:
            # No more guesses: handshakes not yet at their 06 are dropped unanswered, and a
            # 06 arriving for one of them is never checked (our answer would tell the result).
            for other in [u for u, s in self._senders.items() if s.stage is _Stage.AWAITING_Y]:
                del self._senders[other]
            self._costly.clear()
        return events

    def _give_up_if_spent(self) -> list[Event]:
        """Failed once a limit stopped us answering and no sender is left that could pair."""
        if self.finished or self._senders or self._costly or not self._stopped_answering():
            return []
        plate = "" if self.nameplate is None else f" with nameplate {self.nameplate}"
        if self.failed_proofs >= self.max_attempts:
            count = self.failed_proofs
            who = f"{count} sender{'' if count == 1 else 's'}{plate}"
            blame = "the code is wrong, or someone is guessing it" if count == 1 else \
                "someone may be guessing it"
            return self._finish(Failed(
                f"{who} failed to prove the code: {blame}; ask the sender for a new code",
                FailureKind.GUESSING_LIMIT,
            ))
        return self._finish(Failed(
            f"gave up after answering {self.senders_answered} senders{plate} without pairing: "
            "someone may be flooding the relay with fake senders; ask the sender for a new code",
            FailureKind.SENDER_LIMIT,
        ))

    def _on_y(self, uid: int, packet: wire.YAndServerValidator, now: float) -> list[Event]:
        slot = self._senders.get(uid)
        if slot is None or slot.stage is not _Stage.AWAITING_Y:
            return [_send(wire.RELAY_UID, wire.RelayFailure(b"S", uid))]
        assert slot.state is not None and self.identity is not None
        try:
            keys, validator = spoke.client_compute(
                slot.state,
                packet.y + packet.validator,
                client_identity=self.identity,
                server_identity=slot.identity,
            )
        except spoke.SpokeError as error:
            events: list[Event] = [_send(uid, wire.SpokeFailure(error.code))]
            if error.code == spoke.FAILURE_BAD_CLIENT_VALIDATOR:
                self._code_rejected = True
                events += self._proof_failed(slot)
            return events + self._forget(uid, now)
        slot.state = None
        slot.keys = keys
        slot.stage = _Stage.AWAITING_AGREEMENT
        slot.since = now
        self._code_confirmed = True
        return [_send(uid, wire.ClientValidator(validator))]

    def _on_agreement(self, uid: int) -> list[Event]:
        slot = self._senders.get(uid)
        if slot is None or slot.stage is not _Stage.AWAITING_AGREEMENT:
            return [_send(wire.RELAY_UID, wire.RelayFailure(b"H", uid))]
        if self._accepted is not None:
            del self._senders[uid]
            return [_send(uid, wire.Refused())]
        assert slot.keys is not None
        slot.stage = _Stage.AWAITING_DECISION
        return [Agreed(partner_uid=uid, partner_identity=slot.identity, keys=slot.keys, public=slot.public)]

    def _on_done(self) -> list[Event]:
        if self._accepted is None:
            return [_send(wire.RELAY_UID, wire.RelayFailure(b"N", wire.RELAY_UID))]
        slot = self._senders[self._accepted]
        assert slot.keys is not None
        return self._finish(
            Paired(
                partner_uid=self._accepted,
                partner_identity=slot.identity,
                keys=slot.keys,
                ciphers=slot.public.ciphers,
                public=slot.public,
            )
        )

    def _forget(self, uid: int, now: float) -> list[Event]:
        """Drop a sender (it left or failed); start the grace timer if that was the last hope."""
        slot = self._senders.pop(uid, None)
        self._costly.pop(uid, None)
        events: list[Event] = []
        if slot is not None and slot.stage in (_Stage.AWAITING_DECISION, _Stage.ACCEPTED):
            # With an accepted sender gone before 0e, the relay dropped our 0a: wait again.
            if self._accepted == uid:
                self._accepted = None
            events.append(AgreementWithdrawn(partner_uid=uid, partner_identity=slot.identity))
        events += self._give_up_if_spent()
        if self.finished:
            return events
        hopeless = (self._code_rejected and not self._code_confirmed
                    and not self._senders and not self._costly)
        if hopeless and self._deadline is None:
            self._deadline = now + self.grace
        return events
