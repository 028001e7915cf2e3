"""Issue 16, finding 4 (relay half): a stranger without the code must not be able to spend
every waiting sender's attempts.

The proof of concept was: a plain client is told about every sender; it sends a valid 07 to
each, takes the 06 (one offline guess), answers Spoke_failure, says Hello again (which used
to make every ended pair a candidate again) and repeats, until every sender has given up
after its 3 attempts. Here: a repeated Hello no longer revives ended pairs, and the relay
counts failed handshakes per address and per sender and refuses new ones past a limit.

The core-level tests drive ``relay.core.Relay`` with a fake clock; the end-to-end test runs
the attack against a real relay and two real ``peer send`` processes.
"""

from __future__ import annotations

import socket
import subprocess

import pytest
import trio

from peer import spoke
from relay import wire
from relay.core import Relay, Role, Send
from relay.limits import Guard, Limits, Refusal

from processes import finish, peer, start_relay, stop_relay

PUBLIC = bytes.fromhex("00010002000000000000001000000002000400112233445566778899aabbccddeeff")
X = bytes.fromhex("4aaa9357f1a79873e42981cd9341e42bc7acea41256c8dcabc2fc6a7c4a4e3b8")
Y = bytes.fromhex("c33a576fbb195e6dcd2a26a5db40986541b1b596776898f9c3bd9188556d0841")
VALIDATOR = bytes(range(64))

HELLO_SERVER = wire.encode(0, wire.HelloServer(PUBLIC))
HELLO_CLIENT = wire.encode(0, wire.HelloClient())
ATTACKER = "10.9.9.9"


def frames(outputs, conn) -> list[wire.Frame]:
    parser = wire.Parser()
    parser.feed(b"".join(o.data for o in outputs if isinstance(o, Send) and o.conn == conn))
    return list(parser.frames())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Scene:
    """A relay core with a guard and a fake clock, and named connections on it."""

    def __init__(self, **limits) -> None:
        self.clock = Clock()
        self.guard = Guard(Limits(exempt=(), **limits))
        self.relay = Relay(guard=self.guard, clock=self.clock)
        self.ports = 30000
        self.inbox: dict[str, list[wire.Frame]] = {}

    def _run(self, outputs) -> list:
        for conn in {o.conn for o in outputs}:
            self.inbox.setdefault(conn, []).extend(frames(outputs, conn))
        return outputs

    def join(self, conn: str, role: Role, host: str) -> int:
        self.ports += 1
        self._run(self.relay.connect(conn, f"{host}:{self.ports}".encode()))
        self._run(self.relay.receive(conn, HELLO_SERVER if role is Role.SERVER else HELLO_CLIENT))
        uid = self.relay.uid_of(conn)
        assert uid is not None
        return uid

    def send(self, conn: str, uid: int, packet: wire.Packet) -> list:
        return self._run(self.relay.receive(conn, wire.encode(uid, packet)))

    def leave(self, conn: str) -> list:
        return self._run(self.relay.disconnect(conn))

    def take(self, conn: str) -> list[wire.Frame]:
        got, self.inbox[conn] = self.inbox.get(conn, []), []
        return got

    def types(self, conn: str) -> list[int]:
        return [f.packet.TYPE for f in self.take(conn)]

    def try_guess(self, client: str, server: str, failure: wire.Packet | None = None) -> bool:
        """The attacker's step: 07 to ``server``; if it got through, the server answers 06 and
        the attacker breaks off with ``failure`` (default Spoke_failure 1). True if the 07
        reached the server."""
        s, c = self.relay.uid_of(server), self.relay.uid_of(client)
        self.take(server)
        self.send(client, s, wire.XAndClientIdentity(X, b"10.9.9.9:30001"))
        if wire.XAndClientIdentity.TYPE not in self.types(server):
            return False
        self.send(server, c, wire.YAndServerValidator(Y, VALIDATOR))
        self.send(client, s, failure if failure is not None else wire.SpokeFailure(1))
        return True


def senders(scene: Scene, *names: str) -> dict[str, int]:
    return {name: scene.join(name, Role.SERVER, f"10.0.0.{n + 1}") for n, name in enumerate(names)}


# -- a repeated Hello ----------------------------------------------------------------------------


