"""Secure-room throughput: our relay's blind pipe against socat, side by side.

One process plays both peers. It pushes N GiB from a sender socket to a receiver socket
through (a) the secure room of a ``python -m relay`` subprocess (after a real handshake on
its handshake port, with dummy key material: the relay never looks inside), and (b) a
``socat TCP-LISTEN:... TCP:...`` forwarder between the same kind of endpoints. For each it
prints the throughput and the forwarder's CPU seconds per GiB (utime + stime of the
forwarder process from /proc/PID/stat, counted from the first byte to the last).

Usage: python bench/room_throughput.py [--gib 1] [--socat /usr/bin/socat]
Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import INSTALLED, cpu_of, start_relay  # noqa: E402

if not INSTALLED:
    sys.path.insert(0, str(ROOT))

from relay import wire  # noqa: E402

PUBLIC = bytes.fromhex("00010002000000000000001000000002000400112233445566778899aabbccddeeff")
CHUNK = 1 << 20
GIB = 1 << 30


class Packets:
    """A blocking handshake-port connection speaking relay.wire."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.parser = wire.Parser()
        self.identity = wire.identity_of(*self.sock.getsockname()[:2])

    def send(self, uid: int, packet) -> None:
        self.sock.sendall(wire.encode(uid, packet))

    def frame(self) -> wire.Frame:
        while (frame := self.parser.next_frame()) is None:
            data = self.sock.recv(4096)
            if not data:
                raise RuntimeError("the relay closed the handshake connection")
            self.parser.feed(data)
        return frame


def relay_room(port: int, secure_port: int) -> tuple[socket.socket, socket.socket]:
    """Handshake a sender and a receiver through the relay; return their room sockets."""
    server = Packets(port)
    server.send(0, wire.HelloServer(PUBLIC))
    server.frame()  # Server_identity
    client = Packets(port)
    client.send(0, wire.HelloClient())
    client.frame()  # Client_identity
    server_uid = client.frame().packet.server_uid  # New_server
    client.send(server_uid, wire.XAndClientIdentity(bytes(32), client.identity))
    client_uid = server.frame().uid
    server.send(client_uid, wire.YAndServerValidator(bytes(32), bytes(64)))
    client.frame()
    client.send(server_uid, wire.ClientValidator(bytes(64)))
    server.frame()
    server.send(client_uid, wire.Agreement())
    client.frame()
    client.send(server_uid, wire.Accepted())
    server.frame()  # Accepted
    client.frame()  # Done
    server.sock.close()
    client.sock.close()
    rooms = []
    for ticket in (client.identity, server.identity):  # each names its partner
        room = socket.create_connection(("127.0.0.1", secure_port), timeout=10)
        room.sendall(ticket + b"\n")
        rooms.append(room)
    for room in rooms:
        status = room.recv(2, socket.MSG_WAITALL)
        if status != b"00":
            raise RuntimeError(f"room refused: {status!r}")
    sender, receiver = rooms
    return sender, receiver


def push(sender: socket.socket, receiver: socket.socket, total: int) -> tuple[float, int]:
    """Send ``total`` bytes one way, read until EOF; return (seconds, bytes received)."""
    sender.settimeout(None)
    receiver.settimeout(None)
    payload = memoryview(os.urandom(CHUNK))
    received = 0
    buffer = bytearray(CHUNK)

    def send_all() -> None:
        left = total
        while left:
            n = min(left, CHUNK)
            sender.sendall(payload[:n])
            left -= n
        sender.shutdown(socket.SHUT_WR)

    started = time.perf_counter()
    writer = threading.Thread(target=send_all)
    writer.start()
    while True:
        n = receiver.recv_into(buffer)
        if not n:
            break
        received += n
    elapsed = time.perf_counter() - started
    writer.join()
    return elapsed, received


def run_relay(total: int) -> tuple[float, float, int]:
    relay, ports = start_relay()
    try:
        sender, receiver = relay_room(*ports)
        before = cpu_of(relay.pid)
        elapsed, received = push(sender, receiver, total)
        cpu = cpu_of(relay.pid) - before
        sender.close()
        receiver.close()
        return elapsed, cpu, received - 4  # the relay ends the room with ff ff ff ff
    finally:
        relay.terminate()
        relay.wait(timeout=30)


def run_socat(socat: str, total: int) -> tuple[float, float, int]:
    sink = socket.create_server(("127.0.0.1", 0))
    sink_port = sink.getsockname()[1]
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    forwarder = subprocess.Popen(
        [socat, f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr", f"TCP:127.0.0.1:{sink_port}"])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                sender = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        receiver, _ = sink.accept()
        before = cpu_of(forwarder.pid)
        elapsed, received = push(sender, receiver, total)
        cpu = cpu_of(forwarder.pid) - before
        sender.close()
        receiver.close()
        return elapsed, cpu, received
    finally:
        sink.close()
        forwarder.terminate()
        forwarder.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="GiB to push (default: 1)")
    parser.add_argument("--socat", default=shutil.which("socat") or "/usr/bin/socat")
    args = parser.parse_args()
    total = int(args.gib * GIB)
    results = {}
    results["peer-relay room"] = run_relay(total)
    results["socat"] = run_socat(args.socat, total)
    print(f"{args.gib:g} GiB one way, loopback, {os.cpu_count()} CPUs")
    print(f"{'forwarder':<18}{'MiB/s':>10}{'CPU s/GiB':>12}")
    for name, (elapsed, cpu, received) in results.items():
        if received != total:
            print(f"{name}: only {received} of {total} bytes arrived")
            return 1
        print(f"{name:<18}{total / elapsed / (1 << 20):>10.0f}{cpu / (total / GIB):>12.3f}")
    ours, theirs = results["peer-relay room"], results["socat"]
    speed = theirs[0] / ours[0]
    cpu_ratio = ours[1] / theirs[1] if theirs[1] else float("inf")
    print(f"{'relay / socat':<18}{speed:>10.2f}{cpu_ratio:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
