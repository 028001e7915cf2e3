"""Both handshake machines, wired together through a relay in memory (no network, fake clock)."""

from __future__ import annotations

import collections
import math
from typing import Callable

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer import spoke
from peer.handshake import (
    AgreementWithdrawn,
    Agreed,
    AttemptFailed,
    AttemptKind,
    Declined,
    Failed,
    FailureKind,
    Paired,
    ProofFailed,
    ReceiverHandshake,
    ReconnectPlain,
    Registered,
    SendFrame,
    SenderHandshake,
    Verified,
    COSTLY_PATIENCE,
    DEFAULT_MAX_ATTEMPTS,
    SENDERS_PER_ATTEMPT,
    nameplate_of,
    salt_for,
)
from peer.nameplates import Stage
from relay import wire
from relay.core import Close, Relay
from relay.rooms import Paired as RoomJoined
from relay.rooms import Waiting

FAST = 16  # PBKDF2 iterations: the tests are about the state machines, not the stretching
CODE = b"417-cobalt-lemon-unicycle"
OTHER_CODE = b"417-cobalt-lemon-bicycle"


# --- peers driven like the real driver would -------------------------------------------------


Decide = Callable[[Agreed], bool]
"""The test's stand-in for the user at the prompt: True accepts, False refuses."""


@attrs.define(eq=False)
class End:
    """One peer: its machine, what it received, and the non-frame events it produced."""

    name: str
    machine: SenderHandshake | ReceiverHandshake
    decide: Decide | None
    parser: wire.Parser = attrs.Factory(wire.Parser)
    received: list = attrs.Factory(list)
    events: list = attrs.Factory(list)
    closed: bool = False
    identity: bytes = b""
    reconnects: list = attrs.Factory(list)

    def of(self, kind: type) -> list:
        return [event for event in self.events if isinstance(event, kind)]

    def got(self, packet_type: type) -> list[wire.Frame]:
        return [frame for frame in self.received if isinstance(frame.packet, packet_type)]


class Net:
    """Moves bytes between peers and the real relay core until nothing is left to move."""

    def __init__(self) -> None:
        self.relay = Relay()
        self.now = 1000.0
        self._queue: collections.deque = collections.deque()
        self._next_port = 40000
        self.ends: list[End] = []

    def join(self, name: str, machine, *, decide: Decide | None = lambda _: True) -> End:
        end = End(name, machine, decide)
        self.ends.append(end)
        end.identity = b"127.0.0.1:%d" % self._next_port
        self._deliver(self.relay.connect(end, end.identity))
        self._next_port += 1
        self.emit(end, machine.start(self.now))
        self.pump()
        registration = getattr(machine, "registration", None)
        if registration is not None and registration.stage is Stage.SCOPED:
            # A relay core that does not answer 10 (yet): as if it had closed on it.
            self.emit(end, machine.connection_lost("the relay closed the connection", self.now))
            self.pump()
        return end

    def reconnect(self, end: End) -> None:
        """What the driver does on ReconnectPlain: a new connection (same address here)."""
        self._deliver(self.relay.disconnect(end))
        end.parser, end.closed = wire.Parser(), False
        self._deliver(self.relay.connect(end, end.identity))
        self.emit(end, end.machine.reconnected(self.now))

    def emit(self, end: End, events: list) -> None:
        for event in events:
            if isinstance(event, SendFrame):
                self._queue.append((end, event.frame.encode()))
                continue
            if isinstance(event, ReconnectPlain):
                # Kept apart: the other tests read the same with a relay core that takes 10.
                end.reconnects.append(event)
                self.reconnect(end)
                continue
            end.events.append(event)
            if isinstance(event, Agreed) and end.decide is not None:
                answer = end.machine.accept if end.decide(event) else end.machine.refuse
                self.emit(end, answer(event.partner_uid))
            if isinstance(event, (Paired, Failed)):
                self._queue.append((end, None))  # the driver hangs up

    def leave(self, end: End, *, timeout: bool = False) -> None:
        self._deliver(self.relay.expire(end) if timeout else self.relay.disconnect(end))
        self.pump()

    def shutdown(self) -> None:
        self._deliver(self.relay.shutdown())
        self.pump()

    def advance(self, seconds: float, *ends: End) -> None:
        self.now += seconds
        for end in ends:
            self.emit(end, end.machine.tick(self.now))
        self.pump()

    def pump(self) -> None:
        """Like the driver: frames first; timers that are due only when all is quiet."""
        for _ in range(10_000):
            if not self._queue:
                due = next((e for e in self.ends if not e.closed and _is_due(e.machine, self.now)),
                           None)
                if due is None:
                    return
                self.emit(due, due.machine.tick(self.now))
                continue
            end, data = self._queue.popleft()
            if end.closed:
                continue
            if data is None:  # the peer hung up
                self._deliver(self.relay.disconnect(end))
            else:
                self._deliver(self.relay.receive(end, data))
        raise AssertionError("the peers never went quiet")

    def _deliver(self, outputs: list) -> None:
        for out in outputs:
            end = out.conn
            if isinstance(out, Close):
                end.closed = True
            elif not end.closed:
                end.parser.feed(out.data)
                for frame in list(end.parser.frames()):
                    end.received.append(frame)
                    self.emit(end, end.machine.receive(frame, self.now))


def _is_due(machine, now: float) -> bool:
    deadline = getattr(machine, "next_deadline", lambda: None)()
    return deadline is not None and deadline <= now


def sender(password: bytes = CODE, **kwargs) -> SenderHandshake:
    return SenderHandshake(password, iterations=FAST, **kwargs)


def frames_of(events: list) -> list[wire.Frame]:
    return [event.frame for event in events if isinstance(event, SendFrame)]


def written(machine, uid: int, packet: wire.Packet, now: float = 0) -> list[wire.Frame]:
    """What ``machine`` writes after receiving ``packet`` from ``uid``."""
    return frames_of(machine.receive(wire.Frame(uid, packet), now))


def relay_failure(letter: bytes, uid: int) -> list[wire.Frame]:
    return [wire.Frame(wire.RELAY_UID, wire.RelayFailure(letter, uid))]


# --- whole exchanges ------------------------------------------------------------------------


def test_right_code_pairs_both_sides_with_equal_keys():
    net = Net()
    s = net.join("sender", sender())
    r = net.join("receiver", ReceiverHandshake(CODE))

    [sender_done] = s.of(Paired)
    [receiver_done] = r.of(Paired)
    assert sender_done.keys == receiver_done.keys
    assert sender_done.ciphers == receiver_done.ciphers == (0, 0)
    assert sender_done.partner_identity == r.machine.identity == b"127.0.0.1:40001"
    assert receiver_done.partner_identity == s.machine.identity == b"127.0.0.1:40000"
    assert s.of(Registered) == [Registered(b"127.0.0.1:40000")]
    assert s.of(Verified) == [Verified(partner_uid=2, partner_identity=b"127.0.0.1:40001")]
    # Each side's partner identity is the ticket that opens their room on the secure port.
    assert net.relay.rooms.arrive("r", receiver_done.partner_identity, net.now) == Waiting()
    assert net.relay.rooms.arrive("s", sender_done.partner_identity, net.now) == RoomJoined("r")
    assert s.machine.finished and r.machine.finished
    assert s.of(AttemptFailed) == []


def test_wrong_code_fails_the_receiver_after_the_grace_period_and_costs_one_attempt():
    net = Net()
    s = net.join("sender", sender())
    r = net.join("receiver", ReceiverHandshake(OTHER_CODE, grace=2.0))

    assert r.got(wire.YAndServerValidator)
    assert not r.machine.finished
    assert r.machine.next_deadline() == net.now + 2.0
    net.advance(1.9, r)
    assert r.of(Failed) == []
    net.advance(0.1, r)
    [failed] = r.of(Failed)
    assert failed.kind == FailureKind.WRONG_CODE == "wrong_code"
    assert failed.reason.startswith("wrong code")
    assert r.machine.next_deadline() is None

    [attempt] = s.of(AttemptFailed)
    assert (attempt.attempts_used, attempt.attempts_allowed) == (1, 3)
    assert attempt.partner_identity == b"127.0.0.1:40001"
    assert attempt.kind == AttemptKind.WRONG_CODE == "wrong_code"
    assert attempt.reason == "it says our proof does not match its code"
    assert not s.machine.finished