def test_a_repeated_client_hello_does_not_revive_ended_pairs():
    scene = Scene()
    uids = senders(scene, "S1", "S2")
    scene.join("C", Role.CLIENT, ATTACKER)
    assert scene.try_guess("C", "S1")
    scene.take("C")
    scene.send("C", 0, wire.HelloClient())
    again = scene.take("C")
    # The identity again, and only the sender it has not ended a handshake with.
    assert [type(f.packet) for f in again] == [wire.ClientIdentity, wire.NewServer]
    assert again[1].packet.server_uid == uids["S2"]
    assert scene.relay.candidates_of("C") == {uids["S2"]}
    assert not scene.try_guess("C", "S1")  # dropped: not its candidate any more


def test_the_proof_of_concept_loop_gets_one_guess_per_sender_per_connection():
    """07, Spoke_failure, Hello again, repeated: with no limit configured at all, each sender
    sees one handshake from that connection (it used to see one per round)."""
    scene = Scene(max_failed_handshakes_per_address=0, max_failed_handshakes_per_sender=0)
    senders(scene, "S1", "S2")
    scene.join("C", Role.CLIENT, ATTACKER)
    reached = {"S1": 0, "S2": 0}
    for _ in range(5):
        for server in reached:
            reached[server] += scene.try_guess("C", server)
        scene.send("C", 0, wire.HelloClient())
    assert reached == {"S1": 1, "S2": 1}


def test_a_sender_repeating_its_hello_may_still_reopen_its_ended_pairs():
    """That is the sender's own choice (neither our peers nor bob's repeat a Hello); a
    client cannot cause it, and the failures already counted stay counted."""
    scene = Scene(max_failed_handshakes_per_address=1)
    uids = senders(scene, "S1")
    scene.join("C", Role.CLIENT, ATTACKER)
    assert scene.try_guess("C", "S1")
    scene.send("S1", 0, wire.HelloServer(PUBLIC))
    assert scene.relay.candidates_of("C") == {uids["S1"]}
    assert not scene.try_guess("C", "S1")  # the address's one failure is still counted


# -- the per-address limit ----------------------------------------------------------------------


def attack(scene: Scene, servers: list[str], connections: int) -> dict[str, int]:
    """The proof of concept, made stronger by reconnecting: each connection tries every
    sender, then says Hello again and tries again. Returns the 07s each sender received."""
    reached = dict.fromkeys(servers, 0)
    for n in range(connections):
        conn = f"A{n}"
        scene.join(conn, Role.CLIENT, ATTACKER)
        for _ in range(2):
            for server in servers:
                reached[server] += scene.try_guess(conn, server)
            scene.send(conn, 0, wire.HelloClient())
        scene.leave(conn)
    return reached


def test_the_per_address_limit_stops_the_loop_against_two_senders():
    scene = Scene(max_failed_handshakes_per_address=2)
    senders(scene, "S1", "S2")
    reached = attack(scene, ["S1", "S2"], connections=4)
    assert reached == {"S1": 1, "S2": 1}  # 2 failures from the address, then refused
    assert scene.guard.refused[Refusal.FAILED_HANDSHAKES_PER_ADDRESS] >= 2
    assert scene.relay.counts.attempts_failed == 2
    assert scene.relay.counts.started == 2


def test_a_refused_handshake_is_a_closed_notice_to_the_client_only():
    scene = Scene(max_failed_handshakes_per_address=1)
    uids = senders(scene, "S1", "S2")
    scene.join("C", Role.CLIENT, ATTACKER)
    assert scene.try_guess("C", "S1")
    scene.take("C")
    scene.take("S2")
    out = scene.send("C", uids["S2"], wire.XAndClientIdentity(X, b"10.9.9.9:30001"))
    # The client learns that sender is gone for it (bob's and our receivers forget it and
    # wait for others); the sender hears nothing, so it spends nothing.
    assert out == [Send("C", wire.encode(0, wire.Closed(uids["S2"])))]
    assert scene.relay.candidates_of("C") == frozenset()
    assert scene.relay.registered("C") is Role.CLIENT  # not cut off: it may have others


