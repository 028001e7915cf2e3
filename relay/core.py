"""The handshake-port relay as a pure state machine (docs/protocol.md §4).

The driver owns sockets and timers; it tells a ``Relay`` what happened on a connection
(``connect``, ``receive``, ``disconnect``, ``expire``, ``shutdown``) and performs the outputs it
gets back, in order: ``Send`` writes bytes, ``Close`` closes a connection once everything sent
to it before is written. Connections are named by whatever hashable ``conn`` the driver likes.
Keeping I/O out makes every rule testable byte for byte without a network.

Every registered client is a candidate of every registered server: bob announces each server
to each client. So instead of storing that full relation (clients × servers entries), each peer
keeps only its *links*: pairs whose handshake ended (Refused, Spoke_failure: no longer
candidates) or reached Agreement (the only pairs that may be Accepted). Memory stays linear
in peers plus packets actually exchanged.

Stricter than bob, with identical bytes on the wire for honest peers:
- a peer-to-peer packet goes only to a live peer of the other role that is its candidate;
- Accepted is acted on only after the server's Agreement went through the relay to that
  client, so a stranger cannot pull a waiting sender off the relay by "accepting" it;
- Refused is forwarded, departures and pairings are announced with Closed;
- UIDs are never shared by two live peers (see ``relay.uids``);
- a client's repeated Hello announces the senders again but does not revive a pair that
  ended: otherwise one connection could run handshake after handshake with every sender,
  each one an offline guess of its code and one of its few attempts;
- each handshake (a client's 07 forwarded) is counted by the guard (``relay.limits``) until
  it ends; one that ends without an agreement by the client's doing counts as failed against
  the client's address and the sender, and past their limits the relay answers a new 07 with
  Closed (that sender's UID) to that client alone and forwards nothing.
"""

from __future__ import annotations

import enum
import logging
from typing import Callable, Hashable, Union

import attrs

from relay import wire
from relay.limits import Attempt, Failures, Guard, Limits, Refusal, RefusalLog, host_of
from relay.rooms import RoomBook
from relay.uids import UidPool

log = logging.getLogger("relay.core")

MIN_IDENTITY = 5
"""bob's parser looks for the NUL only once 6 bytes follow the fixed part (docs/protocol.md §3.1)."""

MAX_REANNOUNCEMENTS = 4
"""A sender may make the relay announce it to receivers again this often (see _hello_again)."""


@attrs.frozen
class Send:
    """Write ``data`` to ``conn``."""

    conn: Hashable
    data: bytes


@attrs.frozen
class Close:
    """Close ``conn`` after writing what was sent to it before; ``reason`` is for the log."""

    conn: Hashable
    reason: str


Output = Union[Send, Close]

Clock = Callable[[], float]
"""The driver's clock, read when a handshake starts or ends (the failed-handshake window)."""

HelloGate = Callable[[Hashable], Union[str, None]]
"""Asked about every Hello, with the connection it came on: None lets it through, a string
refuses it (Timeout 0f, then close) and says why, for the log."""


@attrs.define
class HandshakeCounts:
    """What the relay saw of handshakes since it started: for the metrics.

    The relay cannot read a handshake, only which packets pass: a client's
    X_and_client_identity (07) starts one with a server, the server's Agreement (08) means
    both sides proved the same code, a Spoke_failure (0d) that it failed (a wrong code,
    most often), Refused (0b) and Accepted (0a) are the receiver's answer to an agreement.
    """

    started: int = 0
    agreed: int = 0
    failed: int = 0
    refused: int = 0
    accepted: int = 0
    hellos_refused: int = 0
    attempts_failed: int = 0
    """Handshakes begun (07) that ended without an agreement because of the client: a
    Spoke_failure or Refused before the Agreement (except the server's Spoke_failure before
    its 06, which gave the client nothing), or the client leaving: what the limits count."""
    handshakes_refused: int = 0
    """07s not forwarded because the client's address or the sender was over its limit."""