def test_three_wrong_receivers_exhaust_the_sender_and_a_fourth_is_not_answered():
    net = Net()
    s = net.join("sender", sender())
    for number in range(3):
        net.join(f"wrong {number}", ReceiverHandshake(b"417-wrong-guess-%d" % number))
    assert [a.attempts_used for a in s.of(AttemptFailed)] == [1, 2, 3]
    [failed] = s.of(Failed)
    assert failed.kind == FailureKind.GUESSING_LIMIT
    assert failed.reason == (
        "gave up after 3 failed handshakes (3 wrong codes): the receiver mistyped the code, "
        "or someone else on the relay is guessing it; send again to get a new code")
    assert s.closed

    # Even if its connection lingered, a finished sender answers nothing.
    x = spoke.hello(CODE, s.machine.public)[1]
    late_x = wire.XAndClientIdentity(x, b"10.0.0.9:1")
    assert s.machine.receive(wire.Frame(9, late_x), net.now) == []
    late = net.join("fourth", ReceiverHandshake(CODE))
    assert late.got(wire.NewServer) == [] and late.of(Paired) == []


def test_handshakes_in_flight_count_against_the_budget():
    machine = sender(max_attempts=2)
    machine.start(0)
    machine.receive(wire.Frame(0, wire.ServerIdentity(b"127.0.0.1:40000")), 0)
    x = spoke.hello(b"whatever", machine.public)[1]
    answers = [
        written(machine, uid, wire.XAndClientIdentity(x, b"10.0.0.%d:1" % uid))
        for uid in (5, 6, 7)
    ]
    assert [len(a) for a in answers] == [1, 1, 0]
    # One of them fails: the budget now holds one spent and one in flight, still full.
    events = machine.receive(wire.Frame(5, wire.SpokeFailure(1)), 0)
    assert [e.attempts_used for e in events if isinstance(e, AttemptFailed)] == [1]
    assert machine.receive(wire.Frame(8, wire.XAndClientIdentity(x, b"10.0.0.8:1")), 0) == []


def test_receiver_pairs_with_the_sender_that_has_its_code_among_two():
    net = Net()
    stranger = net.join("stranger", sender(b"correct horse battery"))
    s = net.join("sender", sender(b"revolucion-para-siempre"))
    r = net.join("receiver", ReceiverHandshake(b"revolucion-para-siempre"))

    assert r.of(Paired)[0].partner_identity == b"127.0.0.1:40001"
    assert s.of(Paired) and not stranger.of(Paired)
    # Without nameplates the receiver tried the stranger too: that cost it one guess.
    assert stranger.got(wire.XAndClientIdentity)
    assert [a.attempts_used for a in stranger.of(AttemptFailed)] == [1]
    assert r.of(Failed) == []


def test_nameplates_keep_a_receiver_away_from_other_transfers():
    net = Net()
    stranger = net.join("stranger", sender(b"512-other-words-here"))
    s = net.join("sender", sender(CODE))
    assert s.machine.public.salt[:2] == (417).to_bytes(2, "big")
    assert stranger.machine.public.salt[:2] == (512).to_bytes(2, "big")
    r = net.join("receiver", ReceiverHandshake(CODE))

    assert r.of(Paired)[0].partner_identity == b"127.0.0.1:40001"
    assert stranger.got(wire.XAndClientIdentity) == []  # never even asked
    assert stranger.of(AttemptFailed) == []


def test_nameplates_do_not_break_bob_compatibility():
    # A bob receiver ignores salts and tries every sender: it still finds ours.
    net = Net()
    stranger = net.join("stranger", sender(b"512-other-words-here"))
    s = net.join("sender", sender(CODE))
    bob_receiver = ReceiverHandshake(CODE, scoped=False)  # a plain Hello (01), as bob's
    bob_receiver.nameplate = None  # and no filtering by salt
    r = net.join("bob receiver", bob_receiver)
    assert r.of(Paired) and s.of(Paired)
    assert stranger.got(wire.XAndClientIdentity)  # unlike ours, it asked the stranger too

    # Our receiver with a bob password (no nameplate) takes a bob sender's random salt.
    net = Net()
    s = net.join("bob sender", sender(b"no nameplate here", salt=bytes.fromhex("ffff") + bytes(14)))
    r = net.join("receiver", ReceiverHandshake(b"no nameplate here"))
    assert r.machine.nameplate is None
    assert r.of(Paired) and s.of(Paired)


def test_one_sender_two_receivers_the_right_code_wins():
    net = Net()
    s = net.join("sender", sender())
    wrong = net.join("wrong", ReceiverHandshake(OTHER_CODE))
    right = net.join("right", ReceiverHandshake(CODE))

    assert s.of(Paired)[0].partner_identity == b"127.0.0.1:40002"
    assert right.of(Paired)[0].keys == s.of(Paired)[0].keys
    assert [a.attempts_used for a in s.of(AttemptFailed)] == [1]
    net.advance(2.0, wrong)
    assert wrong.of(Failed)[0].kind == FailureKind.WRONG_CODE


def test_a_refusal_is_reported_and_the_sender_keeps_waiting():
    net = Net()
    s = net.join("sender", sender())
    picky = net.join("picky", ReceiverHandshake(CODE), decide=lambda _: False)
    assert s.of(Declined) == [Declined(partner_uid=2, partner_identity=b"127.0.0.1:40001")]
    assert not s.machine.finished and s.machine.attempts_used == 0
    assert picky.of(Paired) == [] and picky.of(Failed) == []
    net.advance(10.0, picky)  # a refusal is no evidence of a wrong code
    assert picky.of(Failed) == []

    willing = net.join("willing", ReceiverHandshake(CODE))
    assert s.of(Paired)[0].partner_identity == b"127.0.0.1:40002"
    assert willing.of(Paired)


def test_only_one_of_two_agreements_is_taken():
    net = Net()
    first = net.join("first", sender())
    second = net.join("second", sender())
    r = net.join("receiver", ReceiverHandshake(CODE), decide=None)
    assert [a.partner_uid for a in r.of(Agreed)] == [1, 2]

    net.emit(r, r.machine.accept(2))
    net.pump()
    assert second.of(Paired) and r.of(Paired)[0].partner_uid == 2
    assert first.of(Declined) and not first.machine.finished
    assert r.machine.accept(1) == [] and r.machine.refuse(1) == []


def test_an_agreement_arriving_after_acceptance_is_refused():
    machine, _ = _receiver_with_agreement(uid=1)
    _run_up_to_agreement(machine, uid=2)
    assert frames_of(machine.accept(1)) == [wire.Frame(1, wire.Accepted())]
    events = machine.receive(wire.Frame(2, wire.Agreement()), 0)
    assert frames_of(events) == [wire.Frame(2, wire.Refused())]
    assert not any(isinstance(e, Agreed) for e in events)


def test_an_agreed_sender_leaving_withdraws_the_offer():
    machine, _ = _receiver_with_agreement(uid=1)
    events = machine.receive(wire.Frame(0, wire.Closed(1)), 0)
    assert events == [AgreementWithdrawn(partner_uid=1, partner_identity=b"127.0.0.1:40001")]
    assert machine.accept(1) == []
    assert machine.next_deadline() is None  # the code was right: no wrong-code timer

    # An accepted sender vanishing before 0e means the relay dropped our 0a: wait again.
    machine, _ = _receiver_with_agreement(uid=1)
    machine.accept(1)
    assert machine.receive(wire.Frame(0, wire.Closed(1)), 0)[0].partner_uid == 1
    assert written(machine, 0, wire.Done()) == relay_failure(b"N", 0)


