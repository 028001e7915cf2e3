"""Drive a handshake state machine over a real relay connection, then enter the secure room.

This is the thin trio layer around ``peer.handshake``: it owns the socket and the clock and
nothing else, so every protocol decision stays testable without a network.
"""

from __future__ import annotations

import logging
import math
from typing import Awaitable, Callable

import attrs
import trio

from relay import wire

from . import handshake
from .address import RelayAddress
from .rendezvous import HELLO_PATIENCE, RelayError, RelayLink, open_room

log = logging.getLogger(__name__)


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
    nameplate = machine.nameplate
    link = await RelayLink.open(address, nameplate=nameplate)
    try:
        pending: list[handshake.Event] = list(machine.start(trio.current_time()))
        while True:
            outcome = await _run(link, machine, pending, notify, decide, on_registered)
            if isinstance(outcome, handshake.Paired):
                break
            # The relay did not take the scoped Hello; the old connection may be deaf (bob's
            # relay stops reading at an unknown type), so register plainly on a new one.
            log.debug("%s: registering with a plain Hello on a new connection", outcome.reason)
            await link.aclose()
            link = await RelayLink.open(address, nameplate=nameplate)
            assert isinstance(machine, handshake.ReceiverHandshake)
            pending = machine.reconnected(trio.current_time())
    finally:
        await link.aclose()
    stream = await open_room(address, link.peer_host, outcome.partner_identity,
                             timeout=room_timeout, nameplate=nameplate)
    assert machine.identity is not None
    return Meeting(outcome, machine.identity, stream)


WORK_PAUSE = 0.001
"""After a tick (it may have been costly work), this long for the reader to take in frames."""

Outcome = handshake.Paired | handshake.ReconnectPlain


async def _run(link, machine, pending, notify, decide, on_registered) -> Outcome:
    # A reader task keeps taking frames in while the machine works (or the user is asked),
    # so that frames are handled before expensive work that can wait.
    to_handler, inbox = trio.open_memory_channel[list[wire.Frame] | RelayError](64)
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_frames, link, to_handler)
        try:
            outcome = await _handle(link, machine, pending, inbox, notify, decide, on_registered)
        except Exception as error:  # raised below, outside the nursery, as itself
            failure = error
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return outcome


async def _read_frames(link: RelayLink, to_handler: trio.MemorySendChannel) -> None:
    async with to_handler:
        while True:
            try:
                frames = await link.receive()
            except RelayError as error:
                await to_handler.send(error)
                return
            await to_handler.send(frames)


async def _handle(link, machine, pending, inbox, notify, decide, on_registered) -> Outcome:
    # Another service at the relay's address may accept and say nothing: a relay answers
    # a Hello at once, so past HELLO_PATIENCE the address is not a relay. (A receiver's
    # scoped Hello falls back to 01 on a new connection first: its own deadline is shorter.)
    hello_by = trio.current_time() + HELLO_PATIENCE
    while True:
        while pending:
            event = pending.pop(0)
            if isinstance(event, handshake.SendFrame):
                try:
                    await link.send([event.frame])
                except RelayError as error:
                    # Only a scoped Hello's failure is worth a new connection; otherwise the
                    # error stands as it is.
                    lost = machine.connection_lost(str(error), trio.current_time())
                    if not any(isinstance(e, handshake.ReconnectPlain) for e in lost):
                        raise
                    pending = lost
            elif isinstance(event, (handshake.Paired, handshake.ReconnectPlain)):
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
        try:
            batch = inbox.receive_nowait()  # frames before timers: a tick may be costly work
        except trio.WouldBlock:
            deadline = machine.next_deadline()
            if deadline is not None and deadline <= trio.current_time():
                pending.extend(machine.tick(trio.current_time()))
                await trio.sleep(WORK_PAUSE)
                continue
            if not link.answered:
                if trio.current_time() >= hello_by:
                    raise link.unanswered(HELLO_PATIENCE)
                deadline = hello_by if deadline is None else min(deadline, hello_by)
            batch = None
            with trio.move_on_at(math.inf if deadline is None else deadline):
                batch = await inbox.receive()
            if batch is None:  # the deadline came: the next round ticks
                continue
        if isinstance(batch, RelayError):
            pending.extend(machine.connection_lost(str(batch), trio.current_time()))
            if not pending:  # a machine that already finished: nothing more will come
                raise HandshakeFailed(str(batch), handshake.FailureKind.RELAY_CLOSED)
            continue
        now = trio.current_time()
        for frame in batch:
            pending.extend(machine.receive(frame, now))
