"""SIGTERM with a room open: the room gets the whole ``--shutdown-grace`` (issue 15, item 5),
while peers still waiting on either port are told at once.

A real relay process and real peers, with a transfer rate-limited to last about ten seconds;
SIGTERM comes once bytes flow. The handshake connections' own 2 s shutdown deadline used to
cover the rooms too, so every room ended about 2 s after SIGTERM whatever the grace.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import attrs

from relay import wire

from processes import READY, child_env, finish, peer, ready_line

LIMIT = 60.0
"""Seconds any one step may take before it is a failure (the transfer itself needs ~10)."""
SIZE = 1 << 20
RATE = "100K"
"""1 MiB at 100 KiB/s: about ten seconds on the wire, far past the old 2 s cut."""
CODE = "417-cobalt-lemon-unicycle"


@attrs.frozen
class Relay:
    process: subprocess.Popen
    port: int
    secure_port: int
    log: Path

    def peer_args(self) -> list[str]:
        return ["--relay", f"127.0.0.1:{self.port}", "--secure-port", str(self.secure_port)]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(LIMIT)
        self.process.stdout.close()


def start_relay(tmp_path: Path, grace: str) -> Relay:
    log = tmp_path / "relay.log"
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "0",
             "--secure-port", "0", "--shutdown-grace", grace],
            stdout=subprocess.PIPE, stderr=err, env=child_env())
    match = ready_line(process, READY, LIMIT)
    return Relay(process, int(match[1]), int(match[2]), log)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + LIMIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def registered_client(port: int) -> tuple[socket.socket, wire.Parser]:
    """A handshake-port peer that said Hello and now just waits."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=LIMIT)
    sock.sendall(wire.encode(0, wire.HelloClient()))
    parser = wire.Parser()
    assert isinstance(next_frame(sock, parser).packet, wire.ClientIdentity)
    return sock, parser


def next_frame(sock: socket.socket, parser: wire.Parser) -> wire.Frame:
    while (frame := parser.next_frame()) is None:
        data = sock.recv(4096)
        assert data, "the relay closed the connection"
        parser.feed(data)
    return frame


def read_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(4096):
        data += chunk
    return bytes(data)


def transfer(tmp_path: Path, relay: Relay) -> tuple[subprocess.Popen, subprocess.Popen, bytes]:
    """Start a rate-limited send and its receiver; return about 2 s into the transfer."""
    data = os.urandom(SIZE)
    (tmp_path / "big.bin").write_bytes(data)
    sender = peer("send", *relay.peer_args(), "--limit-rate", RATE, "--no-compress",
                  "--password", CODE, "big.bin", cwd=tmp_path)
    receiver = peer("recv", *relay.peer_args(), "-y", "-o", f"{tmp_path / 'out'}/", CODE,
                    cwd=tmp_path)
    wait_for(lambda: "room open between" in relay.log.read_text() or receiver.poll() is not None,
             "no room opened")
    time.sleep(2)  # well into the transfer, and far from its end
    assert receiver.poll() is None, finish(receiver)[2]
    return sender, receiver, data


def sigterm_during_a_transfer(tmp_path: Path, grace: str):
    """SIGTERM with a room open and a waiting peer on each port; check those two are told
    while the room still runs. Returns the peers' (status, out, err) and the relay's log."""
    relay = start_relay(tmp_path, grace)
    sender = receiver = None
    try:
        sender, receiver, data = transfer(tmp_path, relay)
        hello, parser = registered_client(relay.port)
        unticketed = socket.create_connection(("127.0.0.1", relay.secure_port), timeout=LIMIT)
        time.sleep(0.2)  # let the relay take both in
        relay.process.send_signal(signal.SIGTERM)
        # Waiting peers hear it at once: the room is still running meanwhile.
        assert next_frame(hello, parser).packet == wire.Closed(0)
        assert read_to_eof(unticketed) == b"01"
        assert (sender.poll(), receiver.poll()) == (None, None), "the room ended too soon"
        for sock in (hello, unticketed):
            sock.close()
        sent, received = finish(sender, LIMIT), finish(receiver, LIMIT)
        assert relay.process.wait(LIMIT) == 0
        return sent, received, data, relay.log.read_text()
    finally:
        for process in (sender, receiver):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate()
        relay.stop()


def test_an_open_room_gets_the_whole_grace_and_the_transfer_completes(tmp_path):
    (s, _, s_err), (r, _, r_err), data, log = sigterm_during_a_transfer(tmp_path, "30")
    assert (s, r) == (0, 0), s_err + r_err
    assert (tmp_path / "out" / "big.bin").read_bytes() == data
    assert "shutting down: 1 open rooms get up to 30 s to finish" in log
    assert "room closed between" in log
    assert "ended by the shutdown" not in log
    assert log.rstrip().endswith("stopped")  # the relay exited when the room ended


def test_a_room_still_open_when_a_short_grace_ends_is_ended(tmp_path):
    (s, _, s_err), (r, _, r_err), _, log = sigterm_during_a_transfer(tmp_path, "3")
    assert s != 0 and r != 0, s_err + r_err
    assert "shutting down: 1 open rooms get up to 3 s to finish" in log
    assert "ended by the shutdown after" in log
    assert "room closed between" not in log
    assert not (tmp_path / "out" / "big.bin").exists()
    for err in (s_err, r_err):
        assert "Traceback" not in err
        assert err.strip(), "a peer failed without saying why"
