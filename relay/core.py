"""The handshake-port relay as a pure state machine (docs/protocol.md §4).

The driver owns sockets and timers; it tells a ``Relay`` what happened on a connection
(``connect``, ``receive``, ``disconnect``, ``expire``, ``shutdown``) and performs the outputs it
gets back, in order: ``Send`` writes bytes, ``Close`` closes a connection once everything sent
to it before is written. Connections are named by whatever hashable ``conn`` the driver likes.
Keeping I/O out makes every rule testable byte for byte without a network.

A plain client (01) is a candidate of every registered server, as bob announces each server
to each client; a scoped client (10, docs/protocol.md §10) only of the servers whose
salt starts with its nameplate. Instead of storing that relation (clients × servers
entries), each peer keeps only its *links*: pairs whose handshake ended (Refused,
Spoke_failure: no longer candidates), reached Agreement (the only pairs that may be
Accepted), or where the client has spoken to the server (so only those servers hear that it
left). Memory stays linear in peers plus packets actually exchanged.

Rendezvous cost: servers are indexed by nameplate
and scoped clients by theirs, so a scoped arrival costs the servers of its nameplate and a
new server the scoped clients of its nameplate plus the plain clients. A plain client is
announced the servers by a cursor over the insertion-ordered servers, a batch of at most
``announce_budget`` bytes at a time: the next batch comes when the driver says the client
read the last one (``drained``), so the relay's own announcements can never overflow a
reading client's outbox, and no client holds a copy of the server list. A client has been
*told* of a server when the server is of its nameplate (scoped) or its cursor has passed
the server's place (plain): only then does it hear Closed for it.

Stricter than bob, with identical bytes on the wire for honest peers:
- a peer-to-peer packet goes only to a live peer of the other role that is its candidate;
- Accepted is acted on only after the server's Agreement went through the relay to that
  client, so a stranger cannot pull a waiting sender off the relay by "accepting" it;
- Refused is forwarded, departures and pairings are announced with Closed;
- UIDs are never shared by two live peers (see ``relay.uids``);
- a client's repeated Hello announces the senders again but does not revive a pair that
  ended: otherwise one connection could run handshake after handshake with every sender,
  each one an offline guess of its code and one of its few attempts. A client's scope is
  fixed by its first Hello: a later 01 or 10, whatever nameplate it names, repeats that
  first one (a receiver falling back to 01 after a late 03 keeps working; one that wants
  another nameplate reconnects);
- at most ``max_senders_per_nameplate`` servers wait with one nameplate: one more is
  refused like an over-limit Hello (Timeout, close), so a flood cannot bury a nameplate's
  receivers;
- each handshake (a client's 07 forwarded) is counted by the guard (``relay.limits``) until
  it ends; one that ends without an agreement by the client's doing counts as failed against
  the client's address and the sender, and past their limits the relay answers a new 07 with
  Closed (that sender's UID) to that client alone and forwards nothing.
"""

from __future__ import annotations

import bisect
import enum
import logging
from operator import itemgetter
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

ANNOUNCE_BUDGET = 16 * 1024
"""Bytes of announcements a plain client is given at a time (the driver's default is a
quarter of its outbox limit): the next batch waits until it read these."""

_SEQ = itemgetter(0)


def nameplate_of(public: bytes) -> int:
    """A server's nameplate: the first two salt bytes, bytes 18–19 of its public (§8.1).
    bob's senders have random salts, so they land on random nameplates."""
    return int.from_bytes(public[18:20], "big")


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
    announcements: int = 0
    """New_server packets (04) sent to clients."""
    senders_refused: int = 0
    """Senders refused because their nameplate had ``max_senders_per_nameplate`` waiting."""


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
    SPOKEN = "spoken"
    """The client's packets reached the server (it knows the client's UID), nothing more yet."""


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
    failures: Failures | None = None
    """A server's failed handshakes (from every client): its count for the guard."""
    nameplate: int | None = None
    """A server's nameplate (from its salt); a scoped client's; None for a plain client."""
    seq: int = 0
    """A server's place in the relay's order of servers; 0 once it left."""
    cursor: int = 0
    """A plain client: the place of the last server its announcement considered."""
    high: int = 0
    """A plain client: the furthest place any of its announcements reached (it was told of
    every live server up to there, its repeated Hellos restart ``cursor`` only)."""
    credit: int = 0
    """A plain client: bytes of announcements it may be sent before it reads them."""

    def describe(self) -> str:
        who = self.identity.decode("ascii", "replace")
        if self.role is None:
            return f"connection {who}"
        return f"{self.role} {self.uid:04x} ({who})"