def test_an_abandoned_handshake_costs_an_attempt_but_an_agreed_one_does_not():
    machine, x_events = _sender_answering(uid=2, password=b"a wrong guess")
    assert frames_of(x_events)[0].uid == 2
    events = machine.receive(wire.Frame(0, wire.Closed(2)), 0)
    [attempt] = events
    assert attempt.attempts_used == 1 and "left" in attempt.reason

    machine, _ = _sender_answering(uid=2, password=CODE, finish=True)
    assert machine.receive(wire.Frame(0, wire.Closed(2)), 0) == []
    assert machine.attempts_used == 0


class Guesser:
    """A hostile receiver: sends X to every sender, keeps Y and the validator, never answers."""

    def __init__(self, password: bytes) -> None:
        self.password = password
        self.identity = b""
        self.loot: list[wire.YAndServerValidator] = []

    def start(self, now: float) -> list:
        return [SendFrame(wire.Frame(0, wire.HelloClient()))]

    def receive(self, frame: wire.Frame, now: float) -> list:
        packet = frame.packet
        if isinstance(packet, wire.ClientIdentity):
            self.identity = packet.identity
        elif isinstance(packet, wire.NewServer):
            _, x = spoke.hello(self.password, packet.public)
            answer = wire.XAndClientIdentity(x, self.identity)
            return [SendFrame(wire.Frame(packet.server_uid, answer))]
        elif isinstance(packet, wire.YAndServerValidator):
            self.loot.append(packet)
        return []

    def tick(self, now: float) -> list:
        return []


def test_taking_y_and_walking_away_still_spends_a_guess():
    net = Net()
    s = net.join("sender", sender())
    guessers = [net.join(f"guesser {n}", Guesser(b"417-guess-%d" % n)) for n in range(2)]
    assert all(g.machine.loot for g in guessers)
    assert s.of(AttemptFailed) == []  # in flight: not yet spent, but already reserved
    net.leave(guessers[0])
    [attempt] = s.of(AttemptFailed)
    assert attempt.attempts_used == 1 and "left" in attempt.reason
    # 1 spent + 1 in flight is under the budget of 3: a third guesser still gets an answer.
    third = net.join("guesser 2", Guesser(b"417-guess-2"))
    assert third.machine.loot
    # The budget (3) is now fully reserved: a fourth guesser gets no Y at all.
    fourth = net.join("guesser 3", Guesser(b"417-guess-3"))
    assert fourth.got(wire.NewServer) and fourth.machine.loot == []
    net.leave(guessers[1])
    net.leave(third)
    assert [a.attempts_used for a in s.of(AttemptFailed)] == [1, 2, 3]
    assert s.of(Failed)[0].kind == FailureKind.GUESSING_LIMIT


def test_a_receiver_leaving_after_agreement_spends_nothing():
    net = Net()
    s = net.join("sender", sender())
    r = net.join("receiver", ReceiverHandshake(CODE), decide=None)
    assert r.of(Agreed)
    net.leave(r)
    assert s.of(AttemptFailed) == [] and not s.machine.finished


@pytest.mark.parametrize("goodbye", ["timeout", "shutdown"])
def test_the_relay_going_away_fails_both_roles(goodbye):
    net = Net()
    s = net.join("sender", sender())
    r = net.join("receiver", ReceiverHandshake(CODE), decide=None)
    assert r.of(Agreed)  # both are mid-handshake, waiting for the receiver's user
    if goodbye == "timeout":
        net.leave(s, timeout=True)
        net.leave(r, timeout=True)
    else:
        net.shutdown()
    for end in (s, r):
        [failed] = end.of(Failed)
        assert failed.kind == FailureKind.RELAY_CLOSED
        assert failed.reason.startswith("the relay closed the connection")
        assert end.machine.finished


def test_a_peer_cannot_forge_the_relays_goodbye():
    machine = ReceiverHandshake(CODE)
    machine.start(0)
    assert machine.receive(wire.Frame(7, wire.Closed(0)), 0) == []
    assert machine.receive(wire.Frame(7, wire.Timeout()), 0) == []
    assert not machine.finished
    assert machine.receive(wire.Frame(0, wire.Timeout()), 0)[0].kind == FailureKind.RELAY_CLOSED
    assert machine.receive(wire.Frame(0, wire.ClientIdentity(b"127.0.0.1:1")), 0) == []


@pytest.mark.parametrize("iterations", [spoke.MAX_ITERATIONS + 1, 2**63])
def test_a_receiver_refuses_a_public_that_asks_too_much_work(iterations):
    machine = _registered_receiver(b"a password")
    public = spoke.Public(iterations=iterations, cipher0=0, cipher1=2, salt=bytes(16)).encode()
    events = machine.receive(wire.Frame(0, wire.NewServer(3, public, b"127.0.0.1:40003")), 0)
    assert frames_of(events) == [wire.Frame(3, wire.SpokeFailure(spoke.FAILURE_BAD_PUBLIC))]


def test_costly_publics_wait_until_the_honest_handshake_goes_quiet():
    machine = _registered_receiver(CODE)
    costly = [spoke.Public(iterations=n, cipher0=0, cipher1=0, salt=salt_for(417)).encode()
              for n in (spoke.MAX_ITERATIONS, spoke.DEFAULT_ITERATIONS + 1)]
    # Announced first, the look-alikes cost nothing yet.
    assert written(machine, 0, wire.NewServer(5, costly[0], b"127.0.0.1:40005")) == []
    assert written(machine, 0, wire.NewServer(6, costly[1], b"127.0.0.1:40006")) == []
    assert machine.next_deadline() == -math.inf  # due at once: nothing else is going on
    # The honest sender (our own iteration count) is answered at once...
    honest = sender(CODE)
    honest.start(0)
    [x] = written(machine, 0, wire.NewServer(7, honest.public.encode(), b"127.0.0.1:40007"), 10.0)
    assert x.uid == 7 and isinstance(x.packet, wire.XAndClientIdentity)
    # ...and the look-alikes wait while its handshake is moving.
    assert machine.next_deadline() == 10.0 + COSTLY_PATIENCE
    assert machine.tick(11.0) == []
    # Then the cheapest goes first; a costly sender that leaves is dropped unanswered.
    [x6] = frames_of(machine.tick(10.0 + COSTLY_PATIENCE))
    assert x6.uid == 6
    assert written(machine, 0, wire.Closed(5)) == []
    assert machine.next_deadline() is None and machine.tick(100.0) == []


def test_accepting_drops_the_costly_senders():
    machine, [agreed] = _receiver_with_agreement(1)
    costly = spoke.Public(iterations=spoke.MAX_ITERATIONS, cipher0=0, cipher1=0,
                          salt=salt_for(417)).encode()
    assert written(machine, 0, wire.NewServer(2, costly, b"127.0.0.1:40002")) == []
    assert machine.next_deadline() is not None
    assert frames_of(machine.accept(1)) == [wire.Frame(1, wire.Accepted())]
    assert machine.next_deadline() is None


def test_a_wrong_code_is_reported_only_once_the_costly_senders_were_tried():
    net = Net()
    net.join("wrong sender", sender(OTHER_CODE))
    net.join("look-alike", SenderHandshake(OTHER_CODE, iterations=spoke.DEFAULT_ITERATIONS + 1))
    r = net.join("receiver", ReceiverHandshake(CODE, grace=2.0))
    assert r.machine.next_deadline() == net.now + 2.0  # the costly one was answered: grace runs
    net.advance(2.0, r)
    [failed] = r.of(Failed)
    assert failed.kind == FailureKind.WRONG_CODE


