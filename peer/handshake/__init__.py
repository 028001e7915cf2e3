"""The handshake of both peer roles as sans-I/O state machines (docs/protocol.md §3–§5).

A driver owns the relay connection: it decodes the relay's stream with ``relay.wire.Parser``,
hands each frame to ``receive(frame, now)`` and writes the frame of every ``SendFrame`` event
it gets back (its UID is the destination). The machines never read a clock or a socket; the
receiver's one timer is exposed through ``next_deadline()`` / ``tick(now)``, so tests can run
whole exchanges with a fake clock and the driver can use any event loop.

Roles keep bob's names in the protocol docs: the sender is spoke's *server*, the receiver
its *client*. The packets and their order are bob's byte for byte (but for the receiver's
scoped Hello, below, which falls back to bob's), so either machine works against bob's peers
through either relay. Where we behave differently, it is mostly in what we do with the same
packets: the guessing limits (``sender``, ``receiver``), the wrong-code grace and the costly
senders (``receiver``), and nameplates:

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

The events and what both machines share are in ``events``, the roles in ``sender`` and
``receiver``; everything is re-exported here, so import from ``peer.handshake``.
"""

from peer.nameplates import SCOPED_PATIENCE, nameplate_of, salt_for

from .events import (
    COSTLY_PATIENCE,
    DEFAULT_GRACE,
    DEFAULT_MAX_ATTEMPTS,
    RELAY_CLOSED_REASON,
    SENDERS_PER_ATTEMPT,
    AgreementWithdrawn,
    Agreed,
    AttemptFailed,
    AttemptKind,
    Declined,
    Event,
    Failed,
    FailureKind,
    Paired,
    ProofFailed,
    ReconnectPlain,
    Registered,
    SendFrame,
    Verified,
)
from .receiver import ReceiverHandshake
from .sender import SenderHandshake

__all__ = [
    "Agreed",
    "AgreementWithdrawn",
    "AttemptFailed",
    "AttemptKind",
    "COSTLY_PATIENCE",
    "DEFAULT_GRACE",
    "DEFAULT_MAX_ATTEMPTS",
    "Declined",
    "Event",
    "Failed",
    "FailureKind",
    "Paired",
    "ProofFailed",
    "RELAY_CLOSED_REASON",
    "ReceiverHandshake",
    "ReconnectPlain",
    "Registered",
    "SCOPED_PATIENCE",
    "SENDERS_PER_ATTEMPT",
    "SendFrame",
    "SenderHandshake",
    "Verified",
    "nameplate_of",
    "salt_for",
]