class Relay:
    """The handshake relay: registrations, forwarding, pairings and departures."""

    def __init__(self, rooms: RoomBook | None = None, uids: UidPool | None = None,
                 hello_gate: HelloGate | None = None, guard: Guard | None = None,
                 clock: Clock | None = None, refusal_log: RefusalLog | None = None,
                 announce_budget: int = ANNOUNCE_BUDGET) -> None:
        """Without a ``guard`` failed handshakes are counted but never refused (the default
        guard keeps only the per-nameplate sender cap); with one, the
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
        self.announce_budget = announce_budget
        """Bytes of announcements a plain client gets per batch; at least one 04 fits."""
        self._senders: dict[int, dict[int, _Peer]] = {}
        """Nameplate → its waiting servers, by UID."""
        self._scoped: dict[int, dict[int, _Peer]] = {}
        """Nameplate → its waiting scoped clients, by UID."""
        self._plain: dict[int, _Peer] = {}
        """Waiting plain clients, by UID."""
        self._order: list[tuple[int, _Peer]] = []
        """(place, server) in registration order; entries whose server left (its ``seq`` no
        longer matches) are skipped by cursors and swept out when they are the majority."""
        self._gone = 0
        self._next_seq = 1

    # -- introspection --------------------------------------------------------------------

    @property
    def peers(self) -> dict[Role, int]:
        """Registered peers by role."""
        return {role: len(table) for role, table in self._registered.items()}

    @property
    def waiting(self) -> dict[str, int]:
        """Registered peers by kind: senders, scoped and plain receivers (for the metrics)."""
        return {"sender": len(self._registered[Role.SERVER]),
                "scoped": len(self._registered[Role.CLIENT]) - len(self._plain),
                "plain": len(self._plain)}

    def scope_of(self, conn: Hashable) -> int | None:
        """A registered client's nameplate, None if it is plain (or not a client)."""
        peer = self._conns.get(conn)
        return peer.nameplate if peer is not None and peer.role is Role.CLIENT else None

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
        if peer.role is Role.SERVER:
            return frozenset(other.uid for other in self._registered[Role.CLIENT].values()
                             if self._may_pair(other, peer)
                             and peer.links.get(other.uid) is not _Link.ENDED)
        return frozenset(other.uid for other in self._registered[Role.SERVER].values()
                         if self._may_pair(peer, other)
                         and peer.links.get(other.uid) is not _Link.ENDED)

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

    def drained(self, conn: Hashable) -> list[Output]:
        """Everything sent to ``conn`` so far was written to its socket: a plain client gets
        its next batch of announcements (if any is due)."""
        out: list[Output] = []
        peer = self._conns.get(conn)
        if peer is not None and peer.role is Role.CLIENT and peer.nameplate is None:
            peer.credit = self.announce_budget
            self._pump(out, peer)
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
        self._senders.clear()
        self._scoped.clear()
        self._plain.clear()
        self._order.clear()
        return out

    # -- packet handling ------------------------------------------------------------------

    def _handle(self, out: list[Output], peer: _Peer, frame: wire.Frame) -> None:
        packet = frame.packet
        match packet:
            case wire.HelloClient():
                self._hello(out, peer, frame.uid, Role.CLIENT)
            case wire.HelloScopedClient(nameplate=nameplate):
                self._hello(out, peer, frame.uid, Role.CLIENT, scope=nameplate)
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
               public: bytes | None = None, scope: int | None = None) -> None:
        if uid != wire.RELAY_UID:
            log.debug("%s sent a Hello to UID %04x: ignored", peer.describe(), uid)
            return
        if peer.role is not None and peer.role is not role:
            log.debug("%s sent a Hello as a %s: ignored", peer.describe(), role)
            return
        refusal = self.hello_gate(peer.conn) if self.hello_gate is not None else None
        if refusal is None and role is Role.SERVER:
            assert public is not None
            refusal = self._over_nameplate_cap(peer, nameplate_of(public))
        if refusal is not None:
            self.counts.hellos_refused += 1
            if peer.role is None:
                self._send(out, peer, wire.RELAY_UID, wire.Timeout())
                self._close(out, peer, refusal)
            else:
                self._depart(out, peer, refusal, timed_out=True)
            return
        if peer.role is Role.SERVER:
            self._hello_again(out, peer, public)
            return
        if peer.role is None:
            new_uid = self._uids.allocate()
            if new_uid is None:
                self._send(out, peer, wire.RELAY_UID, wire.Timeout())
                self._close(out, peer, "no free UID")
                return
            peer.role, peer.uid = role, new_uid
            self._registered[role][new_uid] = peer
            if role is Role.SERVER:
                assert public is not None
                self._index_server(peer, public)
            elif scope is None:
                self._plain[new_uid] = peer
                peer.credit = self.announce_budget
            else:
                peer.nameplate = scope
                self._scoped.setdefault(scope, {})[new_uid] = peer
            log.info("%s registered%s", peer.describe(),
                     "" if scope is None else f" for nameplate {scope}")
        else:
            # A client asking again gets its candidates again, but the pairs that ended stay
            # ended: each new handshake with a sender would be one more guess of its code.
            # The packets go to it alone, so a client that repeats without reading only fills
            # its own outbox. Its scope stays that of its first Hello.
            log.debug("%s repeated its Hello", peer.describe())
            peer.cursor = 0
        if role is Role.CLIENT:
            self._send(out, peer, wire.RELAY_UID, wire.ClientIdentity(peer.identity))
            if peer.nameplate is None:
                self._pump(out, peer)
            else:
                for server in self._senders.get(peer.nameplate, {}).values():
                    if peer.links.get(server.uid) is not _Link.ENDED:
                        self._announce(out, peer, server)
        else:
            self._send(out, peer, wire.RELAY_UID, wire.ServerIdentity(peer.identity))
            self._announce_new(out, peer, list(self._scoped.get(peer.nameplate, {}).values()))

    def _over_nameplate_cap(self, peer: _Peer, nameplate: int) -> str | None:
        """A refusal if one more server with ``nameplate`` would exceed the cap."""
        if peer.role is Role.SERVER and peer.nameplate == nameplate:
            return None  # already counted there
        refusal = self.guard.senders_waiting(len(self._senders.get(nameplate, ())))
        if refusal is None:
            return None
        self.counts.senders_refused += 1
        self._refusal_log.refused(refusal, f"{peer.describe()} for nameplate {nameplate}",
                                  self._clock())
        return refusal.describe()

    def _index_server(self, server: _Peer, public: bytes) -> None:
        server.nameplate = nameplate_of(public)
        if server.failures is None:  # only senders need one; it outlives a repeated Hello
            server.failures = Failures()
        server.announcement = wire.encode(
            wire.RELAY_UID, wire.NewServer(server.uid, public, server.identity))
        server.seq = self._next_seq
        self._next_seq += 1
        self._order.append((server.seq, server))
        self._senders.setdefault(server.nameplate, {})[server.uid] = server

    def _unindex(self, peer: _Peer) -> None:
        """Take a registered peer out of the rendezvous indexes."""
        if peer.role is Role.SERVER:
            _remove(self._senders, peer.nameplate, peer.uid)
            peer.seq = 0
            self._gone += 1
            if self._gone > 64 and 2 * self._gone > len(self._order):
                self._order = [entry for entry in self._order if entry[1].seq == entry[0]]
                self._gone = 0
        elif peer.nameplate is None:
            del self._plain[peer.uid]
        else:
            _remove(self._scoped, peer.nameplate, peer.uid)

    def _announce_new(self, out: list[Output], server: _Peer, scoped: list[_Peer]) -> None:
        """A server (or its new public) is announced: directly to the ``scoped`` clients,
        and to each plain client by its cursor, now if it is caught up and has credit."""
        for client in scoped:
            self._announce(out, client, server)
        for client in self._plain.values():
            self._pump(out, client)

    def _pump(self, out: list[Output], client: _Peer) -> None:
        """Announce to a plain client the servers after its cursor, as its credit allows."""
        order = self._order
        i = bisect.bisect_right(order, client.cursor, key=_SEQ)
        while i < len(order):
            seq, server = order[i]
            if server.seq == seq and client.links.get(server.uid) is not _Link.ENDED:
                if len(server.announcement) > client.credit:
                    break
                client.credit -= len(server.announcement)
                self._announce(out, client, server)
            client.cursor = seq
            i += 1
        if client.cursor > client.high:
            client.high = client.cursor

    def _announce(self, out: list[Output], client: _Peer, server: _Peer) -> None:
        self.counts.announcements += 1
        self._write(out, client, server.announcement)

    def _told(self, client: _Peer, server: _Peer) -> bool:
        """Whether ``client`` was announced ``server`` (so may hear Closed for it)."""
        if client.nameplate is None:
            return server.seq <= client.high
        return client.nameplate == server.nameplate

    def _may_pair(self, client: _Peer, server: _Peer) -> bool:
        return client.nameplate is None or client.nameplate == server.nameplate

    def _hello_again(self, out: list[Output], peer: _Peer, public: bytes | None) -> None:
        """A registered sender repeats its Hello: re-announce it only where that changes
        something.

        bob re-sends a sender's 04 to every receiver each time, so one 40-byte packet costs
        every receiver 86 bytes and a few senders repeating Hello in a loop fill honest
        receivers' outboxes until they are cut off. bob's own peers never repeat a Hello.
        With the same public, only receivers whose pair with it had ended learn it again (it
        becomes their candidate again); a new public is a new spoke session, announced to
        all that may pair with it (keeping its place, so a cursor still to reach it
        announces the new one; receivers of a nameplate it left hear Closed). A sender that
        re-announces itself more than MAX_REANNOUNCEMENTS times is closed.
        """
        assert public is not None
        announcement = wire.encode(wire.RELAY_UID, wire.NewServer(peer.uid, public, peer.identity))
        clients = self._registered[Role.CLIENT]
        left: list[_Peer] = []
        told: list[_Peer] | None = None
        if announcement == peer.announcement:
            ended = [clients[uid] for uid, link in peer.links.items()
                     if link is _Link.ENDED and uid in clients]
            for client in ended:
                del peer.links[client.uid]
                client.links.pop(peer.uid, None)
            # One whose cursor did not reach it yet will be told by the cursor.
            targets = [client for client in ended if self._told(client, peer)]
        else:
            told = [client for client in self._scoped.get(peer.nameplate, {}).values()]
            told += [client for client in self._plain.values() if self._told(client, peer)]
            self._end_handshakes(peer, failed=False)
            self._unlink_all(peer)
            nameplate = nameplate_of(public)
            if nameplate != peer.nameplate:
                left = list(self._scoped.get(peer.nameplate, {}).values())
                _remove(self._senders, peer.nameplate, peer.uid)
                peer.nameplate = nameplate
                self._senders.setdefault(nameplate, {})[peer.uid] = peer
            peer.announcement = announcement
            targets = list(self._scoped.get(nameplate, {}).values())
            targets += [client for client in self._plain.values() if self._told(client, peer)]
        self._send(out, peer, wire.RELAY_UID, wire.ServerIdentity(peer.identity))
        if not targets and not left:
            log.debug("%s repeated its Hello", peer.describe())
            return
        peer.reannouncements += 1
        if peer.reannouncements > MAX_REANNOUNCEMENTS:
            # Closed to those told of its last session, not to those it was to be told to.
            self._depart(out, peer, "keeps repeating its Hello", timed_out=True, told=told)
            return
        log.debug("%s repeated its Hello: announced again to %d receivers",
                  peer.describe(), len(targets))
        for client in left:
            self._send(out, client, wire.RELAY_UID, wire.Closed(peer.uid))
        for client in targets:
            if client.nameplate is None:  # holds its cursor back until it read this too
                client.credit -= len(peer.announcement)
            self._announce(out, client, peer)

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
        if target is None or link is _Link.ENDED or not (
                self._may_pair(sender, target) if sender.role is Role.CLIENT
                else self._may_pair(target, sender)):
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
        if sender.role is Role.CLIENT and target.uid not in sender.links:
            # Now the server knows this client's UID: it is owed a Closed when the client goes.
            self._link(sender, target, _Link.SPOKEN)
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
                timed_out: bool = False, told: list[_Peer] | None = None) -> None:
        """The peer is gone: its candidates learn it with Closed, nothing of it remains.
        ``told``, if given, are the peers to tell instead (its candidates changed just now)."""
        uid = peer.uid
        candidates = self._unregister(peer) if peer.role is not None else []
        if told is None:
            told = candidates
        if timed_out:
            self._send(out, peer, wire.RELAY_UID, wire.Timeout())
        self._close(out, peer, reason)
        for other in told:
            self._send(out, other, wire.RELAY_UID, wire.Closed(uid))

    # -- state helpers --------------------------------------------------------------------

    def _candidates(self, peer: _Peer) -> list[_Peer]:
        """The peer's candidates that know of the pair: a client's servers it has spoken to
        (a handshake open, or agreed), a server's clients told of it.

        A server learns a client's UID only from the client's own packets, so a Closed for a
        client it never heard from would tell it nothing (ours ignores it; bob's relay sends
        none at all): a plain client leaving a crowd of thousands costs its handshakes, not
        the crowd. Cost for a server: the scoped clients of its nameplate and the plain."""
        assert peer.role is not None
        if peer.role is Role.CLIENT:
            servers = self._registered[Role.SERVER]
            others = [servers[uid] for uid, link in sorted(peer.links.items())
                      if link is not _Link.ENDED and uid in servers]
        else:
            others = list(self._scoped.get(peer.nameplate, {}).values())
            others += [client for client in self._plain.values() if peer.seq <= client.high]
        return [other for other in others if peer.links.get(other.uid) is not _Link.ENDED]

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
        self._unindex(peer)
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


def _remove(index: dict[int, dict[int, _Peer]], nameplate: int | None, uid: int) -> None:
    """Drop ``uid`` from ``index[nameplate]``, and the nameplate once it has nobody left."""
    assert nameplate is not None
    table = index[nameplate]
    del table[uid]
    if not table:
        del index[nameplate]
