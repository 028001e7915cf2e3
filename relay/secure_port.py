"""The secure port's driver: a connection names its partner (the ticket line), waits in
``relay.rooms`` for it, and the pair is joined by a pipe (``relay.pipe``) as a room.

``SecurePort`` is a part of ``relay.server.RelayServer``, which holds the state it uses.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import attrs
import trio

from relay.limits import Admission, Refusal, RoomMeter
from relay.opening import LINGER, opened, text_of
from relay.pipe import blind_pipe
from relay.rooms import Invalid, Paired, Waiting
from relay.transports import Endpoint, open_endpoint, stream_pipe

if TYPE_CHECKING:
    from relay.server import RelayServer

log = logging.getLogger("relay.server")

TICKET_LIMIT = 100
"""bob reads the secure-room line into 100 bytes; a line without ``\\n`` by then is invalid."""
STATUS_TIMEOUT = 5.0
"""Seconds to write a secure-port status (``00``, ``01``, ``02``): two bytes, normally instant."""

ROOM_READY = b"00"
ROOM_TIMEOUT = b"01"
ROOM_INVALID = b"02"


@attrs.define(eq=False)
class _Seat:
    """A secure-port connection that sent a good ticket and waits for its partner."""

    endpoint: Endpoint
    identity: bytes
    waiting: trio.CancelScope = attrs.Factory(trio.CancelScope)
    outcome: str | None = None
    """``"paired"`` (the partner's task took the socket), ``"expired"`` (the room timed out),
    ``"left"`` (the peer hung up first) or ``"stopping"`` (the relay is shutting down)."""
    released: trio.Event = attrs.Factory(trio.Event)
    """Set once this seat's own task no longer touches the socket."""

    def end_wait(self, outcome: str) -> None:
        self.outcome = outcome
        self.waiting.cancel()

    def __repr__(self) -> str:
        return f"<secure-port seat {text_of(self.identity)}>"


@attrs.define(eq=False)
class _Room:
    """An open room: its pipe runs under ``scope``, whose deadline is the shutdown's."""

    meter: RoomMeter
    scope: trio.CancelScope


class SecurePort:
    """The secure port's part of ``RelayServer``."""

    # -- secure port ----------------------------------------------------------------------

    async def _accept_secure(self: RelayServer, tcp: trio.SocketStream,
                             admission: Admission) -> None:
        endpoint = await opened(open_endpoint(tcp, self.tls, self.config.upgrade_timeout), tcp)
        if endpoint is not None:
            await self._serve_secure(endpoint)

    async def _serve_moved(self: RelayServer, endpoint: Endpoint, admission: Admission) -> None:
        await self._serve_secure(endpoint)

    async def _serve_secure(self: RelayServer, endpoint: Endpoint) -> None:
        identity = endpoint.identity
        who = text_of(identity)
        owned = [endpoint]
        room: tuple[_Seat, _Seat] | None = None
        kind = ("secure", endpoint.transport)
        self.connections[kind] += 1
        stopping = trio.CancelScope()  # cancelled if the relay stops before a room is found
        self._before_room.add(stopping)
        try:
            with stopping:
                if self._stopping:
                    stopping.cancel()
                with trio.move_on_after(self.config.room_timeout) as line_timer:
                    ticket = await _read_ticket(endpoint.stream)
            self._before_room.discard(stopping)
            if stopping.cancelled_caught:
                log.info("secure port %s: the relay is stopping", who)
                await _send_status(endpoint, ROOM_TIMEOUT)
                return
            if line_timer.cancelled_caught:
                log.info("secure port %s: no ticket in time", who)
                await _send_status(endpoint, ROOM_TIMEOUT)
                return
            if ticket is None:
                log.info("secure port %s: no valid ticket line", who)
                await _send_status(endpoint, ROOM_INVALID)
                return
            seat = _Seat(endpoint, identity)
            arrival = self.rooms.arrive(seat, ticket, trio.current_time(), source=identity)
            self._rooms_changed()
            if isinstance(arrival, Invalid):
                log.info("secure port %s: ticket %r refused (%s)", who, text_of(ticket),
                         arrival.reason)
                await _send_status(endpoint, ROOM_INVALID)
            elif isinstance(arrival, Waiting):
                log.info("secure port %s: waiting for %s", who, text_of(ticket))
                owned = await self._wait_for_partner(seat)
            elif isinstance(arrival, Paired):
                partner: _Seat = arrival.partner
                partner.end_wait("paired")
                owned.append(partner.endpoint)
                await partner.released.wait()
                room = (partner, seat)
                owned = []
        except Exception:
            log.exception("secure-port connection %s failed", who)
        finally:
            self._before_room.discard(stopping)
            self.connections[kind] -= 1
            for owned_endpoint in owned:
                owned_endpoint.abort()
        if room is not None:
            await self._open_room(*room)

    async def _wait_for_partner(self: RelayServer, seat: _Seat) -> list[Endpoint]:
        """Hold the connection until the partner's task takes it; return what is still ours."""
        self._seats.add(seat)
        try:
            with seat.waiting:
                if self._stopping:
                    seat.end_wait("stopping")
                await seat.endpoint.wait_hangup()
            if seat.outcome == "paired":
                return []
            if seat.outcome == "expired":
                log.info("secure port %s: partner never came; closing", text_of(seat.identity))
            elif seat.outcome == "stopping":
                log.info("secure port %s: the relay is stopping", text_of(seat.identity))
                self.rooms.leave(seat)
                await _send_status(seat.endpoint, ROOM_TIMEOUT)
                return []
            else:
                seat.outcome = "left"
                log.info("secure port %s: left before its partner came", text_of(seat.identity))
                self.rooms.leave(seat)
            return [seat.endpoint]
        finally:
            self._seats.discard(seat)
            if seat.outcome in (None, "stopping"):  # cancelled: the seat must not be paired later
                self.rooms.leave(seat)
            seat.released.set()

    async def _open_room(self: RelayServer, first: _Seat, second: _Seat) -> None:
        """Join two seats (this task owns both endpoints now) and pipe them until either ends."""
        a, b = first.endpoint, second.endpoint
        names = f"{text_of(first.identity)} and {text_of(second.identity)}"
        kinds = [("secure", a.transport), ("secure", b.transport)]
        for kind in kinds:
            self.connections[kind] += 1
        try:
            refusal = self.guard.open_room() if not self._stopping else Refusal.ROOMS
            if refusal is not None:
                log.info("room for %s refused: %s", names,
                         "the relay is stopping" if self._stopping else refusal.describe())
                async with trio.open_nursery() as both:
                    both.start_soon(_send_status, a, ROOM_TIMEOUT)
                    both.start_soon(_send_status, b, ROOM_TIMEOUT)
                return
            try:
                await self._pipe_room(a, b, names)
            finally:
                self.guard.close_room()
        finally:
            for kind in kinds:
                self.connections[kind] -= 1
            a.abort()
            b.abort()

    async def _pipe_room(self: RelayServer, a: Endpoint, b: Endpoint, names: str) -> None:
        for endpoint in (a, b):
            if not await _send_status(endpoint, ROOM_READY, close=False):
                log.info("room for %s not opened: a peer is gone", names)
                return
        room = _Room(self.guard.room_meter(trio.current_time()),
                     trio.CancelScope(deadline=self._rooms_deadline))
        self.open_rooms.add(room)
        self.rooms_opened += 1
        log.info("room open between %s (%s to %s)", names, a.transport, b.transport)
        stats = None
        try:
            with room.scope:
                if a.plain and b.plain:
                    # kernel splice: the bytes stay in the kernel
                    stats = await blind_pipe(a.stream, b.stream, meter=room.meter)
                else:
                    stats = await stream_pipe(a, b, meter=room.meter)
        finally:
            self.open_rooms.discard(room)
            self.bytes_forwarded_closed += room.meter.delivered
        if stats is None:
            log.info("room between %s ended by the shutdown after %d bytes", names,
                     room.meter.delivered)
            return
        ends = {"a": text_of(a.identity), "b": text_of(b.identity)}
        log.info("room closed between %s: %d bytes one way, %d the other, ended by %s (%s)",
                 names, stats.a_to_b, stats.b_to_a, ends.get(stats.ended_by, "the relay"),
                 stats.reason)

    # -- room expiry ----------------------------------------------------------------------

    def _rooms_changed(self: RelayServer) -> None:
        """Wake the janitor if the book now has a deadline earlier than the one it sleeps on."""
        deadline = self.rooms.next_deadline()
        if deadline is not None and deadline < self._janitor_until:
            self._janitor_wake.set()

    async def _expire_rooms(self: RelayServer) -> None:
        """Close waiting halves whose room was not joined in time (and forget stale bookings)."""
        while True:
            self._janitor_wake = trio.Event()
            deadline = self.rooms.next_deadline()
            self._janitor_until = math.inf if deadline is None else deadline
            with trio.move_on_at(self._janitor_until):
                await self._janitor_wake.wait()
            for seat in self.rooms.expire(trio.current_time()):
                seat.end_wait("expired")


async def _read_ticket(stream: trio.abc.Stream) -> bytes | None:
    """The partner identity line, or None for EOF or no ``\\n`` within the first 100 bytes.

    Reads never go past those 100 bytes, so whatever a peer sends later waits in the socket
    and enters the pipe; bytes after the ``\\n`` within them are dropped, as bob does.
    """
    line = bytearray()
    while len(line) < TICKET_LIMIT:
        try:
            data = await stream.receive_some(TICKET_LIMIT - len(line))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not data:
            return None
        line += data
        end = line.find(b"\n")
        if end >= 0:
            return bytes(line[:end])
    return None


async def _send_status(endpoint: Endpoint, status: bytes, *, close: bool = True) -> bool:
    """Write a two-byte secure-port status; say whether it went out."""
    sent = False
    with trio.move_on_after(STATUS_TIMEOUT):
        try:
            await endpoint.stream.send_all(status)
            sent = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    if close:
        if sent:
            await endpoint.goodbye(LINGER)
        endpoint.abort()
    return sent