def test_handshakes_in_flight_count_against_the_address():
    """Else one could open a handshake with every sender at once and fail them all later."""
    scene = Scene(max_failed_handshakes_per_address=2)
    uids = senders(scene, "S1", "S2", "S3")
    scene.join("C", Role.CLIENT, ATTACKER)
    for name in ("S1", "S2", "S3"):
        scene.take(name)
        scene.send("C", uids[name], wire.XAndClientIdentity(X, b"10.9.9.9:30001"))
    assert [scene.types(name) for name in ("S1", "S2", "S3")] == [[0x07], [0x07], []]


def test_other_addresses_are_unaffected_and_the_window_forgets():
    scene = Scene(max_failed_handshakes_per_address=2, failed_handshake_window=600)
    uids = senders(scene, "S1", "S2")
    attack(scene, ["S1", "S2"], connections=2)
    # An honest receiver elsewhere runs a whole handshake and pairs.
    scene.join("R", Role.CLIENT, "10.7.7.7")
    r = scene.relay.uid_of("R")
    scene.send("R", uids["S1"], wire.XAndClientIdentity(X, b"10.7.7.7:30000"))
    scene.send("S1", r, wire.YAndServerValidator(Y, VALIDATOR))
    scene.send("R", uids["S1"], wire.ClientValidator(VALIDATOR))
    scene.send("S1", r, wire.Agreement())
    scene.send("R", uids["S1"], wire.Accepted())
    assert wire.Done.TYPE in scene.types("R")
    # The attacker's address may try again once its failures are older than the window.
    scene.clock.now += 601
    scene.join("A9", Role.CLIENT, ATTACKER)
    assert scene.try_guess("A9", "S2")


def test_an_ipv6_address_counts_as_its_slash_64():
    scene = Scene(max_failed_handshakes_per_address=1)
    senders(scene, "S1", "S2")
    scene.join("C1", Role.CLIENT, "[2001:db8:1:2::10]")
    scene.join("C2", Role.CLIENT, "[2001:db8:1:2::99]")
    scene.join("C3", Role.CLIENT, "[2001:db8:1:3::10]")
    assert scene.try_guess("C1", "S1")
    assert not scene.try_guess("C2", "S2")
    assert scene.try_guess("C3", "S2")


def test_exempt_addresses_are_not_limited_per_address():
    scene = Scene(max_failed_handshakes_per_address=1, max_failed_handshakes_per_sender=0)
    scene.guard.limits = Limits(max_failed_handshakes_per_address=1,
                                max_failed_handshakes_per_sender=0)  # loopback exempt
    senders(scene, "S1", "S2", "S3")
    scene.join("C", Role.CLIENT, "127.0.0.1")
    assert all(scene.try_guess("C", name) for name in ("S1", "S2", "S3"))


# -- what counts as a failed handshake ----------------------------------------------------------


@pytest.mark.parametrize("ending", ["client spoke failure", "client refused", "client left",
                                    "server spoke failure after 06"])
def test_every_way_a_handshake_ends_without_agreement_counts(ending):
    scene = Scene(max_failed_handshakes_per_address=1)
    uids = senders(scene, "S1", "S2")
    scene.join("C", Role.CLIENT, ATTACKER)
    c = scene.relay.uid_of("C")
    scene.send("C", uids["S1"], wire.XAndClientIdentity(X, b"10.9.9.9:30001"))
    scene.send("S1", c, wire.YAndServerValidator(Y, VALIDATOR))
    if ending == "client spoke failure":
        scene.send("C", uids["S1"], wire.SpokeFailure(3))
    elif ending == "client refused":
        scene.send("C", uids["S1"], wire.Refused())
    elif ending == "client left":
        scene.leave("C")
    else:
        scene.send("C", uids["S1"], wire.ClientValidator(VALIDATOR))
        scene.send("S1", c, wire.SpokeFailure(2))
    assert scene.relay.counts.attempts_failed == 1
    scene.join("D", Role.CLIENT, ATTACKER)
    assert not scene.try_guess("D", "S2")


@pytest.mark.parametrize("ending", ["agreement", "server left", "server rejects X",
                                    "server new public"])