def test_the_honest_sender_pairs_among_costly_look_alikes():
    net = Net()
    for n in range(3):
        net.join(f"look-alike {n}", SenderHandshake(OTHER_CODE, iterations=spoke.DEFAULT_ITERATIONS * 2))
    s = net.join("sender", sender(CODE))
    r = net.join("receiver", ReceiverHandshake(CODE))
    assert r.of(Paired) and s.of(Paired)
    assert r.of(Paired)[0].partner_identity == s.machine.identity


def test_unknown_uids_get_bobs_relay_failure_letters():
    receiver = _registered_receiver(CODE)
    y = wire.YAndServerValidator(bytes(32), bytes(64))
    assert written(receiver, 4, y) == relay_failure(b"S", 4)
    assert written(receiver, 4, wire.Agreement()) == relay_failure(b"H", 4)
    assert written(receiver, 0, wire.Done()) == relay_failure(b"N", 0)

    machine = sender()
    machine.start(0)
    machine.receive(wire.Frame(0, wire.ServerIdentity(b"127.0.0.1:40000")), 0)
    validator = wire.ClientValidator(bytes(64))
    assert written(machine, 4, validator) == relay_failure(b"C", 4)
    assert written(machine, 4, wire.Accepted()) == relay_failure(b"H", 4)
    assert written(machine, 4, wire.Refused()) == relay_failure(b"H", 4)
    # Accepting before the validator checked out is no agreement either.
    machine, _ = _sender_answering(uid=2, password=CODE)
    assert written(machine, 2, wire.Accepted()) == relay_failure(b"H", 2)
    assert not machine.finished


def test_a_bad_client_validator_is_answered_with_code_2_and_spends_an_attempt():
    machine, _ = _sender_answering(uid=2, password=CODE)
    events = machine.receive(wire.Frame(2, wire.ClientValidator(bytes(64))), 0)
    bad_validator = wire.SpokeFailure(spoke.FAILURE_BAD_SERVER_VALIDATOR)
    assert frames_of(events) == [wire.Frame(2, bad_validator)]
    assert [e.attempts_used for e in events if isinstance(e, AttemptFailed)] == [1]


def test_a_spoke_failure_from_a_sender_makes_the_receiver_forget_it():
    machine = _registered_receiver(CODE, grace=1.0)
    public = sender().public.encode()
    assert written(machine, 0, wire.NewServer(1, public, b"127.0.0.1:40001"), 5.0)
    assert machine.receive(wire.Frame(1, wire.SpokeFailure(0)), 5.0) == []
    y = wire.YAndServerValidator(bytes(32), bytes(64))
    assert written(machine, 1, y, 5.0) == relay_failure(b"S", 1)
    assert machine.next_deadline() is None  # no mismatch was ever seen: nothing to give up on


def test_a_new_sender_during_the_grace_period_gets_its_chance():
    net = Net()
    net.join("wrong sender", sender(OTHER_CODE))
    r = net.join("receiver", ReceiverHandshake(CODE, grace=2.0))
    assert r.machine.next_deadline() is not None
    net.advance(1.0, r)
    s = net.join("right sender", sender(CODE))
    assert r.machine.next_deadline() is None
    assert r.of(Paired) and s.of(Paired) and r.of(Failed) == []


def test_once_the_code_is_confirmed_other_mismatches_never_fail_the_receiver():
    net = Net()
    net.join("right sender", sender(CODE))
    r = net.join("receiver", ReceiverHandshake(CODE), decide=None)
    assert r.of(Agreed)
    net.join("wrong sender", sender(OTHER_CODE))
    net.emit(r, r.machine.refuse(1))
    net.pump()
    net.advance(100.0, r)
    assert r.of(Failed) == [] and r.machine.next_deadline() is None


def test_a_receiver_with_no_senders_waits():
    net = Net()
    r = net.join("receiver", ReceiverHandshake(CODE))
    assert r.of(Registered) and r.machine.next_deadline() is None
    net.advance(3600.0, r)
    assert r.of(Failed) == []


def test_start_only_once():
    machine = ReceiverHandshake(CODE)
    assert frames_of(machine.start(0)) == [wire.Frame(0, wire.HelloScopedClient(417))]
    with pytest.raises(RuntimeError):
        machine.start(0)


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError):
        SenderHandshake(CODE, max_attempts=0, iterations=FAST)
    with pytest.raises(ValueError):
        ReceiverHandshake(CODE, grace=-1)


# --- bob's exact bytes ----------------------------------------------------------------------

VECTOR_PUBLIC = bytes.fromhex(
    "00010002000000000000001000000002000400112233445566778899aabbccddeeff"
)
VECTOR_X_SCALAR = bytes.fromhex("28711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4801")
VECTOR_Y_SCALAR = bytes.fromhex("a0fce4363854ff888cff4b8e7875d600c2682390412a8cf79b37d0b11148b07a")
VECTOR_X = bytes.fromhex("4aaa9357f1a79873e42981cd9341e42bc7acea41256c8dcabc2fc6a7c4a4e3b8")
VECTOR_Y = bytes.fromhex("c33a576fbb195e6dcd2a26a5db40986541b1b596776898f9c3bd9188556d0841")
SUB0 = bytes.fromhex(
    "df28d5a303f7f126d9d1ac578e67187b3cd086252a162b4b366d2451b3d3f694"
    "d039e495a1916e639d1642e0d8d044ac181e217fccd5f834db8cd14b9087a087"
)
SUB1 = bytes.fromhex(
    "4158312a9411c7f1547af5b5f0c9f5803d09e83d451eaebdb924299f7513648e"
    "63dae9d14c865e7eff4ae9c264082c936b65b36073e05d5f3a01633a4dd2150b"
)
SUB2 = bytes.fromhex(
    "ab61a6ea624bda3fabbf95efba69a43172e2da1bd4e8c2cd2fec55ada78a626f"
    "eb2a4e1ccf3ddf666ae6030e1ef448cf3bdd3b35c7cca82e3a4703ca196b4a30"
)
SUB3 = bytes.fromhex(
    "1d84ae038d18f80ca6ef10755779fadfcf02a4ca273efb4e6461007c156b9fe3"
    "c36a032533993339d5b56c116691688b75ac4be5fecf0cda34d86733cf0fded8"
)


def _feed_bytes(machine, data: bytes) -> list:
    """Deliver relay bytes one at a time, as the driver's parser would see a slow stream."""
    parser, events = wire.Parser(), []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        for frame in list(parser.frames()):
            events += machine.receive(frame, 0)
    assert parser.pending() == 0
    return events


def _wire_bytes(events: list) -> bytes:
    return b"".join(frame.encode() for frame in frames_of(events))


def test_bob_wire_example_byte_for_byte():
    password = b"revolucion-para-siempre"
    assert nameplate_of(password) is None
    s = SenderHandshake(
        password,
        iterations=16,
        ciphers=(0, 2),
        salt=bytes.fromhex("00112233445566778899aabbccddeeff"),
        make_scalar=lambda: VECTOR_Y_SCALAR,
    )
    r = ReceiverHandshake(password, make_scalar=lambda: VECTOR_X_SCALAR)

    assert _wire_bytes(s.start(0)) == b"000000" + VECTOR_PUBLIC
    assert _feed_bytes(s, b"000002127.0.0.1:40001\0") == [Registered(b"127.0.0.1:40001")]
    assert _wire_bytes(r.start(0)) == b"000001"
    assert _feed_bytes(r, b"000003127.0.0.1:40000\0") == [Registered(b"127.0.0.1:40000")]

    to_sender = _wire_bytes(_feed_bytes(r, b"0000040001" + VECTOR_PUBLIC + b"127.0.0.1:40001\0"))
    assert to_sender == b"000107" + VECTOR_X + b"127.0.0.1:40000\0"

    to_receiver = _wire_bytes(_feed_bytes(s, b"0002" + to_sender[4:]))
    assert to_receiver == b"000206" + VECTOR_Y + SUB2

    to_sender = _wire_bytes(_feed_bytes(r, b"0001" + to_receiver[4:]))
    assert to_sender == b"000105" + SUB3

    events = _feed_bytes(s, b"0002" + to_sender[4:])
    assert _wire_bytes(events) == b"000208"

    [agreed] = _feed_bytes(r, b"000108")
    assert (agreed.partner_uid, agreed.partner_identity) == (1, b"127.0.0.1:40001")
    assert _wire_bytes(r.accept(1)) == b"00010a"

    [sender_done] = _feed_bytes(s, b"00020a")
    [receiver_done] = _feed_bytes(r, b"00000e")
    for done in (sender_done, receiver_done):
        assert done.keys.sender_to_receiver == SUB0
        assert done.keys.receiver_to_sender == SUB1
        assert done.ciphers == (0, 2)
    assert sender_done.partner_identity == b"127.0.0.1:40000"
    assert receiver_done.partner_identity == b"127.0.0.1:40001"


