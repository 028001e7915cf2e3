"""Fault injection with real processes: SIGKILL the sender, the receiver or the relay at a
random moment of the handshake or of the transfer, and cut or corrupt the secure-room
connection mid-record with a TCP proxy.

After every fault:
- nothing is under its final name unless it is complete and equal to the source;
- what a killed transfer left behind is removed, except the ``*.peer-part`` temporary file
  (and, under resume, its ``*.peer-journal``) of a receiver killed with SIGKILL: nothing can
  clean up after that, and it is what a later attempt resumes from;
- a peer whose partner died in the handshake keeps waiting and completes with a new partner;
- a relay restarted on the same ports serves a new pair at once;
- a peer that fails exits 1 with one line on stderr (warnings aside), never a traceback.

The secure port is reached through an in-test proxy that also throttles it (about 25 MB/s),
so that a random moment "during the transfer" really falls inside it on a fast machine.
``PEER_RELAY_LONG=1`` runs 30 rounds of each scenario instead of 1 (docs/reliability.md).
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import attrs
import pytest
import trio

from processes import RelayProcess, peer, start_relay, stop_relay

LONG = os.environ.get("PEER_RELAY_LONG") == "1"
ROUNDS = 30 if LONG else 1
PAYLOAD_SIZE = 12 << 20
THROTTLE = 25e6
"""Bytes per second the proxy lets through each way: the transfer lasts about half a second."""
SURVIVOR_LIMIT = 15.0
"""Seconds a peer whose partner or relay died may take to give up (room timeout 3 s + slack)."""
RELAY_ARGS = ("--room-timeout", "3", "--hello-timeout", "5")


# --- a proxy in front of the secure port ----------------------------------------------------


@attrs.define
class Fault:
    """What the proxy does to the first connection carrying more than ``at`` bytes one way."""

    kind: str = "none"
    """"none", "cut" (forward ``at`` bytes, then reset both sides) or "flip" (flip a bit)."""
    direction: str = "up"
    """"up" (peer to relay: the sender's records) or "down" (relay to peer: the receiver's)."""
    at: int = 0
    done: bool = False


class Proxy:
    """Forwards a port to the relay's secure port, throttled, with at most one fault."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.fault = Fault()
        self.port = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            _abort(client)
            return
        ends = {"up": False, "down": False}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream, "up", ends, nursery)
            nursery.start_soon(self._pump, upstream, client, "down", ends, nursery)
        for stream in (client, upstream):
            stream.socket.close()

    async def _pump(self, src, dst, direction, ends, nursery) -> None:
        fault = self.fault
        moved = 0
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    ends[direction] = True
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await dst.send_eof()  # a FIN goes through as a FIN
                    if all(ends.values()):
                        nursery.cancel_scope.cancel()
                    return
                if (fault.kind != "none" and not fault.done and fault.direction == direction
                        and moved + len(data) > fault.at):
                    fault.done = True
                    offset = fault.at - moved
                    if fault.kind == "cut":
                        await dst.send_all(data[:offset])
                        _abort(src)
                        _abort(dst)
                        nursery.cancel_scope.cancel()
                        return
                    flipped = bytearray(data)
                    flipped[offset] ^= 0x10
                    data = bytes(flipped)
                moved += len(data)
                await dst.send_all(data)
                await trio.sleep(len(data) / THROTTLE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # A reset on one side becomes a reset on the other.
            _abort(src)
            _abort(dst)
            nursery.cancel_scope.cancel()


def _abort(stream: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


# --- the world of one test: a relay process, the proxy, the payload --------------------------


@attrs.define
class Tally:
    faults: collections.Counter = attrs.Factory(collections.Counter)
    outcomes: collections.Counter = attrs.Factory(collections.Counter)
    verified: int = 0
    leftover_parts: int = 0
    relay_restarts: list[float] = attrs.Factory(list)
    messages: collections.Counter = attrs.Factory(collections.Counter)
    """Each distinct failure line (addresses and numbers masked) and how often it was seen."""

    def report(self) -> str:
        restarts = (f"; a restarted relay (start-up included) served a new pair in at most "
                    f"{max(self.relay_restarts):.2f} s" if self.relay_restarts else "")
        return (f"faults: {sum(self.faults.values())} injected {dict(self.faults)}; outcomes "
                f"{dict(self.outcomes)}; {self.verified} files verified complete; "
                f"{self.leftover_parts} *.peer-part files left by killed receivers; lost or "
                f"corrupt: 0{restarts}\nmessages:\n" + "\n".join(
                    f"  {count:4d}  {line}" for line, count in self.messages.most_common()))


TALLY = Tally()


@pytest.fixture(scope="module", autouse=True)
def print_tally():
    yield
    if TALLY.faults:
        print("\n" + TALLY.report())


class World:
    def __init__(self, tmp: Path, relay: RelayProcess, proxy: Proxy) -> None:
        self.tmp = tmp
        self.relay = relay
        self.proxy = proxy
        self.payload = os.urandom(PAYLOAD_SIZE)
        (tmp / "payload.bin").write_bytes(self.payload)
        self.small = b"after the fault\n"
        (tmp / "small.txt").write_bytes(self.small)
        self.rounds = 0
        self.processes: list[subprocess.Popen] = []

    def peer_args(self) -> list[str]:
        return ["--relay", self.relay.address, "--secure-port", str(self.proxy.port), "-q"]

    def start(self, role: str, code: str, out: Path, what: str = "payload.bin") -> subprocess.Popen:
        if role == "send":
            process = peer("send", *self.peer_args(), "--password", code, what, cwd=self.tmp)
        else:
            process = peer("recv", *self.peer_args(), "-y", "-o", f"{out}/", code, cwd=self.tmp)
        self.processes.append(process)
        return process

    def restart_relay(self) -> None:
        """A new relay process on the ports of the dead one, as a supervisor would."""
        self.relay = start_relay(*RELAY_ARGS, "--port", str(self.relay.port),
                                 "--secure-port", str(self.relay.secure_port))

    def cleanup(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.communicate()
        self.processes.clear()


@contextlib.asynccontextmanager
async def world(tmp_path: Path):
    relay = start_relay(*RELAY_ARGS)
    the_world = None
    try:
        async with trio.open_nursery() as nursery:
            proxy = Proxy(relay.secure_port)
            await nursery.start(proxy.serve)
            the_world = World(tmp_path, relay, proxy)
            try:
                yield the_world
            finally:
                the_world.cleanup()
                nursery.cancel_scope.cancel()
    finally:
        current = the_world.relay if the_world is not None else relay
        for each in {id(relay): relay, id(current): current}.values():
            if each.process.poll() is None:
                stop_relay(each)
            else:
                each.process.stdout.close()


# --- checks --------------------------------------------------------------------------------


async def wait_exit(process: subprocess.Popen, limit: float) -> tuple[int, str] | None:
    """(status, stderr) once the process exits within ``limit`` seconds, else None."""
    with trio.move_on_after(limit):
        while process.poll() is None:
            await trio.sleep(0.02)
        _, err = process.communicate()
        return process.returncode, err.decode(errors="replace")
    return None


def check_failure_message(status: int, err: str, who: str) -> None:
    """Exit 1 and exactly one error line (warnings aside), never a traceback."""
    assert "Traceback" not in err, f"{who} crashed:\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("peer: warning:")]
    assert status == 1, f"{who} exited {status}: {err}"
    assert len(errors) == 1 and errors[0].startswith("peer: "), f"{who} said: {err!r}"
    TALLY.messages[f"{who}: " + re.sub(r"\d+", "N", errors[0])] += 1


def check_destination(out: Path, expected: dict[str, bytes], *, parts_allowed: bool) -> int:
    """Only complete, correct files under their names; return how many temporaries are left."""
    if not out.exists():
        return 0
    parts = 0
    for path in out.iterdir():
        if path.name.endswith((".peer-part", ".peer-journal")):
            # A partial file and (under resume) its journal: what a later attempt resumes.
            assert parts_allowed, f"a temporary file was left behind: {path.name}"
            parts += path.name.endswith(".peer-part")
            continue
        assert path.name in expected, f"unexpected file {path.name}"
        assert path.read_bytes() == expected[path.name], f"{path.name} is not the file sent"
        TALLY.verified += 1
    return parts


async def wait_for_data(out: Path, receiver: subprocess.Popen, limit: float = 20.0) -> None:
    """Until the receiver has written its first bytes (the transfer is under way)."""
    with trio.move_on_after(limit):
        while receiver.poll() is None:
            if out.exists() and any(p.stat().st_size for p in out.glob("*.peer-part")):
                return
            await trio.sleep(0.005)


# --- one round -----------------------------------------------------------------------------


async def kill_round(w: World, victim: str, phase: str, rng: random.Random) -> str:
    """Start a pair, SIGKILL one of the three processes at a random moment, check the rest."""
    w.rounds += 1
    code = f"{rng.randrange(1000)}-fault-round-{w.rounds}"
    out = w.tmp / f"out{w.rounds}"
    sender = w.start("send", code, out)
    if phase == "handshake":
        await trio.sleep(rng.uniform(0, 0.8))
        receiver = w.start("recv", code, out)
        await trio.sleep(rng.uniform(0, 0.7))
    else:
        receiver = w.start("recv", code, out)
        await wait_for_data(out, receiver)
        await trio.sleep(rng.uniform(0, 0.4))
    processes = {"sender": sender, "receiver": receiver, "relay": w.relay.process}
    processes[victim].send_signal(signal.SIGKILL)
    processes[victim].wait()
    TALLY.faults[f"SIGKILL {victim} during {phase}"] += 1
    survivors = {name: p for name, p in (("sender", sender), ("receiver", receiver))
                 if name != victim}
    if victim == "relay":
        w.relay.process.stdout.close()
        outcome = await _after_relay_death(w, out, survivors)
        restarting = time.perf_counter()
        w.restart_relay()
        await _new_pair_through(w, restarting)
    else:
        ((name, survivor),) = survivors.items()
        outcome = await _after_peer_death(w, code, out, name, survivor)
    TALLY.leftover_parts += check_destination(
        out, {"payload.bin": w.payload}, parts_allowed=victim == "receiver")
    TALLY.outcomes[outcome] += 1
    return outcome


async def _after_relay_death(w: World, out: Path, survivors: dict) -> str:
    """Both peers must stop on their own, promptly, and say why (unless they had finished)."""
    results = {name: await wait_exit(p, SURVIVOR_LIMIT) for name, p in survivors.items()}
    assert all(r is not None for r in results.values()), f"a peer outlived the relay: {results}"
    if all(status == 0 for status, _ in results.values()):
        assert (out / "payload.bin").read_bytes() == w.payload
        return "finished before the fault"
    for name, (status, err) in results.items():
        if status != 0:
            check_failure_message(status, err, name)
    return "both failed cleanly"


async def _after_peer_death(w: World, code: str, out: Path, name: str, survivor) -> str:
    """The survivor either stops cleanly, or (partner lost before pairing) waits for a new
    partner and completes with it."""
    result = await wait_exit(survivor, 1.5)
    if result is not None:
        status, err = result
        if status == 0:
            assert (out / "payload.bin").read_bytes() == w.payload
            return "finished before the fault"
        check_failure_message(status, err, name)
        return "the survivor failed cleanly"
    replacement = w.start("recv" if name == "sender" else "send", code, out)
    started = time.perf_counter()
    result = await wait_exit(survivor, SURVIVOR_LIMIT)
    assert result is not None, f"the waiting {name} never finished"
    status, err = result
    if status == 0:
        other = await wait_exit(replacement, SURVIVOR_LIMIT)
        assert other is not None and other[0] == 0, other
        assert (out / "payload.bin").read_bytes() == w.payload
        return "the survivor completed with a new partner"
    # It was already past pairing (its room never filled): it fails; the newcomer waits.
    check_failure_message(status, err, name)
    await trio.sleep(max(0.0, 1.5 - (time.perf_counter() - started)))  # past its start-up
    replacement.send_signal(signal.SIGINT)
    other = await wait_exit(replacement, 10)
    assert other is not None and other[0] == 130 and "interrupted" in other[1], other
    return "the survivor failed cleanly"


async def _new_pair_through(w: World, restarting: float) -> None:
    """Right after the restart, a new pair must get through at the first try."""
    code = "777-after-the-restart"
    out = w.tmp / f"after{w.rounds}"
    sender = w.start("send", code, out, what="small.txt")
    receiver = w.start("recv", code, out)
    for process in (sender, receiver):
        result = await wait_exit(process, 20)
        assert result is not None and result[0] == 0, result
    assert (out / "small.txt").read_bytes() == w.small
    TALLY.relay_restarts.append(time.perf_counter() - restarting)


async def proxy_round(w: World, fault: Fault) -> str:
    """A transfer whose secure-room connection is cut or corrupted after ``fault.at`` bytes."""
    w.rounds += 1
    code = f"{w.rounds}-proxy-fault-round-{w.rounds}"  # a number in it: tried as typed
    out = w.tmp / f"out{w.rounds}"
    w.proxy.fault = fault
    sender = w.start("send", code, out)
    receiver = w.start("recv", code, out)
    results = {name: await wait_exit(p, SURVIVOR_LIMIT)
               for name, p in (("sender", sender), ("receiver", receiver))}
    w.proxy.fault = Fault()
    TALLY.faults[f"{fault.kind} {fault.direction}stream mid-record"] += 1
    assert all(r is not None for r in results.values()), f"a peer hung after a {fault}: {results}"
    if not fault.done or all(r[0] == 0 for r in results.values()):
        assert all(r[0] == 0 for r in results.values()), results
        assert (out / "payload.bin").read_bytes() == w.payload
        outcome = "finished (fault after the last byte)"
    else:
        for name, (status, err) in results.items():
            check_failure_message(status, err, name)
        if fault.kind == "flip":
            assert "corrupt" in results["receiver"][1], results["receiver"][1]
        outcome = "both failed cleanly"
    check_destination(out, {"payload.bin": w.payload}, parts_allowed=False)
    TALLY.outcomes[outcome] += 1
    return outcome


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["handshake", "transfer"])
@pytest.mark.parametrize("victim", ["sender", "receiver", "relay"])
async def test_sigkill_at_a_random_moment(tmp_path, victim, phase):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    async with world(tmp_path) as w:
        for _ in range(ROUNDS):
            try:
                await kill_round(w, victim, phase, rng)
            except AssertionError as error:
                raise AssertionError(f"seed {seed}, round {w.rounds}: {error}") from None
            finally:
                w.cleanup()


@pytest.mark.parametrize("kind, direction", [("cut", "up"), ("cut", "down"), ("flip", "up")])
async def test_secure_connection_cut_or_corrupted_mid_record(tmp_path, kind, direction):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    async with world(tmp_path) as w:
        for _ in range(ROUNDS):
            fault = Fault(kind, direction, rng.randrange(4096, PAYLOAD_SIZE))
            try:
                await proxy_round(w, fault)
            except AssertionError as error:
                raise AssertionError(f"seed {seed}, {fault}: {error}") from None
            finally:
                w.cleanup()


def test_killed_receiver_leaves_only_its_temporary_file(tmp_path):
    """What SIGKILL leaves can only be a ``*.peer-part`` next to where the file would go:
    never a file under its final name (the resume work should pick these up)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.bin.0123abcd.peer-part").write_bytes(b"partial")
    assert check_destination(out, {"x.bin": b"whole"}, parts_allowed=True) == 1
    with pytest.raises(AssertionError):
        check_destination(out, {"x.bin": b"whole"}, parts_allowed=False)
    (out / "x.bin").write_bytes(b"whol")
    with pytest.raises(AssertionError):
        check_destination(out, {"x.bin": b"whole"}, parts_allowed=True)