def test_endings_that_are_not_a_guess_do_not_count(ending):
    scene = Scene(max_failed_handshakes_per_address=1)
    uids = senders(scene, "S1", "S2")
    scene.join("C", Role.CLIENT, ATTACKER)
    c = scene.relay.uid_of("C")
    scene.send("C", uids["S1"], wire.XAndClientIdentity(X, b"10.9.9.9:30001"))
    if ending == "agreement":
        scene.send("S1", c, wire.YAndServerValidator(Y, VALIDATOR))
        scene.send("C", uids["S1"], wire.ClientValidator(VALIDATOR))
        scene.send("S1", c, wire.Agreement())
        scene.send("C", uids["S1"], wire.Refused())  # declined after proving the code
    elif ending == "server left":
        scene.leave("S1")
    elif ending == "server rejects X":
        scene.send("S1", c, wire.SpokeFailure(0))  # before its 06: the client learnt nothing
    else:
        scene.send("S1", 0, wire.HelloServer(bytes(34)))
    assert scene.relay.counts.attempts_failed == 0
    assert scene.try_guess("C", "S2")


# -- the per-sender limit -----------------------------------------------------------------------


def test_the_per_sender_limit_counts_failures_from_every_address():
    scene = Scene(max_failed_handshakes_per_address=0, max_failed_handshakes_per_sender=2)
    senders(scene, "S1", "S2")
    hosts = ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
    for n, host in enumerate(hosts):
        scene.join(f"C{n}", Role.CLIENT, host)
    assert scene.try_guess("C0", "S1")
    assert scene.try_guess("C1", "S1")
    assert not scene.try_guess("C2", "S1")
    assert scene.guard.refused[Refusal.FAILED_HANDSHAKES_PER_SENDER] == 1
    assert scene.try_guess("C2", "S2")  # another sender is another count


def test_a_new_sender_on_a_reused_uid_starts_with_no_failures():
    scene = Scene(max_failed_handshakes_per_address=0, max_failed_handshakes_per_sender=1)
    senders(scene, "S1")
    scene.join("C0", Role.CLIENT, "10.1.0.1")
    assert scene.try_guess("C0", "S1")
    scene.leave("S1")
    scene.join("S1b", Role.SERVER, "10.0.0.1")
    scene.join("C1", Role.CLIENT, "10.1.0.2")
    assert scene.try_guess("C1", "S1b")


def test_limits_reloaded_live_apply_to_the_next_handshake():
    scene = Scene(max_failed_handshakes_per_address=5)
    senders(scene, "S1", "S2", "S3")
    scene.join("C", Role.CLIENT, ATTACKER)
    assert scene.try_guess("C", "S1")
    scene.guard.limits = Limits(exempt=(), max_failed_handshakes_per_address=1)
    assert not scene.try_guess("C", "S2")


def test_memory_follows_recent_failures_only():
    scene = Scene(max_failed_handshakes_per_address=3, failed_handshake_window=60)
    senders(scene, "S1", "S2", "S3")
    for n, server in enumerate(("S1", "S2", "S3")):
        scene.join(f"C{n}", Role.CLIENT, f"10.2.0.{n}")
        assert scene.try_guess(f"C{n}", server)
        scene.leave(f"C{n}")
    assert scene.guard.guessing_sources == 3
    scene.clock.now += 61
    scene.guard.forget_failures(scene.clock.now)
    assert scene.guard.guessing_sources == 0


# -- end to end: the proof of concept against a real relay and two real senders --------------

CODES = ("123-cobalt-lemon-unicycle", "456-amber-otter-quilt")
WRONG = b"789-not-the-code"
ATTACKER_HOST = "127.0.0.2"
"""Another loopback address (Linux routes all of 127/8 to lo): the attacker's, so that the
honest receivers on 127.0.0.1 are "another address"."""
E2E_LIMIT = 2
"""Below the senders' 3 attempts, so that one address cannot end a sender whatever it does."""
STEP = 20.0


