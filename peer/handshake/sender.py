"""The sending peer's handshake (spoke's server), sans-I/O; see ``peer.handshake``.

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
"""

from __future__ import annotations

from typing import Callable

import attrs

from peer import spoke
from peer.nameplates import nameplate_of, salt_for
from relay import wire

from .events import (
    DEFAULT_MAX_ATTEMPTS,
    AttemptFailed,
    AttemptKind,
    Declined,
    Event,
    Failed,
    FailureKind,
    Paired,
    Registered,
    Verified,
    _Machine,
    _from_relay,
    _send,
)


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
