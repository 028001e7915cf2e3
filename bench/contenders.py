"""One end-to-end transfer by each contender, measured the same way.

Every function here moves one file (or, for the references, the same number of bytes) from a
sender process to a receiver process on loopback and returns a ``Run``: wall seconds from
starting both ends until both exited, the CPU seconds of every process involved (from wait4)
and their peak resident memory (VmHWM, polled every few milliseconds until they exit). Each
run starts its own servers, so their peak memory belongs to that run alone.

Contenders: ours over TCP and over WebSocket (``peer send`` → ``peer-relay`` → ``peer recv``),
magic-wormhole forced through its own transit relay (``--no-listen`` on both ends, so the
bytes cross the relay as ours do), and two references with no crypto and no disk: a plain
loopback socket copy and the same copy through a ``socat`` forwarder.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import attrs

from measure import cpu_of, env, relay_command, relay_ports

SINK = r"""
import socket
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
view = memoryview(bytearray(1 << 20))
total = 0
while n := conn.recv_into(view):
    total += n
print(total, flush=True)
"""
SOURCE = r"""
import socket, sys
size, port = int(sys.argv[1]), int(sys.argv[2])
chunk = memoryview(bytes(1 << 20))
conn = socket.create_connection(("127.0.0.1", port))
while size:
    n = min(size, len(chunk))
    conn.sendall(chunk[:n])
    size -= n