class Role(enum.StrEnum):
    CLIENT = "client"
    """A receiver (``bob recv``)."""
    SERVER = "server"
    """A sender (``bob send``)."""


class _Link(enum.Enum):
    ENDED = "ended"
    """Refused or Spoke_failure between them: no longer candidates."""
    AGREED = "agreed"
    """The server sent Agreement to the client: the client may now Accept it."""


_SENT_BY = {
    Role.CLIENT: frozenset({
        wire.ClientValidator.TYPE, wire.XAndClientIdentity.TYPE, wire.Accepted.TYPE,
        wire.Refused.TYPE, wire.SpokeFailure.TYPE,
    }),
    Role.SERVER: frozenset({
        wire.YAndServerValidator.TYPE, wire.Agreement.TYPE, wire.SpokeFailure.TYPE,
    }),
}
"""Peer-to-peer types each role may send (to the other role)."""

_OTHER = {Role.CLIENT: Role.SERVER, Role.SERVER: Role.CLIENT}


@attrs.define(eq=False)
class _Handshake:
    """A handshake under way between a client and a server (a 07 forwarded, no end yet)."""

    attempt: Attempt
    answered: bool = False
    """The server's 06 went through: from then on the client holds a guess."""


@attrs.define(eq=False)
class _Peer:
    """One handshake-port connection, registered or not. Dropped when it closes."""

    conn: Hashable
    identity: bytes
    parser: wire.Parser = attrs.Factory(wire.Parser)
    role: Role | None = None
    uid: int = wire.RELAY_UID
    announcement: bytes = b""
    """A server's New_server packet, encoded once and sent to every client."""
    links: dict[int, _Link] = attrs.Factory(dict)
    """Peer UID → the state of this pair, for pairs that differ from 'candidate'."""
    reannouncements: int = 0
    """How often a repeated Hello of this sender was announced to receivers again."""
    handshakes: dict[int, _Handshake] = attrs.Factory(dict)
    """Peer UID → the handshake under way with it (kept on both peers, like ``links``)."""
    failures: Failures = attrs.Factory(Failures)
    """A server's failed handshakes (from every client): its count for the guard."""

    def describe(self) -> str:
        who = self.identity.decode("ascii", "replace")
        if self.role is None:
            return f"connection {who}"
        return f"{self.role} {self.uid:04x} ({who})"


