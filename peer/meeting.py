"""Drive a handshake state machine over a real relay connection, then enter the secure room.

This is the thin trio layer around ``peer.handshake``: it owns the socket and the clock and
nothing else, so every protocol decision stays testable without a network.
"""

from __future__ import annotations

import math
from typing import Awaitable, Callable

import attrs
import trio

from . import handshake
from .address import RelayAddress
from .rendezvous import RelayError, RelayLink, open_room


class HandshakeFailed(Exception):
    """The handshake ended without a partner; ``kind`` says why (a FailureKind)."""

    def __init__(self, reason: str, kind: handshake.FailureKind) -> None:
        super().__init__(reason)
        self.kind = kind


@attrs.frozen
class Meeting:
    """What the handshake gave us: the partner, the keys, and the open secure-room stream."""

    paired: handshake.Paired
    own_identity: bytes
    stream: trio.abc.Stream
    """The secure room, over the relay address's transport (TCP, TLS or WebSocket)."""


Notify = Callable[[handshake.Event], None]
Decide = Callable[[handshake.Agreed], Awaitable[bool]]


async def meet(
    address: RelayAddress,
    machine: handshake.SenderHandshake | handshake.ReceiverHandshake,
    *,
    notify: Notify,
    decide: Decide | None = None,
    on_registered: Callable[[], Awaitable[None]] | None = None,
    room_timeout: float = 120.0,
) -> Meeting:
    """Run ``machine`` through the relay until Paired, then open the secure room.

    ``notify`` sees the informational events (attempt failures, declines). ``decide`` is
    asked about each agreement a receiver reaches (it may prompt the user); without it every
    agreement is accepted. ``on_registered`` runs once the relay has given us an identity.
    """
    link = await RelayLink.open(address)
    try:
        paired = await _run(link, machine, notify, decide, on_registered)
    finally:
        await link.aclose()
    stream = await open_room(address, link.peer_host, paired.partner_identity, timeout=room_timeout)
    assert machine.identity is not None
    return Meeting(paired, machine.identity, stream)


async def _run(link, machine, notify, decide, on_registered) -> handshake.Paired:
    pending: list[handshake.Event] = list(machine.start(trio.current_time()))
    while True:
        while pending:
            event = pending.pop(0)
            if isinstance(event, handshake.SendFrame):
                await link.send([event.frame])
            elif isinstance(event, handshake.Paired):
                return event
            elif isinstance(event, handshake.Failed):
                raise HandshakeFailed(event.reason, event.kind)
            elif isinstance(event, handshake.Agreed):
                accepted = True if decide is None else await decide(event)
                assert isinstance(machine, handshake.ReceiverHandshake)
                pending.extend(machine.accept(event.partner_uid) if accepted else machine.refuse(event.partner_uid))
            else:
                if isinstance(event, handshake.Registered) and on_registered is not None:
                    await on_registered()
                notify(event)
        deadline = machine.next_deadline()
        with trio.move_on_at(math.inf if deadline is None else deadline):
            try:
                frames = await link.receive()
            except RelayError as error:
                raise HandshakeFailed(str(error), handshake.FailureKind.RELAY_CLOSED) from None
            now = trio.current_time()
            for frame in frames:
                pending.extend(machine.receive(frame, now))
            continue
        pending.extend(machine.tick(trio.current_time()))
