"""Secure-room pairing (docs/protocol.md §6): which two secure-port connections belong together.

When a receiver accepts a sender, the relay books the pair of their handshake identities.
Each then opens a secure-port connection and sends its *partner's* identity as a ticket:
the receiver names the sender, the sender names the receiver. Two tickets of one booked
pair make a room; a pair is used once.

This module only decides; the driver owns the sockets (``holder`` is whatever it uses to
name one) and the clock (``now`` is passed in, in the driver's time).

Differences from bob, on purpose: a pair nobody claims is forgotten after ``ttl`` (bob keeps
it forever; ours may change while the relay runs, for pairs booked from then on), and when a new booking reuses a ticket of an older pair still pending (a NAT
gave the same ``ip:port`` to someone else), the new pair wins and the old one expires at
once: a stale pair must not capture a live peer.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Any, Hashable, Union

import attrs

log = logging.getLogger("relay.rooms")

DEFAULT_TTL = 3600.0
"""bob's ``--timeout``."""


@attrs.frozen
class Waiting:
    """The ticket is good; its partner has not arrived yet."""


@attrs.frozen
class Paired:
    """Both halves are here; the driver joins ``partner`` with the arriving connection."""

    partner: Hashable


@attrs.frozen
class Invalid:
    """Not a pending ticket (unknown, already claimed, or its pair is dead): reply ``02``."""

    reason: str = attrs.field(default="", eq=False)


Arrival = Union[Waiting, Paired, Invalid]

_NOBODY: Any = object()


def _text(identity: bytes) -> str:
    return identity.decode("ascii", "replace")


@attrs.define(eq=False)
class _Pair:
    client_identity: bytes
    server_identity: bytes
    deadline: float | None
    """None until the book learns the time (see ``RoomBook.book``)."""
    ttl: float = 0.0
    """The ttl its deadline was stamped with: which queue of the book holds it."""
    client_holder: Any = _NOBODY
    """The receiver's connection: its ticket is the *server* identity."""
    server_holder: Any = _NOBODY
    """The sender's connection: its ticket is the *client* identity."""

    def holders(self) -> list[Any]:
        return [h for h in (self.client_holder, self.server_holder) if h is not _NOBODY]

    def tickets(self) -> tuple[bytes, bytes]:
        return (self.server_identity, self.client_identity)