# --- anything a hostile relay or peer may send -----------------------------------------------

FUZZ_ID = b"127.0.0.1:40000"


def _fuzz_material():
    """Valid X, 06 and 05 bodies for password b"fuzz" when every identity is FUZZ_ID and the
    machines use the vector scalars, so random sequences can also reach agreements."""
    secret, public = spoke.generate(b"fuzz", salt=bytes(16), iterations=FAST)
    state, x = spoke.hello(b"fuzz", public, scalar=VECTOR_X_SCALAR)
    identities = {"client_identity": FUZZ_ID, "server_identity": FUZZ_ID}
    _, body06 = spoke.server_compute(secret, x, scalar=VECTOR_Y_SCALAR, **identities)
    _, body05 = spoke.client_compute(state, body06, **identities)
    return public.encode(), x, body06, body05


_FUZZ_PUBLIC, _FUZZ_X, _FUZZ_06, _FUZZ_05 = _fuzz_material()
# A public that asks for more stretching than ours: the receiver queues it for ``work``.
_FUZZ_COSTLY_PUBLIC = spoke.Public(iterations=spoke.DEFAULT_ITERATIONS + 1, cipher0=0,
                                   cipher1=0, salt=bytes(16)).encode()


def _sometimes(valid: bytes) -> st.SearchStrategy[bytes]:
    """Mostly the valid bytes, sometimes garbage of the same size."""
    garbage = st.binary(min_size=len(valid), max_size=len(valid))
    return st.one_of(st.just(valid), st.just(valid), st.just(valid), garbage)


_peer_uids = st.integers(1, 3)
_identities = st.sampled_from([FUZZ_ID, FUZZ_ID, FUZZ_ID, b"[::1]:1", b""])
_new_server = st.builds(wire.NewServer, _peer_uids,
                        st.one_of(_sometimes(_FUZZ_PUBLIC), st.just(_FUZZ_COSTLY_PUBLIC)),
                        _identities)
_relay_packets = st.one_of(
    st.builds(wire.ServerIdentity, _identities),
    st.builds(wire.ClientIdentity, _identities),
    _new_server,
    _new_server,
    st.builds(wire.Closed, st.sampled_from([1, 2, 3, 1, 2, 3, 0])),
    st.sampled_from([wire.Done(), wire.Done(), wire.Done(), wire.Timeout()]),
)
_peer_packets = st.one_of(
    st.builds(wire.XAndClientIdentity, _sometimes(_FUZZ_X), _identities),
    _sometimes(_FUZZ_06).map(lambda body: wire.YAndServerValidator(body[:32], body[32:])),
    st.builds(wire.ClientValidator, _sometimes(_FUZZ_05)),
    st.builds(wire.SpokeFailure, st.integers(0, 4)),
    st.sampled_from([wire.Agreement(), wire.Accepted(), wire.Refused()]),
)
# Mostly well-addressed frames (relay packets from 0000, peer packets from a peer), so that
# sequences get deep into the handshake; sometimes the other way round, as a forger would.
_frames = st.one_of(
    st.builds(wire.Frame, st.sampled_from([0, 0, 0, 1]), _relay_packets),
    st.builds(wire.Frame, st.sampled_from([1, 2, 3, 1, 2, 3, 0]), _peer_packets),
)
_noise = st.one_of(
    st.tuples(st.just("frame"), _frames),
    st.tuples(st.sampled_from(["accept", "refuse", "tick"]), _peer_uids),
)
HONEST = {
    "sender": [
        ("frame", wire.Frame(0, wire.ServerIdentity(FUZZ_ID))),
        ("frame", wire.Frame(1, wire.XAndClientIdentity(_FUZZ_X, FUZZ_ID))),
        ("frame", wire.Frame(1, wire.ClientValidator(_FUZZ_05))),
        ("frame", wire.Frame(1, wire.Accepted())),
    ],
    "receiver": [
        ("frame", wire.Frame(0, wire.ClientIdentity(FUZZ_ID))),
        ("frame", wire.Frame(0, wire.NewServer(1, _FUZZ_PUBLIC, FUZZ_ID))),
        ("frame", wire.Frame(1, wire.YAndServerValidator(_FUZZ_06[:32], _FUZZ_06[32:]))),
        ("frame", wire.Frame(1, wire.Agreement())),
        ("accept", 1),
        ("frame", wire.Frame(0, wire.Done())),
    ],
}


@st.composite
def _session(draw, role: str) -> list:
    """Some prefix of an honest exchange with UID 1, with random inputs around every step:
    pure noise would almost never get past the first packets."""
    script = HONEST[role]
    steps: list = []
    for step in script[: draw(st.integers(0, len(script)))]:
        steps += draw(st.lists(_noise, max_size=3))
        steps.append(step)
    return steps + draw(st.lists(_noise, max_size=6))


def _fuzz_machine(role: str):
    if role == "sender":
        return SenderHandshake(
            b"fuzz",
            iterations=FAST,
            max_attempts=2,
            salt=bytes(16),
            make_scalar=lambda: VECTOR_Y_SCALAR,
        )
    return ReceiverHandshake(b"fuzz", grace=1.0, make_scalar=lambda: VECTOR_X_SCALAR)


def _fuzz_step(machine, action: str, arg, now: float) -> list:
    if action == "frame":
        return machine.receive(arg, now)
    if action == "tick":
        return machine.tick(now)
    if isinstance(machine, SenderHandshake):
        return []
    return machine.accept(arg) if action == "accept" else machine.refuse(arg)


