"""How much memory an idle handshake peer costs the relay.

Starts ``python -m relay`` on loopback, opens N connections that each say Hello as a sender
and read their Server_identity, then reads the relay's resident memory (VmRSS in
/proc/PID/status) before and after and prints the cost per connection.

Only senders register: every receiver's Hello makes the relay announce every sender to it,
so a mix of roles would measure N^2/4 announcements rather than idle connections.

Usage: python bench/relay_idle.py [--connections 10000 30000]
Linux only (reads /proc). Needs about N+50 file descriptors in this process and in the relay:
the soft limit is raised to the hard one, and the hard one too when that is allowed (root
with CAP_SYS_RESOURCE); otherwise as many connections are held as the limit allows. Loopback
offers about 28,000 ephemeral ports per source address, so connections come from 127.0.0.2,
127.0.0.3, ... in blocks of 20,000. The relay runs with no connection or Hello-rate limit.
"""

from __future__ import annotations

import argparse
import resource
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import INSTALLED, start_relay  # noqa: E402

if not INSTALLED:
    sys.path.insert(0, str(ROOT))

from relay import wire  # noqa: E402

PUBLIC = bytes.fromhex("00010002000000000000001000000002000400112233445566778899aabbccddeeff")
PER_SOURCE = 20_000
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux

def open_idle(port: int, n: int, *, per_source: int = PER_SOURCE, timeout: float = 30.0) -> socket.socket:
    """Connection ``n`` of many to the relay on loopback, from 127.0.0.(2 + n // per_source).

    The port is picked at connect time, per destination (a bind-time pick must avoid every
    port in use and slows down as they fill up), and the socket closes with a reset, so
    that no TIME_WAIT is left to crowd the next run."""
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.bind((f"127.0.0.{2 + n // per_source}", 0))
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock
SPARE_FILES = 200
"""Descriptors kept for everything else (listeners, logs, pipes) in the relay and here."""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS line")


def raise_file_limit(needed: int) -> int:
    """Raise our open-file limit (inherited by the relay) toward ``needed``; return what we
    got. Raising the hard limit takes CAP_SYS_RESOURCE, which some containers withhold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
        except (ValueError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def read_reply(sock: socket.socket) -> None:
    """Read one Server_identity (header, identity, NUL)."""
    parser = wire.Parser()
    while parser.next_frame() is None:
        data = sock.recv(256)
        if not data:
            raise RuntimeError("the relay closed a connection")
        parser.feed(data)


def measure(connections: int, python: str = sys.executable) -> dict[str, float]:
    """Hold ``connections`` registered senders; the relay's RSS growth per connection.

    When the open-file limit cannot be raised that far, as many as it allows are held and
    "limited_by" says so.
    """
    wanted = connections
    limit = raise_file_limit(connections + SPARE_FILES)
    connections = min(connections, limit - SPARE_FILES)
    relay, (port, _) = start_relay("--max-connections", "0", "--hello-rate", "0", python=python)
    sockets: list[socket.socket] = []
    try:
        time.sleep(0.5)
        before = rss_kib(relay.pid)
        hello = wire.encode(0, wire.HelloServer(PUBLIC))
        started = time.perf_counter()
        for n in range(connections):
            sock = open_idle(port, n)
            sock.sendall(hello)
            sockets.append(sock)
        for sock in sockets:
            read_reply(sock)
        elapsed = time.perf_counter() - started
        time.sleep(1.0)  # let the relay settle (allocator, pending tasks)
        after = rss_kib(relay.pid)
        if relay.poll() is not None:
            raise SystemExit("the relay died during the run")
        return {"wanted": wanted, "connections": connections,
                "limited_by": "" if connections == wanted else f"open-file hard limit {limit}",
                "seconds": elapsed, "rss_before_kib": before,
                "rss_after_kib": after, "kib_per_connection": (after - before) / connections}
    finally:
        for sock in sockets:
            sock.close()
        relay.terminate()
        try:
            relay.wait(timeout=30)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", "-n", type=int, nargs="+", default=[10_000])
    args = parser.parse_args()
    for count in args.connections:
        result = measure(count)
        if result["limited_by"]:
            print(f"{count} connections asked, {result['connections']} held: "
                  f"{result['limited_by']} (raising it needs root with CAP_SYS_RESOURCE)")
        count = result["connections"]
        print(f"{count} idle registered senders: registered in {result['seconds']:.2f} s "
              f"({count / result['seconds']:.0f} Hellos/s); relay RSS "
              f"{result['rss_before_kib']} -> {result['rss_after_kib']} KiB, "
              f"{result['kib_per_connection']:.1f} KiB per connection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