class Relay:
    """The handshake relay: registrations, forwarding, pairings and departures."""

    def __init__(self, rooms: RoomBook | None = None, uids: UidPool | None = None,
                 hello_gate: HelloGate | None = None, guard: Guard | None = None,
                 clock: Clock | None = None, refusal_log: RefusalLog | None = None) -> None:
        """Without a ``guard`` handshakes are counted but never refused; with one, the
        driver's ``clock`` is needed for its window. ``refusal_log`` says what the guard
        refused (the driver's, so that one line a second per limit holds for the relay)."""
        if guard is not None and clock is None:
            raise ValueError("a guard needs a clock")
        self.rooms = rooms if rooms is not None else RoomBook()
        self._uids = uids if uids is not None else UidPool()
        self.hello_gate = hello_gate
        self.guard = guard if guard is not None else Guard(Limits(
            max_failed_handshakes_per_address=0, max_failed_handshakes_per_sender=0))
        self._clock: Clock = clock if clock is not None else (lambda: 0.0)
        self._refusal_log = refusal_log if refusal_log is not None else RefusalLog(log)
        self.counts = HandshakeCounts()
        self._conns: dict[Hashable, _Peer] = {}
        self._registered: dict[Role, dict[int, _Peer]] = {Role.CLIENT: {}, Role.SERVER: {}}

    # -- introspection --------------------------------------------------------------------

    @property
    def peers(self) -> dict[Role, int]:
        """Registered peers by role."""
        return {role: len(table) for role, table in self._registered.items()}

    @property
    def connections(self) -> int:
        """Open handshake connections, registered or not."""
        return len(self._conns)

    @property
    def open_handshakes(self) -> int:
        """Handshakes under way (a 07 forwarded, not ended yet)."""
        return sum(len(peer.handshakes) for peer in self._registered[Role.CLIENT].values())

    @property
    def uids_in_use(self) -> int:
        return self._uids.in_use

    def registered(self, conn: Hashable) -> Role | None:
        peer = self._conns.get(conn)
        return peer.role if peer is not None else None

    def uid_of(self, conn: Hashable) -> int | None:
        peer = self._conns.get(conn)
        return peer.uid if peer is not None and peer.role is not None else None

    def candidates_of(self, conn: Hashable) -> frozenset[int]:
        """UIDs this peer may address: for tests and debugging, costs O(peers of the other role)."""
        peer = self._conns.get(conn)
        if peer is None or peer.role is None:
            return frozenset()
        return frozenset(other.uid for other in self._candidates(peer))

    # -- events from the driver -----------------------------------------------------------

    def connect(self, conn: Hashable, identity: bytes) -> list[Output]:
        """A new handshake-port connection; ``identity`` is ``wire.identity_of`` its address."""
        if conn in self._conns:
            raise ValueError(f"connection {conn!r} is already open")
        identity = bytes(identity)
        if not MIN_IDENTITY <= len(identity) <= wire.MAX_IDENTITY or any(
                c in identity for c in b"\0\n"):
            # Checked here so that encoding our replies can never fail mid-packet later.
            raise ValueError(f"identity {identity!r} cannot be sent to peers")
        self._conns[conn] = _Peer(conn, identity)
        log.debug("connection from %s", identity.decode("ascii", "replace"))
        return []

    def receive(self, conn: Hashable, data: bytes) -> list[Output]:
        """Bytes read from ``conn``. Late bytes from a connection already closed are dropped."""
        out: list[Output] = []
        peer = self._conns.get(conn)
        if peer is None:
            return out
        try:
            peer.parser.feed(data)
            for frame in peer.parser.frames():
                self._handle(out, peer, frame)
                if conn not in self._conns:
                    break  # closed by that packet (paired, no free UID): ignore the rest
        except wire.WireError as error:
            self._depart(out, peer, f"malformed: {error}")
        return out

    def disconnect(self, conn: Hashable) -> list[Output]:
        """EOF or a socket error on ``conn``."""
        out: list[Output] = []
        peer = self._conns.get(conn)
        if peer is not None:
            self._depart(out, peer, "disconnected")
        return out

    def expire(self, conn: Hashable) -> list[Output]:
        """The driver's deadline for ``conn`` passed (Hello deadline or handshake timeout)."""
        out: list[Output] = []
        peer = self._conns.get(conn)
        if peer is None:
            return out
        if peer.role is None:
            self._close(out, peer, "no Hello in time")
        else:
            self._depart(out, peer, "handshake timeout", timed_out=True)
        return out

    def shutdown(self) -> list[Output]:
        """The relay is stopping: tell every registered peer (Closed 0000), close everything."""
        out: list[Output] = []
        for table in self._registered.values():
            for peer in table.values():
                self._send(out, peer, wire.RELAY_UID, wire.Closed(wire.RELAY_UID))
        # Nobody is left to notify, so skip the per-peer candidate walk of a departure.
        for peer in list(self._conns.values()):
            if peer.role is not None:
                self._end_handshakes(peer, failed=False)
                self._uids.release(peer.uid)
            self._close(out, peer, "relay shutting down")
        for table in self._registered.values():
            table.clear()
        return out

    # -- packet handling ------------------------------------------------------------------

    def _handle(self, out: list[Output], peer: _Peer, frame: wire.Frame) -> None:
        packet = frame.packet
        match packet:
            case wire.HelloClient():
                self._hello(out, peer, frame.uid, Role.CLIENT)
            case wire.HelloServer(public=public):
                self._hello(out, peer, frame.uid, Role.SERVER, public)
            case wire.RelayFailure(letter=letter, peer_uid=about):
                log.info("%s reports relay failure %s%04x", peer.describe(),
                         letter.decode("ascii"), about)
            case _ if packet.TYPE in wire.PEER_TO_PEER:
                self._forward(out, peer, frame.uid, packet)
            case _:
                log.debug("%s sent relay-only packet %02x: ignored", peer.describe(), packet.TYPE)

    def _hello(self, out: list[Output], peer: _Peer, uid: int, role: Role,
               public: bytes | None = None) -> None:
        if uid != wire.RELAY_UID:
            log.debug("%s sent a Hello to UID %04x: ignored", peer.describe(), uid)
            return
        if peer.role is not None and peer.role is not role:
            log.debug("%s sent a Hello as a %s: ignored", peer.describe(), role)
            return
        refusal = self.hello_gate(peer.conn) if self.hello_gate is not None else None
        if refusal is not None:
            self.counts.hellos_refused += 1
            if peer.role is None:
                self._send(out, peer, wire.RELAY_UID, wire.Timeout())
                self._close(out, peer, refusal)
            else:
                self._depart(out, peer, refusal, timed_out=True)
            return
        if peer.role is None:
            new_uid = self._uids.allocate()
            if new_uid is None:
                self._send(out, peer, wire.RELAY_UID, wire.Timeout())
                self._close(out, peer, "no free UID")
                return
            peer.role, peer.uid = role, new_uid
            self._registered[role][new_uid] = peer
            log.info("%s registered", peer.describe())
        elif role is Role.CLIENT:
            # A client asking again gets its candidates again, but the pairs that ended stay
            # ended: each new handshake with a sender would be one more guess of its code.
            # The packets go to it alone, so a client that repeats without reading only fills
            # its own outbox.
            log.debug("%s repeated its Hello", peer.describe())
        else:
            self._hello_again(out, peer, public)
            return
        if role is Role.CLIENT:
            self._send(out, peer, wire.RELAY_UID, wire.ClientIdentity(peer.identity))
            for server in self._registered[Role.SERVER].values():
                if peer.links.get(server.uid) is not _Link.ENDED:
                    self._write(out, peer, server.announcement)
        else:
            assert public is not None
            peer.announcement = wire.encode(
                wire.RELAY_UID, wire.NewServer(peer.uid, public, peer.identity))
            self._send(out, peer, wire.RELAY_UID, wire.ServerIdentity(peer.identity))
            for client in self._registered[Role.CLIENT].values():
                self._write(out, client, peer.announcement)

    def _hello_again(self, out: list[Output], peer: _Peer, public: bytes | None) -> None:
        """A registered sender repeats its Hello: re-announce it only where that changes
        something.

        bob re-sends a sender's 04 to every receiver each time, so one 40-byte packet costs
        every receiver 86 bytes and a few senders repeating Hello in a loop fill honest
        receivers' outboxes until they are cut off. bob's own peers never repeat a Hello.
        With the same public, only receivers whose pair with it had ended learn it again (it
        becomes their candidate again); a new public is a new spoke session, announced to
        all. A sender that re-announces itself more than MAX_REANNOUNCEMENTS times is
        closed.
        """
        assert public is not None
        announcement = wire.encode(wire.RELAY_UID, wire.NewServer(peer.uid, public, peer.identity))
        clients = self._registered[Role.CLIENT]
        if announcement == peer.announcement:
            targets = [clients[uid] for uid, link in peer.links.items()
                       if link is _Link.ENDED and uid in clients]
            for client in targets:
                del peer.links[client.uid]
                client.links.pop(peer.uid, None)
        else:
            self._end_handshakes(peer, failed=False)
            self._unlink_all(peer)
            peer.announcement = announcement
            targets = list(clients.values())
        self._send(out, peer, wire.RELAY_UID, wire.ServerIdentity(peer.identity))
        if not targets:
            log.debug("%s repeated its Hello", peer.describe())
            return
        peer.reannouncements += 1
        if peer.reannouncements > MAX_REANNOUNCEMENTS:
            self._depart(out, peer, "keeps repeating its Hello", timed_out=True)
            return
        log.debug("%s repeated its Hello: announced again to %d receivers",
                  peer.describe(), len(targets))
        for client in targets:
            self._write(out, client, peer.announcement)

    def _forward(self, out: list[Output], sender: _Peer, to_uid: int,
                 packet: wire.Packet) -> None:
        if sender.role is None:
            log.debug("%s is not registered: packet %02x dropped", sender.describe(), packet.TYPE)
            return
        if packet.TYPE not in _SENT_BY[sender.role]:
            log.debug("%s may not send packet %02x: dropped", sender.describe(), packet.TYPE)
            return
        target = self._registered[_OTHER[sender.role]].get(to_uid)
        link = sender.links.get(to_uid)
        if target is None or link is _Link.ENDED:
            log.debug("%s sent packet %02x to UID %04x, not its candidate: dropped",
                      sender.describe(), packet.TYPE, to_uid)
            return
        match packet:
            case wire.Accepted():
                if link is not _Link.AGREED:
                    log.debug("%s accepted %s without its Agreement: dropped",
                              sender.describe(), target.describe())
                    return
                self._pair(out, sender, target)
                return
            case wire.XAndClientIdentity():
                if not self._begin_handshake(out, sender, target):
                    return
            case wire.YAndServerValidator():
                handshake = sender.handshakes.get(target.uid)
                if handshake is not None:
                    handshake.answered = True
            case wire.Agreement():
                self.counts.agreed += 1
                self._end_handshake(target, sender, failed=False)
                self._link(sender, target, _Link.AGREED)
            case wire.Refused() | wire.SpokeFailure():
                if isinstance(packet, wire.Refused):
                    self.counts.refused += 1
                else:
                    self.counts.failed += 1
                client, server = (sender, target) if sender.role is Role.CLIENT else (target, sender)
                handshake = client.handshakes.get(server.uid)
                # A server's Spoke_failure before its 06 (an X that is no point) gave the
                # client nothing to test a guess with and cost the server nothing.
                failed = handshake is not None and (sender is client or handshake.answered)
                self._end_handshake(client, server, failed=failed)
                self._link(sender, target, _Link.ENDED)
        self._send(out, target, sender.uid, packet)

    def _begin_handshake(self, out: list[Output], client: _Peer, server: _Peer) -> bool:
        """A client's 07 to ``server``: True to forward it. A repeated 07 within a handshake
        is no new guess (the server ignores it); a new one must pass the guard."""
        if server.uid in client.handshakes:
            return True
        verdict = self.guard.start_handshake(host_of(client.identity), server.failures,
                                             self._clock())
        if isinstance(verdict, Refusal):
            self._refuse_handshake(out, client, server, verdict)
            return False
        handshake = _Handshake(verdict)
        client.handshakes[server.uid] = server.handshakes[client.uid] = handshake
        self.counts.started += 1
        return True

    def _refuse_handshake(self, out: list[Output], client: _Peer, server: _Peer,
                          refusal: Refusal) -> None:
        """Over a limit: the server never hears of it (so it spends nothing), the client is
        told that sender is gone for it. bob's and our receivers then forget that sender and
        go on with the others; closing the client instead would end its other handshakes
        too, each one an abandoned attempt for its sender."""
        self.counts.handshakes_refused += 1
        self._refusal_log.refused(
            refusal, f"a handshake of {client.describe()} with {server.describe()}", self._clock())
        self._link(client, server, _Link.ENDED)
        self._send(out, client, wire.RELAY_UID, wire.Closed(server.uid))

    def _end_handshake(self, client: _Peer, server: _Peer, *, failed: bool) -> None:
        handshake = client.handshakes.pop(server.uid, None)
        server.handshakes.pop(client.uid, None)
        if handshake is None:
            return
        if failed:
            self.counts.attempts_failed += 1
        self.guard.end_handshake(handshake.attempt, self._clock(), failed=failed)

    def _end_handshakes(self, peer: _Peer, *, failed: bool) -> None:
        """End every handshake of ``peer``; ``failed`` counts them if it is the client."""
        assert peer.role is not None
        others = self._registered[_OTHER[peer.role]]
        for uid in list(peer.handshakes):
            other = others.get(uid)
            if other is None:  # cannot happen: a departure ends its handshakes first
                handshake = peer.handshakes.pop(uid)
                self.guard.end_handshake(handshake.attempt, self._clock(), failed=False)
            elif peer.role is Role.CLIENT:
                self._end_handshake(peer, other, failed=failed)
            else:
                self._end_handshake(other, peer, failed=False)

    def _pair(self, out: list[Output], client: _Peer, server: _Peer) -> None:
        log.info("%s accepted %s: room booked", client.describe(), server.describe())
        self.counts.accepted += 1
        client_uid, server_uid = client.uid, server.uid
        told_of_client = self._unregister(client)
        told_of_server = self._unregister(server)
        # Booked before anything is sent: a peer may reach the secure port as soon as it reads.
        self.rooms.book(client.identity, server.identity)
        self._send(out, server, client_uid, wire.Accepted())
        self._send(out, client, wire.RELAY_UID, wire.Done())
        self._close(out, server, "paired")
        self._close(out, client, "paired")
        for other in told_of_client:
            if other is not server:
                self._send(out, other, wire.RELAY_UID, wire.Closed(client_uid))
        for other in told_of_server:
            self._send(out, other, wire.RELAY_UID, wire.Closed(server_uid))

    def _depart(self, out: list[Output], peer: _Peer, reason: str,
                timed_out: bool = False) -> None:
        """The peer is gone: its candidates learn it with Closed, nothing of it remains."""
        uid = peer.uid
        told = self._unregister(peer) if peer.role is not None else []
        if timed_out:
            self._send(out, peer, wire.RELAY_UID, wire.Timeout())
        self._close(out, peer, reason)
        for other in told:
            self._send(out, other, wire.RELAY_UID, wire.Closed(uid))

    # -- state helpers --------------------------------------------------------------------

    def _candidates(self, peer: _Peer) -> list[_Peer]:
        assert peer.role is not None
        return [
            other for other in self._registered[_OTHER[peer.role]].values()
            if peer.links.get(other.uid) is not _Link.ENDED
        ]

    def _unregister(self, peer: _Peer) -> list[_Peer]:
        """Remove a registered peer from every table, free its UID; return its candidates.

        The peer keeps its role and UID for the log: it is closed right after.
        """
        assert peer.role is not None
        candidates = self._candidates(peer)
        # A client that leaves mid-handshake took the 06 (or may have) and went: the server
        # counts that as an attempt, so the relay does too.
        self._end_handshakes(peer, failed=True)
        self._unlink_all(peer)
        del self._registered[peer.role][peer.uid]
        self._uids.release(peer.uid)
        return candidates

    def _link(self, a: _Peer, b: _Peer, link: _Link) -> None:
        a.links[b.uid] = link
        b.links[a.uid] = link

    def _unlink_all(self, peer: _Peer) -> None:
        assert peer.role is not None
        others = self._registered[_OTHER[peer.role]]
        for other_uid in peer.links:
            other = others.get(other_uid)
            if other is not None:
                other.links.pop(peer.uid, None)
        peer.links.clear()

    # -- outputs --------------------------------------------------------------------------

    def _send(self, out: list[Output], peer: _Peer, uid: int, packet: wire.Packet) -> None:
        self._write(out, peer, wire.encode(uid, packet))

    def _write(self, out: list[Output], peer: _Peer, data: bytes) -> None:
        assert self._conns.get(peer.conn) is peer, "nothing may be sent after a Close"
        out.append(Send(peer.conn, data))

    def _close(self, out: list[Output], peer: _Peer, reason: str) -> None:
        log.info("closing %s: %s", peer.describe(), reason)
        del self._conns[peer.conn]
        out.append(Close(peer.conn, reason))
