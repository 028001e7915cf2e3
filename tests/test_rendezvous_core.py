"""The scoped rendezvous and paced announcements of the relay core (docs/protocol.md
§10): every receiver is told exactly the senders it may pair with (a plain one all, a
scoped one those of its nameplate), each once, hears Closed only for senders it was told
of, and a plain one is never sent more unread announcements than its budget."""

from __future__ import annotations

import itertools
from collections import defaultdict

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from relay import core, wire
from relay.core import Close, Relay, Send
from relay.limits import Guard, Limits, Refusal

BUDGET = 300
"""Small enough that a handful of senders needs several batches."""


def public_for(nameplate: int, n: int) -> bytes:
    """A 34-byte public whose salt starts with ``nameplate`` (bytes 18-19)."""
    return bytes([n % 256, n // 256 % 256]) + bytes(16) + nameplate.to_bytes(2, "big") + bytes(14)


def ident(n: int) -> bytes:
    return b"10.1.%d.%d:%d" % (n // 256 % 256, n % 256, 20000 + n)


class Crowd:
    """Drives a Relay and keeps, per receiver, what it was told, checking as it goes."""

    def __init__(self, budget: int = BUDGET, cap: int = 0):
        limits = Limits(max_failed_handshakes_per_address=0, max_failed_handshakes_per_sender=0,
                        max_senders_per_nameplate=cap)
        self.relay = Relay(guard=Guard(limits), clock=lambda: 0.0, announce_budget=budget)
        self.budget = budget
        self.n = 0
        self.told: dict = defaultdict(dict)
        """Receiver → {UID: public} of senders it was announced and not told Closed of."""
        self.unread: dict = defaultdict(int)
        """Receiver → bytes of announcements sent since it last read everything."""
        self.scope: dict = {}
        """Receiver → its nameplate (None: plain)."""
        self.senders: dict = {}
        """Sender conn → its nameplate."""
        self.closed: dict = {}

    def run(self, outputs):
        for output in outputs:
            assert output.conn not in self.closed, "sent after a close"
            if isinstance(output, Close):
                self.closed[output.conn] = output.reason
                continue
            assert isinstance(output, Send)
            if output.conn not in self.scope:
                continue
            parser = wire.Parser()
            parser.feed(output.data)
            for frame in parser.frames():
                packet = frame.packet
                if isinstance(packet, wire.NewServer):
                    # Once per session: again only for a new public (a new spoke session).
                    before = self.told[output.conn].get(packet.server_uid)
                    assert before != packet.public, "announced twice"
                    self.told[output.conn][packet.server_uid] = packet.public
                    if before is None and self.scope[output.conn] is None:
                        # New senders come within the budget; a sender's new session
                        # (bounded by MAX_REANNOUNCEMENTS) holds the next batch back instead.
                        self.unread[output.conn] += len(output.data)
                        assert self.unread[output.conn] <= self.budget
                elif isinstance(packet, wire.Closed) and packet.peer_uid != wire.RELAY_UID:
                    assert packet.peer_uid in self.told[output.conn], "Closed for a sender never told"
                    del self.told[output.conn][packet.peer_uid]
        return outputs

    def connect(self) -> str:
        self.n += 1
        conn = f"c{self.n}"
        self.run(self.relay.connect(conn, ident(self.n)))
        return conn

    def sender(self, nameplate: int) -> str:
        conn = self.connect()
        self.senders[conn] = nameplate
        self.run(self.relay.receive(conn, wire.encode(
            0, wire.HelloServer(public_for(nameplate, self.n)))))
        return conn

    def receiver(self, nameplate: int | None) -> str:
        conn = self.connect()
        self.scope[conn] = nameplate
        hello = wire.HelloClient() if nameplate is None else wire.HelloScopedClient(nameplate)
        self.run(self.relay.receive(conn, wire.encode(0, hello)))
        return conn

    def leave(self, conn) -> None:
        self.run(self.relay.disconnect(conn))
        self.senders.pop(conn, None)
        self.scope.pop(conn, None)
        self.told.pop(conn, None)

    def read(self, conn) -> list:
        """The receiver read everything sent to it: the driver says so."""
        self.unread[conn] = 0
        return self.run(self.relay.drained(conn))

    def settle(self) -> None:
        """Every receiver reads until nothing more comes."""
        for conn in list(self.scope):
            for _ in range(10_000):
                if not self.read(conn):
                    break
            else:
                raise AssertionError("announcements never end")

    def expected(self, receiver) -> set[int]:
        scope = self.scope[receiver]
        return {self.relay.uid_of(s) for s, nameplate in self.senders.items()
                if scope is None or nameplate == scope}

    def check(self) -> None:
        self.settle()
        for receiver in self.scope:
            assert set(self.told[receiver]) == self.expected(receiver), receiver
            assert self.relay.candidates_of(receiver) == self.expected(receiver)


ARRIVALS = [("S", 1), ("S", 1), ("S", 2), ("R", 1), ("R", None)]


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(ARRIVALS)))))
def test_every_arrival_order_tells_each_receiver_its_senders(order):
    crowd = Crowd()
    for i in order:
        kind, nameplate = ARRIVALS[i]
        crowd.sender(nameplate) if kind == "S" else crowd.receiver(nameplate)
    crowd.check()
    assert crowd.relay.waiting == {"sender": 3, "scoped": 1, "plain": 1}


