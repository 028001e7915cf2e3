"""The receiving peer's handshake (spoke's client), sans-I/O; see ``peer.handshake``.

Guessing limit (receiver). A sender's validator (06) that does not match our code was one
online guess of it by whoever runs that sender, so the receiver stops after
``max_attempts`` such senders (the same default, 3), naming the nameplate they used. A
sender that breaks off before its 06 (a Spoke_failure, a departure) learnt nothing and is
no guess, but each one costs us a stretching of the code; so the receiver answers at most
``SENDERS_PER_ATTEMPT * max_attempts`` senders in all (30 by default, far more than share a
nameplate honestly) and then stops too. Once a sender has proved the code, the limits only
stop us answering new senders: that agreement is left to finish.

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
from typing import Callable

import attrs

from peer import spoke
from peer.nameplates import SCOPED_PATIENCE, ScopedRegistration, nameplate_of, salt_matches
from relay import wire

from .events import (
    COSTLY_PATIENCE,
    DEFAULT_GRACE,
    DEFAULT_MAX_ATTEMPTS,
    SENDERS_PER_ATTEMPT,
    AgreementWithdrawn,
    Agreed,
    Event,
    Failed,
    FailureKind,
    Paired,
    ProofFailed,
    ReconnectPlain,
    Registered,
    _Machine,
    _from_relay,
    _send,
)


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
