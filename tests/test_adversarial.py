"""A live relay against hostile peers, while honest pairs move real files through it.

Hypothesis writes the hostile scripts: valid packets to the wrong role or the wrong UID,
packets out of order, relay-only packets, truncated and oversized packets, random bytes,
packets dribbled one byte at a time, floods, peers that stop reading, impostor senders that
use an honest nameplate, and junk on the secure port. The invariants are checked from three
sides at once:

- inside the relay: the real core is wrapped (``WatchedRelay``) and checked after every event
  the live trio driver feeds it: a forwarded packet never goes to a peer of its sender's role
  and carries its sender's UID, no UID is held by two live peers, every write is whole packets;
- from the hostile peers: what they receive is well-formed, relay-only packets come from UID
  0000, peer packets fit their role and come from UIDs announced to them;
- from outside: every honest transfer is verified byte for byte, a probe gets its Hello
  answered within a bound all along, and once everyone has left the relay holds nothing.

``PEER_RELAY_LONG=1`` runs many more examples (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import ClassVar, Union
from unittest import mock

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inprocess import relay_config, run_pair, running_relay
from packet_strategies import identities, packets, uids
from peer import handshake, spoke
from relay import wire
from relay.core import Close, Relay, Role, Send
from relay.server import ROOM_INVALID, ROOM_TIMEOUT

from processes import finish, peer, start_relay, stop_relay

LONG = os.environ.get("PEER_RELAY_LONG") == "1"
PROBE_BOUND = 15.0
"""Seconds within which a new receiver must get its identity (03), whatever else goes on: a
liveness deadline, generous for a loaded CI host, not a latency target. The worst latency
is printed (docs/reliability.md's figures) rather than asserted."""

NAMEPLATES = (901, 902, 903)
CODES = tuple(f"{n}-cobalt-lemon-unicycle" for n in NAMEPLATES)
IMPOSTOR_PUBLICS = tuple(
    spoke.generate(b"%d-wrong-guess-here" % n, salt=handshake.salt_for(n), iterations=16)[1].encode()
    for n in NAMEPLATES
)
"""Senders that use an honest nameplate with another code: honest receivers must try them."""

CLIENT_SENDS = frozenset({0x05, 0x07, 0x0A, 0x0B, 0x0D})
SERVER_SENDS = frozenset({0x06, 0x08, 0x0D})


# --- the core, watched from inside the live relay --------------------------------------------


class WatchedRelay(Relay):
    """The real relay core, with every output checked against the invariants.

    The driver swallows exceptions from a connection's task (one peer must not take the
    relay down), so problems are recorded in ``violations`` instead of raised.
    """

    instances: ClassVar[list[WatchedRelay]] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.violations: list[str] = []
        self.live: set = set()
        self.roles: dict = {}
        self.uids: dict = {}
        self.events = 0
        self.forwarded = 0
        self.most_connections = 0
        WatchedRelay.instances.append(self)

    def connect(self, conn, identity):
        self.live.add(conn)
        self.most_connections = max(self.most_connections, len(self.live))
        return self._checked(None, super().connect(conn, identity))

    def receive(self, conn, data):
        return self._checked(conn, super().receive(conn, data))

    def disconnect(self, conn):
        return self._checked(None, super().disconnect(conn))

    def expire(self, conn):
        return self._checked(None, super().expire(conn))

    def shutdown(self):
        return self._checked(None, super().shutdown())

    def _checked(self, source, outputs):
        self.events += 1
        try:
            self._check(source, outputs)
        except Exception as error:  # noqa: BLE001 - a checker bug must show, not vanish
            self.violations.append(f"checker failed: {error!r}")
        return outputs

    def _check(self, source, outputs) -> None:
        source_uid = self.uid_of(source) if source is not None else None
        if source_uid is None:
            source_uid = self.uids.get(source)
        for output in outputs:
            conn = output.conn
            if isinstance(output, Close):
                self.live.discard(conn)
                self.uids.pop(conn, None)
                continue
            assert isinstance(output, Send)
            parser = wire.Parser()
            parser.feed(output.data)
            try:
                frames = list(parser.frames())
            except wire.WireError as error:
                self.violations.append(f"the relay wrote a malformed packet: {error}")
                continue
            if parser.pending():
                self.violations.append("the relay wrote part of a packet")
            for frame in frames:
                self._check_frame(source, source_uid, conn, frame)
        for conn in self.live:
            uid = self.uid_of(conn)
            if uid is not None:
                self.uids[conn] = uid
        held = [uid for conn, uid in self.uids.items() if conn in self.live]
        if len(held) != len(set(held)):
            self.violations.append(f"two live peers share a UID: {sorted(held)}")
        if self.uids_in_use != len(held):
            self.violations.append(f"{self.uids_in_use} UIDs in use for {len(held)} peers")

    def _check_frame(self, source, source_uid, dest, frame: wire.Frame) -> None:
        kind = frame.packet.TYPE
        if kind == wire.ServerIdentity.TYPE:
            self.roles[dest] = Role.SERVER
        elif kind == wire.ClientIdentity.TYPE:
            self.roles[dest] = Role.CLIENT
        if kind not in wire.PEER_TO_PEER:
            if frame.uid != wire.RELAY_UID:
                self.violations.append(f"relay packet {kind:02x} with UID {frame.uid:04x}")
            return
        self.forwarded += 1
        if source is None or dest is source:
            self.violations.append(f"packet {kind:02x} forwarded without a sender")
            return
        sender_role, dest_role = self.roles.get(source), self.roles.get(dest)
        if sender_role is None or dest_role is None or sender_role is dest_role:
            self.violations.append(
                f"packet {kind:02x} from a {sender_role} forwarded to a {dest_role}")
        allowed = CLIENT_SENDS if sender_role is Role.CLIENT else SERVER_SENDS
        if kind not in allowed:
            self.violations.append(f"a {sender_role} had packet {kind:02x} forwarded")
        if source_uid is not None and frame.uid != source_uid:
            self.violations.append(
                f"packet {kind:02x} forwarded with UID {frame.uid:04x}, not its sender's "
                f"{source_uid:04x}")


@contextlib.contextmanager
def watched_core():
    """Make the relay started inside the block run a WatchedRelay; yield the instances."""
    WatchedRelay.instances = []
    with mock.patch("relay.server.Relay", WatchedRelay):
        yield WatchedRelay.instances


# --- hostile scripts -------------------------------------------------------------------------


@attrs.frozen
class SendPacket:
    target: tuple[str, int]
    """("relay", 0), ("learned", index) for a UID this peer heard of, or ("uid", value)."""
    packet: wire.Packet


@attrs.frozen
class Raw:
    data: bytes


@attrs.frozen
class Truncated:
    packet: wire.Packet
    keep: int


@attrs.frozen
class Dribble:
    """Bytes one at a time, with a pause after each (a slowloris)."""

    data: bytes
    delay: float


@attrs.frozen
class Flood:
    target: tuple[str, int]
    packet: wire.Packet
    count: int


@attrs.frozen
class Pause:
    seconds: float


@attrs.frozen
class Stall:
    """Stop reading for a while (the relay must not buffer for us without bound)."""

    seconds: float


Action = Union[SendPacket, Raw, Truncated, Dribble, Flood, Pause, Stall]


@attrs.frozen
class HostileScript:
    hello: str | None
    """None, "client", "server" or "impostor" (a server with an honest nameplate)."""
    nameplate_index: int
    actions: tuple[Action, ...]
    reactive: bool
    """Answer what arrives as a naive peer would: 06 for a 07, 05 for a 06, 0a for an 08."""
    ending: str
    """"close", "reset" (RST), "half" (our EOF, then wait) or "wait" (until the relay closes)."""


small_uids = st.integers(1, 48)
targets = st.one_of(
    st.just(("relay", 0)),
    st.tuples(st.just("learned"), st.integers(0, 64)),
    st.tuples(st.just("uid"), small_uids),
    st.tuples(st.just("uid"), uids),
)
OVERSIZED = [
    b"000011",  # type above 10
    b"00zz01",  # UID not hexadecimal
    b"0000 1",  # type not hexadecimal
    b"000002" + b"A" * 80,  # identity without NUL within 53 bytes
    b"000007" + bytes(32) + b"x" * 60 + b"\0",  # the same in a peer packet
    b"00010c" + b"Z0000",  # Relay_failure with an unknown letter
    b"00010d\x09",  # Spoke_failure code out of range
    b"0" * 4096,  # parses as a flood of Hello_as_a_server...
    b"0001" * 1024,  # ...and as a peer packet flood
]
actions = st.one_of(
    st.builds(SendPacket, targets, packets),
    st.builds(Raw, st.binary(min_size=1, max_size=64)),
    st.builds(Raw, st.sampled_from(OVERSIZED)),
    st.builds(Truncated, packets, st.integers(1, 100)),
    st.builds(Dribble, st.one_of(packets.map(lambda p: wire.encode(0, p)), st.binary(max_size=24)),
              st.floats(0.001, 0.02)),
    st.builds(Flood, targets, packets, st.integers(2, 120)),
    st.builds(Pause, st.floats(0, 0.15)),
    st.builds(Stall, st.floats(0, 0.4)),
)
hostile_scripts = st.builds(
    HostileScript,
    hello=st.sampled_from([None, "client", "client", "server", "server", "impostor"]),
    nameplate_index=st.integers(0, len(NAMEPLATES) - 1),
    actions=st.lists(actions, max_size=10).map(tuple),
    reactive=st.booleans(),
    ending=st.sampled_from(["close", "reset", "half", "wait"]),
)
GUESSER = HostileScript(hello="client", nameplate_index=0, actions=(Pause(1.0),), reactive=True,
                        ending="close")
"""A receiver that runs a real handshake, with a wrong code, against every honest sender."""
secure_scripts = st.one_of(
    st.binary(min_size=1, max_size=160),  # junk, with or without a newline
    identities.map(lambda i: i + b"\n"),  # a ticket nobody booked
    st.just(b"x" * 150),  # no newline within 100 bytes
    st.just(b""),  # connect and say nothing
)


@attrs.define
class Observer:
    """What one hostile peer saw, checked as it arrives."""

    role: Role | None = None
    servers_seen: set[int] = attrs.Factory(set)
    partners: set[int] = attrs.Factory(set)
    frames: int = 0
    sent_bytes: int = 0
    closed_by_relay: bool = False
    problems: list[str] = attrs.Factory(list)

    def see(self, frame: wire.Frame) -> None:
        self.frames += 1
        packet, kind = frame.packet, frame.packet.TYPE
        if kind not in wire.PEER_TO_PEER:
            if frame.uid != wire.RELAY_UID:
                self.problems.append(f"relay packet {kind:02x} from UID {frame.uid:04x}")
            if isinstance(packet, (wire.ServerIdentity, wire.ClientIdentity)):
                role = Role.SERVER if kind == wire.ServerIdentity.TYPE else Role.CLIENT
                if self.role not in (None, role):
                    self.problems.append(f"a {self.role} was told it is a {role}")
                self.role = role
            elif isinstance(packet, wire.NewServer):
                if self.role is not Role.CLIENT:
                    self.problems.append(f"a {self.role} got a New_server")
                self.servers_seen.add(packet.server_uid)
            elif isinstance(packet, wire.Done) and self.role is not Role.CLIENT:
                self.problems.append(f"a {self.role} got Done")
            return
        if frame.uid == wire.RELAY_UID:
            self.problems.append(f"peer packet {kind:02x} from UID 0000")
        if self.role is None:
            self.problems.append(f"peer packet {kind:02x} before our identity")
        elif self.role is Role.CLIENT:
            if kind not in SERVER_SENDS:
                self.problems.append(f"a client got {kind:02x}, a client's packet")
            if frame.uid not in self.servers_seen:
                self.problems.append(f"a client got {kind:02x} from {frame.uid:04x}, never announced")
        elif kind not in CLIENT_SENDS:
            self.problems.append(f"a server got {kind:02x}, a server's packet")
        self.partners.add(frame.uid)

    def learned(self) -> list[int]:
        return sorted(self.servers_seen | self.partners)


async def _open(port: int) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive buffer, so that a peer that stops reading soon backs up into the relay.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


def _reset(stream: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def guess_x(public: bytes, rng: random.Random) -> bytes:
    """A valid X for a sender with an honest nameplate (a real wrong guess of its code, which
    costs it one attempt); random bytes for anyone else (mostly not even a curve point)."""
    nameplate = int.from_bytes(public[18:20], "big")
    if nameplate in NAMEPLATES:
        with contextlib.suppress(spoke.SpokeError):
            return spoke.hello(b"%d-a-wrong-guess" % nameplate, public)[1]
    return rng.randbytes(32)


async def run_hostile(port: int, script: HostileScript, seen: Observer, rng: random.Random) -> None:
    """Play one script against the handshake port; never raises for what the relay does."""
    try:
        stream = await _open(port)
    except OSError as error:
        seen.problems.append(f"cannot connect: {error}")
        return
    lock = trio.Lock()
    reading = trio.Event()
    reading.set()
    gone = trio.Event()

    def uid_for(target: tuple[str, int]) -> int:
        kind, value = target
        if kind == "relay":
            return 0
        if kind == "learned":
            known = seen.learned()
            return known[value % len(known)] if known else 1 + value % 48
        return value

    async def write(data: bytes) -> None:
        async with lock:
            await stream.send_all(data)
        seen.sent_bytes += len(data)

    async def react(frame: wire.Frame) -> None:
        kind, uid = frame.packet.TYPE, frame.uid
        if kind == wire.XAndClientIdentity.TYPE:
            await write(wire.encode(uid, wire.YAndServerValidator(rng.randbytes(32), rng.randbytes(64))))
        elif kind == wire.YAndServerValidator.TYPE:
            await write(wire.encode(uid, wire.ClientValidator(rng.randbytes(64))))
        elif kind == wire.ClientValidator.TYPE:
            await write(wire.encode(uid, wire.Agreement()))
        elif kind == wire.Agreement.TYPE:
            await write(wire.encode(uid, wire.Accepted()))
        elif kind == wire.NewServer.TYPE:
            await write(wire.encode(frame.packet.server_uid, wire.XAndClientIdentity(
                guess_x(frame.packet.public, rng), b"1.2.3.4:5")))

    async def read() -> None:
        parser = wire.Parser()
        try:
            while True:
                await reading.wait()
                data = await stream.receive_some(4096)
                if not data:
                    seen.closed_by_relay = True
                    return
                parser.feed(data)
                for frame in parser.frames():
                    seen.see(frame)
                    if script.reactive:
                        await react(frame)
        except wire.WireError as error:
            seen.problems.append(f"the relay sent a malformed stream: {error}")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            seen.closed_by_relay = True
        finally:
            gone.set()

    async def play() -> None:
        if script.hello == "client":
            await write(wire.encode(0, wire.HelloClient()))
        elif script.hello == "server":
            await write(wire.encode(0, wire.HelloServer(rng.randbytes(34))))
        elif script.hello == "impostor":
            await write(wire.encode(0, wire.HelloServer(IMPOSTOR_PUBLICS[script.nameplate_index])))
        for action in script.actions:
            if isinstance(action, SendPacket):
                await write(wire.encode(uid_for(action.target), action.packet))
            elif isinstance(action, Raw):
                await write(action.data)
            elif isinstance(action, Truncated):
                data = wire.encode(0, action.packet)
                await write(data[: max(1, min(action.keep, len(data) - 1))])
            elif isinstance(action, Dribble):
                for byte in action.data:
                    await write(bytes([byte]))
                    await trio.sleep(action.delay)
            elif isinstance(action, Flood):
                await write(wire.encode(uid_for(action.target), action.packet) * action.count)
            elif isinstance(action, Pause):
                await trio.sleep(action.seconds)
            elif isinstance(action, Stall):
                await stall(action.seconds)
        if script.ending == "half":
            async with lock:
                await stream.send_eof()
        if script.ending in ("half", "wait"):
            with trio.move_on_after(2.5):
                await gone.wait()

    async def stall(seconds: float) -> None:
        nonlocal reading  # read() waits on whichever event is current
        reading = trio.Event()
        await trio.sleep(seconds)
        reading.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)

            async def play_then_stop() -> None:
                try:
                    await play()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    seen.closed_by_relay = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(play_then_stop)
    finally:
        if script.ending == "reset":
            _reset(stream)
        stream.socket.close()


async def run_secure_junk(secure_port: int, junk: bytes, problems: list[str]) -> None:
    """Junk on the secure port: the only acceptable answers are 01, 02 or silence."""
    try:
        stream = await _open(secure_port)
    except OSError as error:
        problems.append(f"cannot connect to the secure port: {error}")
        return
    answer = b""
    try:
        if junk:
            await stream.send_all(junk)
        with trio.move_on_after(4):
            while len(answer) < 4:
                data = await stream.receive_some(16)
                if not data:
                    break
                answer += data
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        stream.socket.close()
    if answer not in (b"", ROOM_TIMEOUT, ROOM_INVALID):
        problems.append(f"secure port answered {answer!r} to {junk[:40]!r}")


@attrs.define
class Probe:
    """A new receiver every so often: the relay must keep answering Hello promptly."""

    latencies: list[float] = attrs.Factory(list)
    problems: list[str] = attrs.Factory(list)
    times: list[float] = attrs.Factory(list)

    async def run(self, port: int, every: float = 0.05, bound: float = PROBE_BOUND) -> None:
        while True:
            started = time.perf_counter()
            with trio.move_on_after(bound) as timer:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError as error:
                    self.problems.append(f"probe cannot connect: {error}")
                    return
                try:
                    await stream.send_all(wire.encode(0, wire.HelloClient()))
                    parser = wire.Parser()
                    frame = None
                    while frame is None:
                        data = await stream.receive_some(4096)
                        if not data:
                            self.problems.append("probe: the relay closed before answering")
                            break
                        parser.feed(data)
                        frame = parser.next_frame()
                    if frame is not None and not isinstance(frame.packet, wire.ClientIdentity):
                        self.problems.append(f"probe got {frame!r} first")
                finally:
                    stream.socket.close()
            if timer.cancelled_caught:
                self.problems.append(f"probe not answered within {bound} s")
            self.latencies.append(time.perf_counter() - started)
            self.times.append(started)
            await trio.sleep(every)


# --- figures for docs/reliability.md ----------------------------------------------------------


@attrs.define
class Tally:
    examples: int = 0
    hostile_peers: int = 0
    hostile_bytes: int = 0
    secure_junk: int = 0
    relay_events: int = 0
    forwarded: int = 0
    honest_verified: int = 0
    honest_bytes: int = 0
    guesses_absorbed: int = 0
    probes: int = 0
    worst_probe: float = 0.0

    def report(self) -> str:
        return (f"adversarial: {self.examples} examples, {self.hostile_peers} hostile peers "
                f"sent {self.hostile_bytes} bytes (+{self.secure_junk} secure-port junk "
                f"connections); relay core events {self.relay_events}, forwarded "
                f"{self.forwarded}; honest transfers verified {self.honest_verified} "
                f"({self.honest_bytes} bytes), guesses absorbed {self.guesses_absorbed}; "
                f"probes {self.probes}, worst Hello answer {self.worst_probe * 1000:.0f} ms")


TALLY = Tally()


@pytest.fixture(scope="module", autouse=True)
def print_tally():
    yield
    if TALLY.examples:
        print("\n" + TALLY.report())


# --- the suites ------------------------------------------------------------------------------

ADVERSARIAL_CONFIG = dict(hello_timeout=1.5, timeout=20.0, room_timeout=2.0, max_outbox=8192)


async def wait_until_empty(core: WatchedRelay, limit: float = 6.0) -> None:
    """Everyone has left: the relay must drop every trace of them (bounded wait)."""
    with trio.move_on_after(limit):
        while (core.connections or core.uids_in_use or core.rooms.pending
               or core.rooms.waiting):
            await trio.sleep(0.05)
    state = dict(connections=core.connections, uids=core.uids_in_use,
                 rooms=core.rooms.pending, waiting=core.rooms.waiting)
    assert not any(state.values()), f"the relay still holds {state}"


@settings(max_examples=60 if LONG else 3, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(scripts=st.lists(hostile_scripts, min_size=6, max_size=30),
       junk=st.lists(secure_scripts, max_size=5),
       sizes=st.lists(st.integers(0, 300_000), min_size=2, max_size=3),
       seed=st.integers(0, 2**32 - 1))
async def test_hostile_peers_never_break_honest_transfers(scripts, junk, sizes, seed):
    rng = random.Random(seed)
    scripts = scripts + [GUESSER, GUESSER]
    observers = [Observer() for _ in scripts]
    secure_problems: list[str] = []
    probe = Probe()
    with tempfile.TemporaryDirectory() as tmp, watched_core() as cores:
        root = Path(tmp)
        sources = []
        for i, size in enumerate(sizes):
            (root / f"src{i}").mkdir()
            path = root / f"src{i}" / f"file{i}.bin"
            path.write_bytes(rng.randbytes(size))
            sources.append(path)
        results = []
        with trio.fail_after(60):
            async with running_relay(relay_config(**ADVERSARIAL_CONFIG)) as address:
                (core,) = cores
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(probe.run, address.port)
                    async with trio.open_nursery() as crowd:
                        for script, seen in zip(scripts, observers):
                            crowd.start_soon(run_hostile, address.port, script, seen,
                                             random.Random(rng.random()))
                        for data in junk:
                            crowd.start_soon(run_secure_junk, address.secure_port, data,
                                             secure_problems)
                        await trio.sleep(0.1)  # let the crowd in first

                        async def honest(i: int) -> None:
                            await trio.sleep(rng.random() * 0.3)
                            results.append(await run_pair(
                                address, CODES[i], sources[i], root / f"out{i}",
                                max_attempts=1000, timeout=30, room_timeout=10))

                        for i in range(len(sources)):
                            crowd.start_soon(honest, i)
                    nursery.cancel_scope.cancel()
                await wait_until_empty(core)
                violations = list(core.violations)
                TALLY.relay_events += core.events
                TALLY.forwarded += core.forwarded
    failed = [r.error for r in results if not r.ok]
    assert not failed, failed
    assert violations == [], violations[:10]
    problems = [p for seen in observers for p in seen.problems] + secure_problems + probe.problems
    assert problems == [], problems[:10]
    assert probe.latencies and max(probe.latencies) < PROBE_BOUND
    TALLY.examples += 1
    TALLY.hostile_peers += len(scripts)
    TALLY.hostile_bytes += sum(seen.sent_bytes for seen in observers)
    TALLY.secure_junk += len(junk)
    TALLY.honest_verified += len(results)
    TALLY.honest_bytes += sum(r.size for r in results)
    TALLY.guesses_absorbed += sum(r.attempts_failed for r in results)
    TALLY.probes += len(probe.latencies)
    TALLY.worst_probe = max(TALLY.worst_probe, max(probe.latencies))


async def test_a_peer_that_stops_reading_is_cut_off_and_nobody_waits_for_it(tmp_path):
    """Floods of announcements to a receiver that never reads: it is dropped, others go on."""
    source = tmp_path / "f.bin"
    source.write_bytes(os.urandom(200_000))
    probe = Probe()
    hellos = wire.encode(0, wire.HelloClient()) * 40
    with watched_core() as cores, trio.fail_after(30):
        async with running_relay(relay_config(**ADVERSARIAL_CONFIG)) as address:
            (core,) = cores
            senders = []
            for _ in range(8):
                sender = await _open(address.port)
                await sender.send_all(wire.encode(0, wire.HelloServer(bytes(34))))
                senders.append(sender)
            deaf = await _open(address.port)
            deaf_identity = _identity_of(deaf)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe.run, address.port)
                for sender in senders:
                    nursery.start_soon(_drain, sender)
                # The receiver repeats its Hello and never reads: each one earns it a 03 and
                # the eight senders' 04s (about 700 bytes) again.
                for _ in range(1000):  # the relay accepts it within a moment
                    if _holds(core, deaf_identity):
                        break
                    await trio.sleep(0.01)
                with trio.move_on_after(10):
                    with contextlib.suppress(trio.BrokenResourceError):
                        while _holds(core, deaf_identity):
                            await deaf.send_all(hellos)
                            await trio.sleep(0.001)
                cut_off = not _holds(core, deaf_identity)
                result = await run_pair(address, CODES[0], source, tmp_path / "out", timeout=20)
                nursery.cancel_scope.cancel()
            deaf.socket.close()
            for sender in senders:
                sender.socket.close()
            await wait_until_empty(core)
    assert cut_off, "a receiver that never reads is still connected"
    assert result.ok, result.error
    assert core.violations == []
    assert probe.problems == [] and max(probe.latencies) < PROBE_BOUND


def _identity_of(stream: trio.SocketStream) -> bytes:
    host, port = stream.socket.getsockname()[:2]
    return wire.identity_of(host, port)


def _holds(core: WatchedRelay, identity: bytes) -> bool:
    """Whether the relay still serves the handshake connection with this identity."""
    return any(getattr(conn, "identity", None) == identity for conn in core.live)


async def _drain(stream: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await stream.receive_some(65536):
            pass


async def _open_from(host: str, port: int) -> trio.SocketStream:
    """A connection from another loopback address: to the relay, another machine."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((host, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def test_a_stranger_cannot_take_a_booked_room(tmp_path):
    """A client elsewhere hears every sender's identity (04) and each pairing (09): with a
    secure-port connection opened in advance it can present the sender's identity as its
    ticket before the real receiver gets there, and sit in the room in its place."""
    source = tmp_path / "f.bin"
    source.write_bytes(os.urandom(50_000))
    with trio.fail_after(30):
        async with running_relay(relay_config(room_timeout=5.0)) as address:
            spy = await _open_from("127.0.0.2", address.port)
            await spy.send_all(wire.encode(0, wire.HelloClient()))
            seat = await _open_from("127.0.0.2", address.secure_port)
            claimed: list[bytes] = []

            async def watch() -> None:
                parser, servers = wire.Parser(), {}
                while True:
                    data = await spy.receive_some(4096)
                    if not data:
                        return
                    parser.feed(data)
                    for frame in parser.frames():
                        packet = frame.packet
                        if isinstance(packet, wire.NewServer):
                            servers[packet.server_uid] = packet.identity
                        elif isinstance(packet, wire.Closed) and packet.peer_uid in servers:
                            # The sender was just paired: its room is booked now.
                            await seat.send_all(servers[packet.peer_uid] + b"\n")
                            claimed.append(await seat.receive_some(2))
                            seat.socket.close()  # and leave: the sender is alone in the room
                            return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                result = await run_pair(address, CODES[0], source, tmp_path / "out",
                                        timeout=10, room_timeout=5)
                nursery.cancel_scope.cancel()
            spy.socket.close()
            seat.socket.close()
    assert claimed != [b"00"], f"the stranger was seated in the honest pair's room: {result.error}"
    assert result.ok, result.error


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line")


STORM_RSS_BOUND = 64 << 20
"""Bytes the relay process may grow by while a few hundred hostile connections hammer it."""
STORM_PROBE_BOUND = 30.0
"""Seconds for a Hello answer during the storm: a liveness deadline like PROBE_BOUND, looser
because here the relay is a process of its own, and on a small shared machine starting the
two peer processes alone starves it of CPU for up to two seconds (measured on 2 cores)."""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
async def test_real_relay_process_under_a_storm(tmp_path):
    """The relay as users run it, hammered by hundreds of hostile connections while a real
    ``peer send`` / ``peer recv`` pair transfers through it: memory stays bounded, Hello is
    answered promptly, the transfer is verified, and the storm leaves nothing behind."""
    relay = start_relay("--hello-timeout", "2", "--room-timeout", "5")
    pid = relay.process.pid
    data = os.urandom(3 << 20)
    (tmp_path / "payload.bin").write_bytes(data)
    probe = Probe()
    baseline = rss_bytes(pid)
    peak = baseline
    try:
        with trio.fail_after(60):
            async def watch_memory() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, rss_bytes(pid))
                    await trio.sleep(0.02)

            async def idle() -> None:  # a slowloris: connects, never says Hello
                stream = await _open(relay.port)
                await _drain(stream)
                stream.socket.close()

            async def deaf_client() -> None:  # registers, then never reads
                stream = await _open(relay.port)
                await stream.send_all(wire.encode(0, wire.HelloClient()))
                await trio.sleep(8)
                stream.socket.close()

            async def sprayer(n: int) -> None:  # a sender spraying peer packets at random UIDs
                stream = await _open(relay.port)
                rng = random.Random(n)
                async with trio.open_nursery() as inner:
                    inner.start_soon(_drain, stream)
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await stream.send_all(wire.encode(0, wire.HelloServer(bytes(34))))
                        for _ in range(150):
                            spray = b"".join(
                                wire.encode(rng.randrange(1, 400), rng.choice(
                                    [wire.Agreement(), wire.SpokeFailure(1),
                                     wire.YAndServerValidator(bytes(32), bytes(64))]))
                                for _ in range(20))
                            await stream.send_all(spray)
                            await trio.sleep(0.02)
                    inner.cancel_scope.cancel()
                stream.socket.close()

            async def churn(n: int) -> None:  # senders that register and leave at once
                for _ in range(20):
                    stream = await _open(relay.port)
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await stream.send_all(wire.encode(0, wire.HelloServer(bytes(34))))
                        await stream.receive_some(64)
                    stream.socket.close()

            async def garbage(n: int) -> None:  # malformed bytes, reconnecting each time
                rng = random.Random(n)
                for _ in range(30):
                    stream = await _open(relay.port)
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await stream.send_all(rng.choice(OVERSIZED) + rng.randbytes(40))
                        await _drain(stream)
                    stream.socket.close()

            def transfer() -> tuple:
                sender = peer("send", *relay.peer_args(), "--password", CODES[1], "payload.bin",
                              cwd=tmp_path)
                receiver = peer("recv", *relay.peer_args(), "-y", "-o", f"{tmp_path / 'out'}/",
                                CODES[1], cwd=tmp_path)
                return finish(sender, 45), finish(receiver, 45)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_memory)
                nursery.start_soon(functools.partial(probe.run, relay.port, 0.1,
                                                     bound=STORM_PROBE_BOUND))
                async with trio.open_nursery() as storm:
                    rng = random.Random(7)

                    async def later(job, *args) -> None:  # the storm builds up over a second
                        await trio.sleep(rng.random())
                        await job(*args)

                    for n in range(100):
                        storm.start_soon(later, idle)
                        storm.start_soon(later, deaf_client)
                    for n in range(40):
                        storm.start_soon(later, sprayer, n)
                        storm.start_soon(later, garbage, n)
                        storm.start_soon(later, churn, n)
                    await trio.sleep(1.0)
                    (s, _, s_err), (r, _, r_err) = await trio.to_thread.run_sync(transfer)
                nursery.cancel_scope.cancel()
        assert relay.process.poll() is None, "the relay died"
        # A new pair right after the storm is served at once.
        started = time.perf_counter()
        sender = peer("send", *relay.peer_args(), "--password", CODES[2], "payload.bin", cwd=tmp_path)
        receiver = peer("recv", *relay.peer_args(), "-y", "-o", f"{tmp_path / 'after'}/", CODES[2],
                        cwd=tmp_path)
        (s2, _, s2_err), (r2, _, r2_err) = finish(sender, 30), finish(receiver, 30)
        after_storm = time.perf_counter() - started
    finally:
        stop_relay(relay)
    assert (s, r) == (0, 0), s_err + r_err
    assert (tmp_path / "out" / "payload.bin").read_bytes() == data
    assert (s2, r2) == (0, 0), s2_err + r2_err
    assert (tmp_path / "after" / "payload.bin").read_bytes() == data
    assert probe.problems == [], probe.problems[:5]
    assert max(probe.latencies) < STORM_PROBE_BOUND
    assert peak - baseline < STORM_RSS_BOUND, f"relay RSS grew by {(peak - baseline) >> 20} MiB"
    print(f"\nstorm: relay RSS {baseline >> 20} MiB -> peak {peak >> 20} MiB; "
          f"{len(probe.latencies)} probes, worst {max(probe.latencies) * 1000:.0f} ms; "
          f"a new pair after the storm took {after_storm:.2f} s (two process start-ups included)")


async def test_repeated_hellos_do_not_cut_off_honest_receivers():
    relay = start_relay()
    try:
        with trio.fail_after(30):
            receiver = await trio.open_tcp_stream("127.0.0.1", relay.port)
            await receiver.send_all(wire.encode(0, wire.HelloClient()))
            got = bytearray()
            cut_off = trio.Event()

            async def read_everything() -> None:  # a receiver that reads as fast as it can
                with contextlib.suppress(trio.BrokenResourceError):
                    while data := await receiver.receive_some(1 << 16):
                        got.extend(data)
                cut_off.set()

            async def flood() -> None:
                stream = await _open(relay.port)
                hellos = wire.encode(0, wire.HelloServer(bytes(34))) * 100
                async with trio.open_nursery() as inner:
                    inner.start_soon(_drain, stream)
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        for _ in range(60):
                            if cut_off.is_set():
                                break
                            await stream.send_all(hellos)
                            await trio.sleep(0.01)
                    inner.cancel_scope.cancel()
                stream.socket.close()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_everything)
                async with trio.open_nursery() as flooders:
                    for _ in range(40):
                        flooders.start_soon(flood)
                with trio.move_on_after(0.5):
                    await cut_off.wait()
                nursery.cancel_scope.cancel()
            receiver.socket.close()
    finally:
        stop_relay(relay)
    assert got.startswith(b"000003"), bytes(got[:20])
    assert not cut_off.is_set(), "an honest receiver reading promptly was cut off"