def test_a_plain_receiver_gets_the_crowd_in_batches_as_it_reads():
    crowd = Crowd()
    senders = [crowd.sender(n % 5) for n in range(40)]
    plain = crowd.receiver(None)
    size = len(crowd.relay._conns[senders[0]].announcement)
    assert len(crowd.told[plain]) == BUDGET // size  # the first batch only
    batches = 1
    while crowd.read(plain):
        batches += 1
    assert batches > 5 and set(crowd.told[plain]) == crowd.expected(plain)
    assert crowd.relay.counts.announcements == 40


def test_departures_and_arrivals_during_a_paced_announcement():
    crowd = Crowd()
    senders = [crowd.sender(1) for _ in range(20)]
    plain = crowd.receiver(None)
    told = len(crowd.told[plain])
    assert 0 < told < 20
    crowd.leave(senders[0])  # told: hears Closed
    crowd.leave(senders[-1])  # not reached yet: skipped, no Closed
    assert len(crowd.told[plain]) == told - 1
    late = crowd.sender(1)  # after the cursor's end: announced once, by the cursor
    crowd.read(plain)
    crowd.leave(senders[10])
    crowd.check()
    assert crowd.relay.uid_of(late) in crowd.told[plain]


def test_a_caught_up_receiver_hears_of_a_new_sender_at_once():
    crowd = Crowd()
    plain, scoped = crowd.receiver(None), crowd.receiver(7)
    sender = crowd.sender(7)
    uid = crowd.relay.uid_of(sender)
    assert set(crowd.told[plain]) == {uid} and set(crowd.told[scoped]) == {uid}
    other = crowd.sender(8)
    assert set(crowd.told[scoped]) == {uid}
    assert crowd.relay.uid_of(other) in crowd.told[plain]


def test_a_scoped_receiver_cannot_reach_a_sender_of_another_nameplate():
    crowd = Crowd()
    mine, theirs = crowd.sender(1), crowd.sender(2)
    receiver = crowd.receiver(1)
    uid_theirs = crowd.relay.uid_of(theirs)
    x = wire.XAndClientIdentity(bytes(32), ident(99))
    assert crowd.run(crowd.relay.receive(receiver, wire.encode(uid_theirs, x))) == []
    out = crowd.run(crowd.relay.receive(receiver, wire.encode(crowd.relay.uid_of(mine), x)))
    assert [o.conn for o in out] == [mine]
    # Nor can the sender of another nameplate reach the receiver.
    y = wire.YAndServerValidator(bytes(32), bytes(64))
    assert crowd.relay.receive(theirs, wire.encode(crowd.relay.uid_of(receiver), y)) == []


def test_a_repeated_hello_keeps_the_first_scope():
    crowd = Crowd()
    one, two = crowd.sender(1), crowd.sender(2)
    scoped = crowd.receiver(1)
    identity = wire.encode(0, wire.ClientIdentity(ident(3)))
    for hello in (wire.HelloClient(), wire.HelloScopedClient(2), wire.HelloScopedClient(1)):
        crowd.told[scoped].clear()  # a repeat announces again, by design
        out = crowd.run(crowd.relay.receive(scoped, wire.encode(0, hello)))
        assert out[0] == Send(scoped, identity)
        assert set(crowd.told[scoped]) == {crowd.relay.uid_of(one)}
    assert crowd.relay.scope_of(scoped) == 1
    # A plain receiver naming a nameplate later stays plain.
    plain = crowd.receiver(None)
    crowd.settle()
    crowd.told[plain].clear()
    crowd.run(crowd.relay.receive(plain, wire.encode(0, wire.HelloScopedClient(1))))
    crowd.settle()
    assert set(crowd.told[plain]) == {crowd.relay.uid_of(one), crowd.relay.uid_of(two)}
    assert crowd.relay.waiting == {"sender": 2, "scoped": 1, "plain": 1}


def test_a_sender_moving_to_another_nameplate_is_closed_there_and_announced_here():
    crowd = Crowd()
    sender = crowd.sender(1)
    old, new, plain = crowd.receiver(1), crowd.receiver(2), crowd.receiver(None)
    crowd.run(crowd.relay.receive(sender, wire.encode(0, wire.HelloServer(public_for(2, 500)))))
    uid = crowd.relay.uid_of(sender)
    assert not crowd.told[old] and set(crowd.told[new]) == {uid}
    assert crowd.told[plain] == {uid: public_for(2, 500)}  # told again: a new session
    crowd.senders[sender] = 2
    crowd.check()