class RoomBook:
    """Booked pairs, waiting halves, and their expiry."""

    def __init__(self, ttl: float = DEFAULT_TTL) -> None:
        self.ttl = ttl
        # Pairs in deadline order, one queue per ttl: with one ttl and a clock that never goes
        # back, booking order is deadline order, so the next to expire is a queue's first.
        # Several queues exist only for a while after the ttl changed.
        self._queues: dict[float, collections.OrderedDict[_Pair, None]] = {}
        self._unstamped: list[_Pair] = []
        self._by_ticket: dict[bytes, _Pair] = {}
        self._by_holder: dict[Hashable, _Pair] = {}

    @property
    def ttl(self) -> float:
        """Seconds a booked pair may wait to be joined; a change applies to new bookings."""
        return self._ttl

    @ttl.setter
    def ttl(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"ttl must be >= 0, not {value!r}")
        self._ttl = value

    @property
    def pending(self) -> int:
        """Booked pairs not yet joined (including those with one half waiting)."""
        return sum(map(len, self._queues.values())) + len(self._unstamped)

    @property
    def waiting(self) -> int:
        """Secure-port connections waiting for their partner."""
        return len(self._by_holder)

    def book(self, client_identity: bytes, server_identity: bytes,
             now: float | None = None) -> None:
        """Record that this receiver accepted this sender.

        ``now=None`` (a caller without a clock, like the handshake core) stamps the pair at
        the next ``expire`` or ``arrive``; ``next_deadline`` says that call is due at once.
        """
        pair = _Pair(bytes(client_identity), bytes(server_identity), None)
        for ticket in set(pair.tickets()):
            older = self._by_ticket.get(ticket)
            if older is not None:
                self._supersede(older)
            self._by_ticket[ticket] = pair
        if now is None:
            self._unstamped.append(pair)
        else:
            self._stamp(now)
            self._enqueue(pair, now + self.ttl)
        log.debug("room booked for client %s and server %s", _text(pair.client_identity),
                  _text(pair.server_identity))

    def arrive(self, holder: Hashable, line: bytes, now: float, *, source: bytes | None = None) -> Arrival:
        """A secure-port connection sent ``line`` (its partner's identity, without ``\\n``).

        ``source`` is that connection's own identity. Tickets are public (every receiver
        is told every sender's identity), so a half is given only to a connection from the
        address its peer shook hands from; anyone else gets Invalid and the half stays
        free. Without that check any stranger could take a booked seat and break the
        transfer (bob's relay has this hole). The port is not compared: the room is a new
        connection.
        """
        if holder in self._by_holder:
            raise ValueError(f"{holder!r} already sent its ticket")
        self._stamp(now)
        pair = self._by_ticket.get(bytes(line))
        if pair is None:
            return Invalid("no pending room for this ticket")
        if source is not None:
            claimant = pair.client_identity if line == pair.server_identity else pair.server_identity
            if _host(source) != _host(claimant):
                return Invalid("this ticket was presented from another address than its peer's")
        # The receiver's ticket is the server identity, the sender's the client identity.
        # Both are equal only if the driver gave two connections one identity; then the
        # first to arrive takes the receiver's half and the second the sender's.
        if line == pair.server_identity and pair.client_holder is _NOBODY:
            pair.client_holder = holder
        elif line == pair.client_identity and pair.server_holder is _NOBODY:
            pair.server_holder = holder
        else:
            return Invalid("this half of the room is already claimed")
        if pair.client_holder is _NOBODY or pair.server_holder is _NOBODY:
            self._by_holder[holder] = pair
            return Waiting()
        partner = pair.server_holder if holder is pair.client_holder else pair.client_holder
        self._forget(pair)
        log.debug("room joined for client %s and server %s", _text(pair.client_identity),
                  _text(pair.server_identity))
        return Paired(partner)

    def leave(self, holder: Hashable) -> None:
        """A waiting half's connection ended; its pair is dead (as in bob). Unknown: no-op."""
        pair = self._by_holder.get(holder)
        if pair is not None:
            self._forget(pair)
            # The other half cannot be waiting: it would have made a Paired.

    def expire(self, now: float) -> list[Hashable]:
        """Drop pairs booked more than ``ttl`` ago; return the waiting holders to close."""
        self._stamp(now)
        to_close: list[Hashable] = []
        for ttl, queue in list(self._queues.items()):
            while queue:
                pair = next(iter(queue))
                assert pair.deadline is not None
                if pair.deadline > now:
                    break
                to_close.extend(pair.holders())
                self._forget(pair)
            if not queue:
                self._queues.pop(ttl, None)
        return to_close

    def next_deadline(self) -> float | None:
        """When ``expire`` has work to do: None if never, -inf if right away."""
        if self._unstamped:
            return -math.inf
        heads = [next(iter(queue)).deadline for queue in self._queues.values() if queue]
        return min(heads) if heads else None

    def _stamp(self, now: float) -> None:
        for pair in self._unstamped:
            self._enqueue(pair, now + self.ttl)
        self._unstamped.clear()

    def _enqueue(self, pair: _Pair, deadline: float) -> None:
        pair.deadline, pair.ttl = deadline, self.ttl
        self._queues.setdefault(self.ttl, collections.OrderedDict())[pair] = None

    def _supersede(self, older: _Pair) -> None:
        """A newer booking took one of ``older``'s tickets: it can never complete."""
        for ticket in older.tickets():
            if self._by_ticket.get(ticket) is older:
                del self._by_ticket[ticket]
        if not older.holders():
            self._forget(older)
            return
        # Someone waits on it: keep the pair only so that expire() hands them back at once.
        log.info("room for client %s and server %s superseded by a newer booking",
                 _text(older.client_identity), _text(older.server_identity))
        if older in self._unstamped:
            # An unstamped pair is stamped before anything expires; give it the same fate then.
            self._unstamped.remove(older)
            self._enqueue(older, -math.inf)
        queue = self._queues[older.ttl]
        older.deadline = -math.inf
        queue.move_to_end(older, last=False)

    def _forget(self, pair: _Pair) -> None:
        for ticket in pair.tickets():
            if self._by_ticket.get(ticket) is pair:
                del self._by_ticket[ticket]
        for holder in pair.holders():
            self._by_holder.pop(holder, None)
        queue = self._queues.get(pair.ttl)
        if queue is not None and pair in queue:
            del queue[pair]
            if not queue:
                del self._queues[pair.ttl]
        elif pair in self._unstamped:
            self._unstamped.remove(pair)


def _host(identity: bytes) -> bytes:
    """The address part of an ``ip:port`` or ``[ipv6]:port`` identity."""
    return identity.rsplit(b":", 1)[0]