conn.close()
"""
CODE = "321-bench-mark-code"
WORMHOLE_CODE = "7-bench-mark-code"


@attrs.frozen
class Run:
    seconds: float
    cpu: dict[str, float]
    """CPU seconds (user + system) by role: sender, relay, receiver (and others)."""
    peak_kib: dict[str, int]
    """Peak resident memory (KiB) by role."""


class Children:
    """The processes of one run: started here, reaped with wait4 for their CPU and memory."""

    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen] = {}
        self.cpu: dict[str, float] = {}
        self.peak_kib: dict[str, int] = {}

    def start(self, role: str, argv: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(argv, **kwargs)
        self.processes[role] = process
        return process

    def wait(self, role: str, timeout: float = 900) -> int:
        process = self.processes[role]
        deadline = time.monotonic() + timeout
        while True:
            self._sample()
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                self.cpu[role] = usage.ru_utime + usage.ru_stime
                return process.returncode
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{role} did not finish in {timeout} s")
            time.sleep(0.005)

    def _sample(self) -> None:
        """Peak memory from each live child's VmHWM, polled. (wait4's ru_maxrss will not do:
        on Linux a child starts with its parent's peak, which here is larger than most.)"""
        for role, process in self.processes.items():
            if process.returncode is not None:
                continue
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_kib[role] = max(self.peak_kib.get(role, 0), int(line.split()[1]))
                    break

    def stop(self, role: str) -> None:
        """End a server (SIGTERM, then SIGKILL) and reap it."""
        process = self.processes[role]
        if process.returncode is None:
            process.terminate()
            try:
                self.wait(role, 15)
            except RuntimeError:
                process.kill()
                self.wait(role, 15)

    def stop_all(self) -> None:
        for role, process in self.processes.items():
            if process.returncode is None:
                process.kill()
                self.wait(role, 15)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 30.0) -> None:
    """Wait until something listens on 127.0.0.1:port, read from /proc (a probe connection
    would use up socat's single one)."""
    wanted = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(wanted) and fields[3] == "0A":
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def _copy(size: int, through_socat: bool) -> Run:
    children = Children()
    try:
        sink = children.start("receiver", [sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
        port = int(sink.stdout.readline())
        if through_socat:
            front = free_port()
            children.start("relay", ["socat", f"TCP-LISTEN:{front},bind=127.0.0.1,reuseaddr",
                                     f"TCP:127.0.0.1:{port}"])
            wait_listening(front)
            port = front
        started = time.perf_counter()
        children.start("sender", [sys.executable, "-c", SOURCE, str(size), str(port)])
        children.wait("sender")
        received = int(sink.stdout.readline())
        children.wait("receiver")
        elapsed = time.perf_counter() - started
        if through_socat:
            children.wait("relay")  # socat exits when its one connection ends
        if received != size:
            raise RuntimeError(f"the copy moved {received} of {size} bytes")
        return Run(elapsed, children.cpu, children.peak_kib)
    finally:
        children.stop_all()


def loopback_copy(size: int) -> Run:
    """A Python sender writing 1 MiB buffers straight into a Python sink: the ceiling."""
    return _copy(size, through_socat=False)


def socat_copy(size: int) -> Run:
    """The same copy through a socat forwarder: the ceiling for any relay here."""
    return _copy(size, through_socat=True)


def ours(source: Path, out_dir: Path, transport: str, python: str = sys.executable,
         child_env: dict[str, str] | None = None) -> Run:
    """``peer send`` → ``peer-relay`` → ``peer recv`` over "tcp" or "ws"; the relay's CPU is
    counted from the peers' start to their end."""
    child_env = env() if child_env is None else child_env
    children = Children()
    try:
        relay = children.start("relay", relay_command("--ws-port", "0", python=python),
                               stdout=subprocess.PIPE, text=True, env=child_env)
        port, secure, ws_port = relay_ports(relay)
        if transport == "ws":
            where = ["--relay", f"ws://127.0.0.1:{ws_port}/"]
        else:
            where = ["--relay", f"127.0.0.1:{port}", "--secure-port", str(secure)]
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir()
        relay_before = cpu_of(relay.pid)
        started = time.perf_counter()
        children.start("sender", [python, "-m", "peer", "send", *where, "-q", "--password", CODE,
                                  str(source)], env=child_env)
        children.start("receiver", [python, "-m", "peer", "recv", *where, "-q", "-y", "-o",
                                    f"{out_dir}/", CODE], env=child_env)
        return _finish(children, started, relay_before, ["relay"], f"ours over {transport}",
                       source, out_dir)
    finally:
        children.stop_all()
        shutil.rmtree(out_dir, ignore_errors=True)


def start_wormhole_services(children: Children, bin_dir: Path, work: Path):
    """magic-wormhole's mailbox server and transit relay on loopback ports: the transit
    relay's child (its CPU is the "relay" figure) and the arguments that point a
    ``wormhole`` command at both."""
    mailbox, transit = free_port(), free_port()
    children.start("mailbox", [str(bin_dir / "twist"), "wormhole-mailbox",
                               f"--port=tcp:{mailbox}:interface=127.0.0.1",
                               f"--channel-db={work / 'mailbox.sqlite'}"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    relay = children.start("relay", [str(bin_dir / "twist"), "transitrelay",
                                     f"--port=tcp:{transit}:interface=127.0.0.1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    wait_listening(mailbox)
    wait_listening(transit)
    common = [str(bin_dir / "wormhole"), "--relay-url", f"ws://127.0.0.1:{mailbox}/v1",
              "--transit-helper", f"tcp:127.0.0.1:{transit}"]
    return relay, common


def wormhole(source: Path, out_dir: Path, venv: Path) -> Run:
    """magic-wormhole with its own mailbox server and transit relay on loopback, both ends
    with ``--no-listen`` so the data goes through the transit relay (whose CPU is "relay")."""
    children = Children()
    bin_dir = venv / "bin"
    work = out_dir.parent
    try:
        relay, common = start_wormhole_services(children, bin_dir, work)
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir()
        relay_before = cpu_of(relay.pid)
        started = time.perf_counter()
        children.start("sender", [*common, "send", "--no-listen", "--hide-progress", "--no-qr",
                                  "--code", WORMHOLE_CODE, str(source)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        children.start("receiver", [*common, "receive", "--no-listen", "--hide-progress",
                                    "--accept-file", "-o", str(out_dir / source.name), WORMHOLE_CODE],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return _finish(children, started, relay_before, ["relay", "mailbox"], "wormhole",
                       source, out_dir)
    finally:
        children.stop_all()
        shutil.rmtree(out_dir, ignore_errors=True)


def _finish(children: Children, started: float, relay_before: float, servers: list[str],
            what: str, source: Path, out_dir: Path) -> Run:
    """Both ends done: the wall time, the relay's CPU during the transfer, the servers
    stopped (for their peak memory), the received file checked."""
    statuses = children.wait("receiver"), children.wait("sender")
    elapsed = time.perf_counter() - started
    relay_cpu = cpu_of(children.processes["relay"].pid) - relay_before
    for role in servers:
        children.stop(role)
    children.cpu["relay"] = relay_cpu
    if statuses != (0, 0):
        stream = children.processes["receiver"].stderr
        said = stream.read().decode(errors="replace").strip()[-300:] if stream else ""
        raise RuntimeError(f"{what} failed: recv {statuses[0]}, send {statuses[1]} {said}")
    _check(source, out_dir / source.name)
    return Run(elapsed, children.cpu, children.peak_kib)


def _check(source: Path, received: Path) -> None:
    """Same size and same bytes (compared in 16 MiB pieces, not timed)."""
    if received.stat().st_size != source.stat().st_size:
        raise RuntimeError(f"{received} has {received.stat().st_size} of {source.stat().st_size} bytes")
    with open(source, "rb") as a, open(received, "rb") as b:
        while piece := a.read(16 << 20):
            if piece != b.read(len(piece)):
                raise RuntimeError(f"{received} differs from {source}")