def test_the_nameplate_cap_refuses_one_sender_too_many():
    crowd = Crowd(cap=2)
    crowd.sender(5)
    crowd.sender(5)
    conn = crowd.connect()
    out = crowd.relay.receive(conn, wire.encode(0, wire.HelloServer(public_for(5, 77))))
    assert out == [Send(conn, wire.encode(0, wire.Timeout())),
                   Close(conn, Refusal.SENDERS_PER_NAMEPLATE.describe())]
    assert crowd.relay.guard.refused[Refusal.SENDERS_PER_NAMEPLATE] == 1
    assert crowd.relay.counts.senders_refused == 1
    crowd.sender(6)  # another nameplate is not affected
    assert crowd.relay.waiting["sender"] == 3
    # Moving into a full nameplate is refused too: the sender leaves.
    mover = list(crowd.senders)[-1]
    out = crowd.relay.receive(mover, wire.encode(0, wire.HelloServer(public_for(5, 78))))
    assert Send(mover, wire.encode(0, wire.Timeout())) in out
    assert crowd.relay.registered(mover) is None


def test_a_truncated_or_trailing_scoped_hello_closes_that_connection_only():
    crowd = Crowd()
    sender = crowd.sender(1)
    good = crowd.receiver(1)
    short = crowd.connect()
    assert crowd.relay.receive(short, b"000010\x01") == []  # waits for its second byte
    out = crowd.relay.disconnect(short)
    assert out == [Close(short, "disconnected")]
    bad = crowd.connect()
    out = crowd.relay.receive(bad, wire.encode(0, wire.HelloScopedClient(1)) + b"00zz!!")
    closes = [o for o in out if isinstance(o, Close)]
    assert len(closes) == 1 and closes[0].conn == bad and "malformed" in closes[0].reason
    assert crowd.relay.registered(good) is not None and crowd.relay.registered(sender) is not None


class RendezvousMachine(RuleBasedStateMachine):
    """Senders of a few nameplates and receivers of both kinds come, read and go in any
    order; whatever happens, once everyone has read, each receiver was told exactly the
    senders it may pair with, and no more unread than its budget was ever sent."""

    senders = Bundle("senders")
    receivers = Bundle("receivers")

    def __init__(self):
        super().__init__()
        self.crowd = Crowd(budget=BUDGET)

    @rule(target=senders, nameplate=st.integers(1, 3))
    def sender_arrives(self, nameplate):
        return self.crowd.sender(nameplate)

    @rule(target=receivers, nameplate=st.one_of(st.none(), st.integers(1, 3)))
    def receiver_arrives(self, nameplate):
        return self.crowd.receiver(nameplate)

    @rule(conn=consumes(senders))
    def sender_leaves(self, conn):
        self.crowd.leave(conn)

    @rule(conn=consumes(receivers))
    def receiver_leaves(self, conn):
        self.crowd.leave(conn)

    @rule(conn=receivers)
    def receiver_reads(self, conn):
        self.crowd.read(conn)

    @rule(conn=senders, nameplate=st.integers(1, 3), n=st.integers(1000, 2000))
    def sender_new_session(self, conn, nameplate, n):
        if self.crowd.relay.registered(conn) is None:
            return
        self.crowd.run(self.crowd.relay.receive(conn, wire.encode(
            0, wire.HelloServer(public_for(nameplate, n)))))
        if self.crowd.relay.registered(conn) is None:  # repeated too often: gone
            self.crowd.senders.pop(conn, None)
            return
        self.crowd.senders[conn] = nameplate

    @rule(receiver=receivers, sender=senders)
    def receiver_starts_a_handshake(self, receiver, sender):
        relay = self.crowd.relay
        if relay.registered(receiver) is None or relay.registered(sender) is None:
            return
        x = wire.XAndClientIdentity(bytes(32), ident(9999))
        out = self.crowd.run(relay.receive(receiver, wire.encode(relay.uid_of(sender), x)))
        scope = self.crowd.scope[receiver]
        allowed = scope is None or scope == self.crowd.senders[sender]
        assert [o.conn for o in out] == ([sender] if allowed else [])

    @rule()
    def everyone_reads(self):
        self.crowd.check()

    @invariant()
    def gauges_match(self):
        waiting = self.crowd.relay.waiting
        assert waiting["sender"] == len(self.crowd.senders)
        kinds = list(self.crowd.scope.values())
        assert waiting["plain"] == kinds.count(None)
        assert waiting["scoped"] == len(kinds) - kinds.count(None)


RendezvousMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30,
                                               deadline=None)
test_rendezvous_machine = RendezvousMachine.TestCase


def test_the_nameplate_cap_and_the_budget_follow_a_reload():
    crowd = Crowd(cap=1)
    crowd.sender(5)
    crowd.relay.guard.limits = attrs.evolve(crowd.relay.guard.limits, max_senders_per_nameplate=2)
    crowd.sender(5)
    assert crowd.relay.waiting["sender"] == 2
    crowd.relay.announce_budget = 10_000
    crowd.budget = 10_000
    plain = crowd.receiver(None)
    assert len(crowd.told[plain]) == 2  # the first batch, larger now
