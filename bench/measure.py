"""What the benchmark scripts share: a child environment, starting a relay, CPU seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK = os.sysconf("SC_CLK_TCK")


INSTALLED = os.environ.get("PEER_BENCH_INSTALLED") == "1"
"""Set by bench/run: measure the peer-relay installed in the running interpreter (with its
compiled bytecode, as a user has it), not this source tree."""


def env(**extra: str) -> dict[str, str]:
    """Our packages importable, and no relay or code leaking in from the caller's shell."""
    e = {k: v for k, v in os.environ.items() if k not in ("PEER_RELAY", "PEER_PASSWORD")}
    if not INSTALLED:
        e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(extra)
    return e


def child_cwd() -> Path | None:
    """Where to start ``python -m relay`` / ``python -m peer``: ``-m`` looks in the working
    directory first, so this tree's root when measuring it, anywhere else otherwise."""
    return None if INSTALLED else ROOT


def relay_command(*options: str, python: str = sys.executable) -> list[str]:
    """``python -m relay`` on loopback, every port picked by the system, quiet."""
    return [python, "-m", "relay", "--host", "127.0.0.1", "--port", "0", "--secure-port", "0",
            "-q", *options]


def relay_ports(relay: subprocess.Popen) -> list[int]:
    """The ports a relay started with ``relay_command`` (stdout piped, text) says it listens
    on: handshake, secure room, then WebSocket if it has one. Kills it if it did not start."""
    line = relay.stdout.readline()
    ports = [int(part.split()[0].rstrip(",")) for part in line.split("127.0.0.1:")[1:]]
    if len(ports) < 2:
        relay.kill()
        raise RuntimeError(f"the relay did not start: {line!r}")
    return ports


def start_relay(*options: str, python: str = sys.executable) -> tuple[subprocess.Popen, list[int]]:
    """A relay process for a benchmark, and its ports (see relay_ports)."""
    relay = subprocess.Popen(relay_command(*options, python=python), cwd=child_cwd(), env=env(),
                             stdout=subprocess.PIPE, text=True)
    return relay, relay_ports(relay)


def cpu_of(pid: int) -> float:
    """User+system CPU seconds a running process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def wait_cpu(process: subprocess.Popen, timeout: float = 900) -> float:
    """Wait for a child and return its user+system CPU seconds (from wait4)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("benchmark process did not finish")
        time.sleep(0.01)
