"""Real processes for end-to-end tests: a peer-relay on loopback, and peers around it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import attrs
import trio

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(rb"listening on 127\.0\.0\.1:(\d+) \(handshake\) and 127\.0\.0\.1:(\d+) \(secure room\)")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: our packages importable, no stray relay/code."""
    env = {k: v for k, v in os.environ.items() if k not in ("PEER_RELAY", "PEER_PASSWORD")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@attrs.frozen
class RelayProcess:
    process: subprocess.Popen
    port: int
    secure_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def peer_args(self) -> list[str]:
        return ["--relay", self.address, "--secure-port", str(self.secure_port)]


def start_relay(*extra: str, timeout: float = 20.0) -> RelayProcess:
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "0", "--secure-port", "0", "-q", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=child_env(),
    )
    match = ready_line(process, READY, timeout)
    return RelayProcess(process, int(match[1]), int(match[2]))


def ready_line(process: subprocess.Popen, ready: re.Pattern, timeout: float) -> re.Match:
    """The relay's first line, matched by ``ready``; the relay is killed if it is not that
    within ``timeout`` (the ready line comes within a second)."""
    try:
        timer = threading.Timer(timeout, process.kill)  # bounds the readline below
        timer.start()
        try:
            line = process.stdout.readline()
        finally:
            timer.cancel()
        match = ready.search(line)
        if not match:
            raise RuntimeError(f"relay did not start: {line!r}")
    except BaseException:
        process.kill()
        process.wait(5)
        process.stdout.close()
        raise
    return match


async def first_line(process: trio.Process) -> bytes:
    """A trio child's first line of standard output (the caller bounds the time)."""
    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = await process.stdout.receive_some(1)
        assert chunk, "the process exited before saying it was ready"
        line += chunk
    return bytes(line)


def stop_relay(relay: RelayProcess) -> int:
    relay.process.send_signal(signal.SIGTERM)
    try:
        return relay.process.wait(10)
    except subprocess.TimeoutExpired:
        relay.process.kill()
        relay.process.wait(5)
        raise
    finally:
        relay.process.stdout.close()


def stop_quietly(process: subprocess.Popen, how: int = signal.SIGTERM) -> None:
    """Signal a relay (or nginx: SIGQUIT) if it still runs, SIGKILL it after 10 s; close its
    pipes. For teardowns, where how it ended is not the test's question (``stop_relay`` is)."""
    if process.poll() is None:
        process.send_signal(how)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def peer(*args: str, cwd: Path, stdin=subprocess.DEVNULL, **env: str) -> subprocess.Popen:
    """Start ``peer ARGS`` in the background (stop it with finish())."""
    return subprocess.Popen(
        [sys.executable, "-m", "peer", *args],
        cwd=cwd,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(**env),
    )


def finish(process: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str, str]:
    """Wait for a peer process (killing it past the timeout) and return (status, out, err)."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"peer did not finish in {timeout} s: {err.decode(errors='replace')}")
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")