@pytest.mark.parametrize("role", ["sender", "receiver"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_no_input_sequence_breaks_a_machine(role, data):
    steps = data.draw(_session(role))
    machine = _fuzz_machine(role)
    events = machine.start(0)
    heard = {wire.RELAY_UID}
    for number, (action, arg) in enumerate(steps):
        if action == "frame":
            heard.add(arg.uid)
            if isinstance(arg.packet, wire.NewServer):
                heard.add(arg.packet.server_uid)
        step = _fuzz_step(machine, action, arg, now=number * 0.5)
        if machine.finished and events and isinstance(events[-1], (Paired, Failed)):
            assert step == []  # nothing happens after the end
        events += step
    for frame in frames_of(events):
        frame.encode()  # a valid packet...
        assert frame.uid in heard  # ...to the relay or a peer we heard of, never an invented UID
    terminal = [e for e in events if isinstance(e, (Paired, Failed))]
    assert len(terminal) <= 1 and machine.finished == bool(terminal)
    if terminal:
        assert events[-1] is terminal[0]
    if role == "sender":
        assert machine.attempts_used <= machine.max_attempts
        assert len([e for e in events if isinstance(e, AttemptFailed)]) == machine.attempts_used
    else:
        assert machine.failed_proofs <= machine.max_attempts
        assert machine.senders_answered <= machine.max_senders
        assert len([e for e in events if isinstance(e, ProofFailed)]) == machine.failed_proofs


# --- nameplates -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "nameplate"),
    [
        (b"417-cobalt-lemon", 417),
        (b"0-a", 0),
        (b"65535-a", 65535),
        (b"00417-a", 417),
        (b"7-", 7),
        (b"65536-a", None),
        (b"123456-a", None),
        (b"-417-a", None),
        (b"417", None),
        (b"417 cobalt", None),
        (b"41a-cobalt", None),
        (b"revolucion-para-siempre", None),
        (b"\xd9\xa1-a", None),  # a non-ASCII digit is not a nameplate
        (b"", None),
    ],
)
def test_nameplate_of(password, nameplate):
    assert nameplate_of(password) == nameplate


@settings(max_examples=200)
@given(st.integers(0, 65535), st.binary(max_size=20))
def test_every_nameplate_round_trips_through_the_salt(number, rest):
    assert nameplate_of(b"%d-" % number + rest) == number
    salt = salt_for(number)
    assert len(salt) == spoke.SALT_SIZE and int.from_bytes(salt[:2], "big") == number


def test_salt_without_nameplate_is_all_random():
    salts = {salt_for(None) for _ in range(4)}
    assert len(salts) == 4 and all(len(salt) == spoke.SALT_SIZE for salt in salts)


# --- helpers driving one machine by hand ----------------------------------------------------


def _registered_receiver(password: bytes, **kwargs) -> ReceiverHandshake:
    machine = ReceiverHandshake(password, **kwargs)
    machine.start(0)
    machine.receive(wire.Frame(0, wire.ClientIdentity(b"127.0.0.1:40000")), 0)
    return machine


def _sender_answering(uid: int, password: bytes, finish: bool = False):
    """A sender that got a 07 from ``uid`` (and, with ``finish``, its matching 05)."""
    machine = sender()
    machine.start(0)
    machine.receive(wire.Frame(0, wire.ServerIdentity(b"127.0.0.1:40000")), 0)
    state, x = spoke.hello(password, machine.public)
    client_identity = b"127.0.0.1:%d" % (40000 + uid)
    events = machine.receive(wire.Frame(uid, wire.XAndClientIdentity(x, client_identity)), 0)
    if finish:
        [reply] = frames_of(events)
        _, validator = spoke.client_compute(
            state,
            reply.packet.y + reply.packet.validator,
            client_identity=client_identity,
            server_identity=b"127.0.0.1:40000",
        )
        finished = machine.receive(wire.Frame(uid, wire.ClientValidator(validator)), 0)
        assert frames_of(finished) == [wire.Frame(uid, wire.Agreement())]
    return machine, events


def _run_up_to_agreement(machine: ReceiverHandshake, uid: int) -> None:
    """Run a right-code exchange between ``machine`` and a new sender ``uid`` until that
    sender has sent its 08 (not yet delivered)."""
    other = sender()
    other.start(0)
    identity = b"127.0.0.1:%d" % (40000 + uid)
    other.receive(wire.Frame(0, wire.ServerIdentity(identity)), 0)
    [x] = written(machine, 0, wire.NewServer(uid, other.public.encode(), identity))
    [y] = frames_of(other.receive(wire.Frame(9, x.packet), 0))
    [v] = frames_of(machine.receive(wire.Frame(uid, y.packet), 0))
    assert frames_of(other.receive(wire.Frame(9, v.packet), 0)) == [wire.Frame(9, wire.Agreement())]


def _receiver_with_agreement(uid: int):
    machine = _registered_receiver(CODE)
    _run_up_to_agreement(machine, uid)
    events = machine.receive(wire.Frame(uid, wire.Agreement()), 0)
    assert [type(e) for e in events] == [Agreed]
    return machine, events


# --- guessing limits: what each failure was, and the receiver's own limit (issue 16) ---------


def _sender_with_an_attempt(uid: int):
    """A sender that answered a stranger's 07 (wrong code) with its 06: a guess given away."""
    machine, events = _sender_answering(uid, b"417-a-wrong-guess")
    assert [f.packet.TYPE for f in frames_of(events)] == [wire.YAndServerValidator.TYPE]
    return machine


def _attempts(events: list) -> list[tuple[AttemptKind, str, int]]:
    return [(e.kind, e.reason, e.attempts_used) for e in events if isinstance(e, AttemptFailed)]


def test_the_sender_tells_a_wrong_code_from_an_abandoned_handshake():
    machine = _sender_with_an_attempt(2)
    # Spoke_failure 1: "your proof does not match my code", what a mistyped receiver sends.
    events = machine.receive(wire.Frame(2, wire.SpokeFailure(1)), 0)
    assert _attempts(events) == [(AttemptKind.WRONG_CODE, "it says our proof does not match its code", 1)]

    # A 05 that does not match: it holds another code.
    machine = _sender_with_an_attempt(2)
    events = machine.receive(wire.Frame(2, wire.ClientValidator(bytes(64))), 0)
    assert _attempts(events) == [(AttemptKind.WRONG_CODE, "its proof of the code did not match ours", 1)]

    # Taking our 06 and leaving, or breaking off with a code no honest receiver sends here.
    machine = _sender_with_an_attempt(2)
    events = machine.receive(wire.Frame(0, wire.Closed(2)), 0)
    assert _attempts(events) == [(AttemptKind.ABANDONED, "it left without proving the code", 1)]
    for code in (0, 2, 3, 4):
        machine = _sender_with_an_attempt(2)
        events = machine.receive(wire.Frame(2, wire.SpokeFailure(code)), 0)
        assert _attempts(events) == [(AttemptKind.ABANDONED, f"it broke off (spoke failure {code})", 1)]
    # Refused before its proof: the relay ends that pair, so the slot must not wait for a
    # Closed that never comes (three such would silence the sender for good).
    machine = _sender_with_an_attempt(2)
    events = machine.receive(wire.Frame(2, wire.Refused()), 0)
    assert _attempts(events) == [(AttemptKind.ABANDONED, "it refused before proving the code", 1)]
    assert machine._in_flight() == 0


def test_the_sender_gives_up_saying_someone_else_may_be_guessing():
    # The proof of concept of finding 4: valid 07s for a wrong code, then Spoke_failure or
    # nothing. Both cost an attempt (our 06 let the stranger test one guess offline).
    net = Net()
    s = net.join("sender", sender())
    typo = net.join("typo", ReceiverHandshake(b"417-cobalt-lemon-bicycle"))
    first = net.join("guesser 0", Guesser(b"417-guess-0"))
    net.leave(first)
    second = net.join("guesser 1", Guesser(b"417-guess-1"))
    net.emit(second, [SendFrame(wire.Frame(1, wire.SpokeFailure(0)))])
    net.pump()

    assert [(a.kind, a.attempts_used, a.partner_identity) for a in s.of(AttemptFailed)] == [
        (AttemptKind.WRONG_CODE, 1, typo.machine.identity),
        (AttemptKind.ABANDONED, 2, first.machine.identity),
        (AttemptKind.ABANDONED, 3, second.machine.identity),
    ]
    assert s.machine.attempts_by_kind == {AttemptKind.WRONG_CODE: 1, AttemptKind.ABANDONED: 2}
    assert s.of(Failed) == [Failed(
        "gave up after 3 failed handshakes (1 wrong code, 2 abandoned after seeing our proof): "
        "someone else on the relay may be guessing the code; send again to get a new code",
        FailureKind.GUESSING_LIMIT,
    )]
    one = sender(max_attempts=1)
    one.start(0)
    one.receive(wire.Frame(0, wire.ServerIdentity(b"127.0.0.1:40000")), 0)
    x = spoke.hello(b"417-guess", one.public)[1]
    one.receive(wire.Frame(2, wire.XAndClientIdentity(x, b"127.0.0.1:40002")), 0)
    [failed] = [e for e in one.receive(wire.Frame(0, wire.Closed(2)), 0) if isinstance(e, Failed)]
    assert failed.reason.startswith("gave up after 1 failed handshake (1 abandoned after seeing our proof)")


def test_a_handshake_that_ends_before_our_proof_costs_nothing():
    machine = sender(max_attempts=1)
    machine.start(0)
    machine.receive(wire.Frame(0, wire.ServerIdentity(b"127.0.0.1:40000")), 0)
    # An X that is not a point of the group: we answer Spoke_failure 0, never a 06.
    not_a_point = wire.XAndClientIdentity(b"\xff" * 32, b"127.0.0.1:40002")
    assert written(machine, 2, not_a_point) == [wire.Frame(2, wire.SpokeFailure(0))]
    # Whatever that receiver does next spends nothing: it never saw a proof.
    assert machine.receive(wire.Frame(2, wire.SpokeFailure(1)), 0) == []
    assert machine.receive(wire.Frame(0, wire.Closed(2)), 0) == []
    # Nor does a 07 before the relay told us who we are (we cannot answer it).
    early = sender(max_attempts=1)
    early.start(0)
    x = spoke.hello(CODE, early.public)[1]
    assert early.receive(wire.Frame(3, wire.XAndClientIdentity(x, b"127.0.0.1:40003")), 0) == []
    assert machine.attempts_used == early.attempts_used == 0
    # The one attempt is still there for the right receiver.
    machine, _ = _sender_answering(uid=4, password=CODE, finish=True)
    assert machine.attempts_used == 0 and not machine.finished


def test_the_receiver_stops_after_three_senders_fail_to_prove_its_code():
    # The proof of concept of finding 5: fake senders with the receiver's nameplate and a
    # wrong code, each one online guess at it. Each comes before the grace period ends.
    net = Net()
    r = net.join("receiver", ReceiverHandshake(CODE, grace=2.0))
    fakes = [net.join(f"fake {n}", sender(b"417-wrong-guess-%d" % n)) for n in range(3)]
    assert [len(f.got(wire.XAndClientIdentity)) for f in fakes] == [1, 1, 1]
    assert r.events == [
        Registered(r.machine.identity),
        *[ProofFailed(partner_identity=f.machine.identity, failures=n + 1, failures_allowed=3)
          for n, f in enumerate(fakes)],
        Failed(
            "3 senders with nameplate 417 failed to prove the code: someone may be guessing it; "
            "ask the sender for a new code",
            FailureKind.GUESSING_LIMIT,
        ),
    ]
    assert r.closed and r.machine.failed_proofs == 3 == DEFAULT_MAX_ATTEMPTS
    # Each fake sender was told "wrong code" (and spent one of its own attempts on us).
    assert [len(f.of(AttemptFailed)) for f in fakes] == [1, 1, 1]
    fourth = net.join("fake 3", sender(b"417-wrong-guess-3"))
    assert fourth.got(wire.XAndClientIdentity) == []


def test_the_receiver_limit_drops_handshakes_in_flight_and_checks_no_more_proofs():
    machine = _registered_receiver(CODE, max_attempts=2)
    fakes = {}
    for uid in (1, 2, 3):
        fake = sender(b"417-wrong-guess")
        fake.start(0)
        identity = b"127.0.0.1:%d" % (40000 + uid)
        fake.receive(wire.Frame(0, wire.ServerIdentity(identity)), 0)
        [x] = written(machine, 0, wire.NewServer(uid, fake.public.encode(), identity))
        [y] = frames_of(fake.receive(wire.Frame(9, x.packet), 0))
        fakes[uid] = y.packet
    first = machine.receive(wire.Frame(1, fakes[1]), 0)
    assert frames_of(first) == [wire.Frame(1, wire.SpokeFailure(1))]
    second = machine.receive(wire.Frame(2, fakes[2]), 0)
    assert frames_of(second) == [wire.Frame(2, wire.SpokeFailure(1))]
    assert [e.failures for e in first + second if isinstance(e, ProofFailed)] == [1, 2]
    assert [e.kind for e in second if isinstance(e, Failed)] == [FailureKind.GUESSING_LIMIT]
    assert second[-1].reason.startswith("2 senders with nameplate 417 failed to prove the code")
    # The third was in flight: its 06 is never checked, so its sender learns nothing.
    assert machine.receive(wire.Frame(3, fakes[3]), 0) == []


def test_once_the_code_is_proved_the_limit_only_stops_new_senders():
    net = Net()
    net.join("right sender", sender(CODE))
    r = net.join("receiver", ReceiverHandshake(CODE), decide=None)
    [agreed] = r.of(Agreed)
    for n in range(3):
        net.join(f"fake {n}", sender(b"417-wrong-guess-%d" % n))
    assert len(r.of(ProofFailed)) == 3 and r.of(Failed) == []
    late = net.join("late", sender(CODE))
    assert late.got(wire.XAndClientIdentity) == []  # no more answers, not even to the code
    # Refusing the one agreement left ends it: nobody else will be answered.
    net.emit(r, r.machine.refuse(agreed.partner_uid))
    net.pump()
    [failed] = r.of(Failed)
    assert failed.kind == FailureKind.GUESSING_LIMIT


def _silent_sender(machine: ReceiverHandshake, uid: int, now: float = 0) -> list:
    """Announce a sender with our nameplate; returns what the receiver wrote to it."""
    public = spoke.Public(iterations=FAST, cipher0=0, cipher1=0, salt=salt_for(417)).encode()
    return written(machine, 0, wire.NewServer(uid, public, b"127.0.0.1:%d" % (40000 + uid)), now)


def test_senders_that_break_off_are_no_guesses_but_the_receiver_answers_only_so_many():
    machine = _registered_receiver(CODE, max_attempts=1)
    assert machine.max_senders == SENDERS_PER_ATTEMPT == 10
    # Nine fake senders take our 07 and go away, by Spoke_failure or by leaving: no guess.
    for uid in range(1, 10):
        [x] = _silent_sender(machine, uid)
        assert isinstance(x.packet, wire.XAndClientIdentity)
        goodbye = wire.Frame(uid, wire.SpokeFailure(3)) if uid % 2 else wire.Frame(0, wire.Closed(uid))
        assert machine.receive(goodbye, 0) == []
    assert machine.failed_proofs == 0 and machine.senders_answered == 9 and not machine.finished
    # The tenth is answered; an eleventh, announced meanwhile, is not.
    [x] = _silent_sender(machine, 10)
    assert _silent_sender(machine, 11) == []
    events = machine.receive(wire.Frame(0, wire.Closed(10)), 0)
    assert events == [Failed(
        "gave up after answering 10 senders with nameplate 417 without pairing: someone may be "
        "flooding the relay with fake senders; ask the sender for a new code",
        FailureKind.SENDER_LIMIT,
    )]


def test_the_receivers_limits_leave_an_honest_retry_alone():
    # One typo'd sender, then the right one: one failed proof, then a pairing.
    net = Net()
    net.join("wrong sender", sender(OTHER_CODE))
    r = net.join("receiver", ReceiverHandshake(CODE, grace=2.0))
    s = net.join("right sender", sender(CODE))
    assert [e.failures for e in r.of(ProofFailed)] == [1]
    assert r.of(Paired) and s.of(Paired) and r.of(Failed) == []
    # With --max-attempts 1 a single mismatch ends it at once, and says so.
    net = Net()
    net.join("wrong sender", sender(OTHER_CODE))
    r = net.join("receiver", ReceiverHandshake(CODE, max_attempts=1))
    assert r.of(Failed) == [Failed(
        "1 sender with nameplate 417 failed to prove the code: the code is wrong, or someone "
        "is guessing it; ask the sender for a new code",
        FailureKind.GUESSING_LIMIT,
    )]


def test_receiver_constructor_checks_max_attempts():
    with pytest.raises(ValueError):
        ReceiverHandshake(CODE, max_attempts=0)


# --- scoped registration (packet 10) and its fallback to 01 ----------------------------------


def _announce(uid: int, nameplate: int | None) -> wire.Frame:
    public = spoke.Public(iterations=FAST, cipher0=0, cipher1=0, salt=salt_for(nameplate)).encode()
    return wire.Frame(wire.RELAY_UID, wire.NewServer(uid, public, b"127.0.0.1:%d" % (40000 + uid)))


IDENTITY_03 = wire.Frame(wire.RELAY_UID, wire.ClientIdentity(b"127.0.0.1:50000"))


def test_a_receiver_with_a_nameplate_registers_scoped_and_one_without_plainly():
    assert frames_of(ReceiverHandshake(CODE).start(0)) == [wire.Frame(0, wire.HelloScopedClient(417))]
    assert frames_of(ReceiverHandshake(b"0-a-b").start(0)) == [wire.Frame(0, wire.HelloScopedClient(0))]
    assert frames_of(ReceiverHandshake(b"65535-a-b").start(0)) == [
        wire.Frame(0, wire.HelloScopedClient(65535))]
    assert frames_of(ReceiverHandshake(b"revolucion-para-siempre").start(0)) == [
        wire.Frame(0, wire.HelloClient())]
    assert frames_of(ReceiverHandshake(CODE, scoped=False).start(0)) == [
        wire.Frame(0, wire.HelloClient())]
    plain = ReceiverHandshake(b"revolucion-para-siempre")
    plain.start(0)
    assert plain.next_deadline() is None  # no scoped wait, nothing to fall back from


def test_a_03_within_3_s_makes_the_registration_scoped():
    machine = ReceiverHandshake(CODE)
    machine.start(100.0)
    assert machine.next_deadline() == 103.0
    assert machine.tick(102.9) == []
    assert machine.receive(IDENTITY_03, 102.9) == [Registered(b"127.0.0.1:50000")]
    assert machine.registration.scoped and not machine.registration.fell_back
    assert machine.next_deadline() is None
    assert machine.tick(200.0) == []
    # A relay that announces more than it should is still filtered by salt.
    assert written(machine, 0, _announce(5, 418).packet, 200.0) == []
    [x] = written(machine, 0, _announce(6, 417).packet, 200.0)
    assert x.uid == 6 and isinstance(x.packet, wire.XAndClientIdentity)


def test_no_03_by_3_s_falls_back_to_a_plain_hello_that_still_filters_by_salt():
    machine = ReceiverHandshake(CODE)
    machine.start(0.0)
    assert machine.tick(2.999) == []
    [reconnect] = machine.tick(3.0)
    assert reconnect == ReconnectPlain("no answer to the scoped Hello in 3 s")
    assert machine.tick(3.0) == [] and machine.next_deadline() is None  # told once
    # Late frames of the old connection are dropped, a late 03 included.
    assert machine.receive(IDENTITY_03, 3.5) == [] and machine.identity is None
    assert frames_of(machine.reconnected(4.0)) == [wire.Frame(0, wire.HelloClient())]
    assert machine.next_deadline() is None  # a plain Hello has no deadline of ours
    assert machine.receive(IDENTITY_03, 4.1) == [Registered(b"127.0.0.1:50000")]
    assert machine.registration.fell_back and not machine.registration.scoped
    assert written(machine, 0, _announce(7, 9), 4.2) == []
    assert written(machine, 0, _announce(7, None).packet, 4.2) == []
    [x] = written(machine, 0, _announce(8, 417).packet, 4.2)
    assert x.uid == 8
    assert not machine.finished


def test_the_relay_closing_before_03_asks_for_a_plain_reconnection():
    machine = ReceiverHandshake(CODE)
    machine.start(0.0)
    [reconnect] = machine.connection_lost("the relay closed the connection", 0.5)
    assert isinstance(reconnect, ReconnectPlain)
    assert "the relay closed the connection" in reconnect.reason
    assert machine.next_deadline() is None and not machine.finished
    assert frames_of(machine.reconnected(0.6)) == [wire.Frame(0, wire.HelloClient())]
    # The plain connection failing too is the end, as it always was.
    [failed] = machine.connection_lost("the relay closed the connection", 0.7)
    assert failed == Failed("the relay closed the connection", FailureKind.RELAY_CLOSED)
    assert machine.finished


def test_a_lost_connection_after_03_or_without_a_nameplate_fails_as_before():
    scoped = ReceiverHandshake(CODE)
    scoped.start(0.0)
    scoped.receive(IDENTITY_03, 0.1)
    assert scoped.connection_lost("lost the connection to the relay", 1.0) == [
        Failed("lost the connection to the relay", FailureKind.RELAY_CLOSED)]
    plain = ReceiverHandshake(b"revolucion-para-siempre")
    plain.start(0.0)
    assert plain.connection_lost("x", 0.1) == [Failed("x", FailureKind.RELAY_CLOSED)]
    assert plain.connection_lost("x", 0.2) == []  # finished: nothing more
    s = sender()
    s.start(0.0)
    assert s.connection_lost("x", 0.1) == [Failed("x", FailureKind.RELAY_CLOSED)]


def test_unexpected_answers_to_a_scoped_hello_do_not_register_it():
    machine = ReceiverHandshake(CODE)
    machine.start(0.0)
    # Announcements, a sender's identity, peer packets: none is our 03; the wait goes on.
    assert written(machine, 0, _announce(3, 417).packet, 0.1) == []
    assert machine.receive(wire.Frame(0, wire.ServerIdentity(b"127.0.0.1:1234")), 0.2) == []
    assert machine.receive(wire.Frame(0, wire.Closed(3)), 0.3) == []
    assert machine.receive(wire.Frame(0, wire.RelayFailure(b"H", 3)), 0.3) == []
    assert machine.identity is None and machine.next_deadline() == 3.0
    [reconnect] = machine.tick(3.0)
    assert isinstance(reconnect, ReconnectPlain)
    with pytest.raises(RuntimeError):
        ReceiverHandshake(CODE).reconnected(0.0)  # nothing to answer


def test_a_relay_refusing_the_scoped_hello_outright_ends_it_like_any_refusal():
    # 0f is an answer (a Hello rate limit, a full relay): a relay that understood us.
    machine = ReceiverHandshake(CODE)
    machine.start(0.0)
    [failed] = machine.receive(wire.Frame(0, wire.Timeout()), 0.1)
    assert failed.kind == FailureKind.RELAY_CLOSED and machine.finished


def test_a_garbled_answer_is_a_lost_connection_to_the_driver():
    # The driver's parser fails (types above 10 are malformed) and reports a lost connection.
    parser = wire.Parser()
    parser.feed(b"000011")
    with pytest.raises(wire.WireError):
        list(parser.frames())
    machine = ReceiverHandshake(CODE)
    machine.start(0.0)
    [reconnect] = machine.connection_lost("the relay sent something invalid", 0.1)
    assert isinstance(reconnect, ReconnectPlain)


def test_a_scoped_receiver_is_told_only_of_its_nameplate_by_the_relay_core():
    net = Net()
    s = net.join("sender", sender())
    net.join("stranger", sender(b"418-other-words-here"))
    sender_uid = net.relay.uid_of(s)
    r = net.join("receiver", ReceiverHandshake(CODE))
    [done] = r.of(Paired)
    assert done.partner_identity == s.machine.identity
    assert r.machine.senders_answered == 1  # never the stranger, scoped or not
    # Our relay core answers 10 and announces only the senders of that nameplate.
    assert r.machine.registration.scoped and r.reconnects == []
    assert [frame.packet.server_uid for frame in r.got(wire.NewServer)] == [sender_uid]