class Attacker:
    """A client without the code, written with the wire codec and spoke: each handshake it
    runs is a valid 07, the sender's 06 (one offline guess), then Spoke_failure 1."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.parser = wire.Parser()
        self.pending: list[wire.Frame] = []
        self.identity = b""
        self.guesses = 0
        self.refusals = 0

    @classmethod
    async def connect(cls, port: int) -> Attacker:
        return cls(await trio.open_tcp_stream("127.0.0.1", port, local_address=ATTACKER_HOST))

    async def send(self, uid: int, packet: wire.Packet) -> None:
        await self.stream.send_all(wire.encode(uid, packet))

    async def frame(self) -> wire.Frame:
        while not self.pending:
            data = await self.stream.receive_some(4096)
            assert data, "the relay closed the attacker's connection"
            self.parser.feed(data)
            self.pending.extend(self.parser.frames())
        return self.pending.pop(0)

    async def hello(self, expect: int | None) -> dict[int, bytes]:
        """Say Hello; return the senders announced (UID → public): ``expect`` of them, or
        whatever came within a second when None."""
        await self.send(0, wire.HelloClient())
        announced: dict[int, bytes] = {}
        with trio.fail_after(STEP):
            while not isinstance((frame := await self.frame()).packet, wire.ClientIdentity):
                pass
        self.identity = frame.packet.identity
        with trio.move_on_after(STEP if expect else 1.0):
            while expect is None or len(announced) < expect:
                packet = (await self.frame()).packet
                if isinstance(packet, wire.NewServer):
                    announced[packet.server_uid] = packet.public
        return announced

    async def guess(self, uid: int, public: bytes) -> None:
        _, x = spoke.hello(WRONG, public)
        await self.send(uid, wire.XAndClientIdentity(x, self.identity))
        with trio.move_on_after(5.0):  # a 07 the relay drops gets no answer at all
            while True:
                frame = await self.frame()
                if isinstance(frame.packet, wire.YAndServerValidator) and frame.uid == uid:
                    self.guesses += 1
                    await self.send(uid, wire.SpokeFailure(1))
                    return
                if isinstance(frame.packet, wire.Closed) and frame.packet.peer_uid == uid:
                    self.refusals += 1
                    return


async def _run_attack(port: int) -> tuple[int, int]:
    """The finding's loop on one connection (07 → 06 → Spoke_failure to every sender, Hello
    again, three rounds), then the same from fresh connections. Returns (guesses, refusals)."""
    guesses = refusals = 0
    first = await Attacker.connect(port)
    try:
        announced = await first.hello(expect=2)
        for _ in range(3):
            for uid, public in announced.items():
                await first.guess(uid, public)
            announced = await first.hello(expect=None) or announced
    finally:
        await first.stream.aclose()
    guesses, refusals = first.guesses, first.refusals
    for _ in range(3):
        again = await Attacker.connect(port)
        try:
            for uid, public in (await again.hello(expect=2)).items():
                await again.guess(uid, public)
        finally:
            await again.stream.aclose()
        guesses, refusals = guesses + again.guesses, refusals + again.refusals
    return guesses, refusals


E2E_RELAY_ARGS = ("--limit-exempt", "192.0.2.0/24",  # count loopback per address too
                  "--max-failed-handshakes-per-address", str(E2E_LIMIT))


async def test_end_to_end_a_guesser_cannot_make_two_waiting_senders_give_up(tmp_path):
    try:  # the attacker needs a second loopback address
        with socket.socket() as probe:
            probe.bind((ATTACKER_HOST, 0))
    except OSError:
        pytest.skip(f"cannot bind {ATTACKER_HOST}")
    relay = start_relay(*E2E_RELAY_ARGS)
    sending: list[subprocess.Popen] = []
    try:
        for n, code in enumerate(CODES):
            (tmp_path / f"f{n}.txt").write_text(f"file {n}")
            sending.append(peer("send", *relay.peer_args(), "--password", code, f"f{n}.txt",
                                cwd=tmp_path))
        with trio.fail_after(120):
            guesses, refusals = await _run_attack(relay.port)
        for process in sending:  # both still waiting: neither gave up
            assert process.poll() is None, finish(process, 5)[2]
        assert guesses == E2E_LIMIT, (guesses, refusals)
        assert refusals >= 1
        # An honest receiver on another address still gets each file.
        for n, code in enumerate(CODES):
            out = tmp_path / f"out{n}"
            receiver = peer("recv", *relay.peer_args(), "-y", "-o", f"{out}/", code, cwd=tmp_path)
            r, _, r_err = await trio.to_thread.run_sync(finish, receiver, 60.0)
            s, _, s_err = await trio.to_thread.run_sync(finish, sending[n], 60.0)
            assert (r, s) == (0, 0), r_err + s_err
            assert "gave up" not in s_err
            assert (out / f"f{n}.txt").read_text() == f"file {n}"
    finally:
        for process in sending:
            if process.poll() is None:
                process.kill()
                process.communicate()
        stop_relay(relay)
