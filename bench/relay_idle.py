"""How much memory an idle handshake peer costs the relay.

Starts ``python -m relay`` on loopback, opens N connections that each say Hello as a sender
and read their Server_identity, then reads the relay's resident memory (VmRSS in
/proc/PID/status) before and after and prints the cost per connection.

Only senders register: every receiver's Hello makes the relay announce every sender to it,
so a mix of roles would measure N^2/4 announcements rather than idle connections.

Usage: python bench/relay_idle.py [--connections 10000]
Linux only (reads /proc). Needs about N+50 file descriptors in this process and in the relay;
both raise their soft limit to the hard one.
"""

from __future__ import annotations

import argparse
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay import wire  # noqa: E402

PUBLIC = bytes.fromhex("00010002000000000000001000000002000400112233445566778899aabbccddeeff")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS line")


def start_relay() -> tuple[subprocess.Popen, int]:
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "0",
         "--secure-port", "0", "-q"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    line = relay.stdout.readline()
    if "listening on 127.0.0.1:" not in line:
        relay.kill()
        raise SystemExit(f"relay did not start: {line!r}")
    port = int(line.split("127.0.0.1:")[1].split()[0])
    return relay, port


def read_reply(sock: socket.socket) -> None:
    """Read one Server_identity (header, identity, NUL)."""
    parser = wire.Parser()
    while parser.next_frame() is None:
        data = sock.recv(256)
        if not data:
            raise RuntimeError("the relay closed a connection")
        parser.feed(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", "-n", type=int, default=10_000)
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.connections + 50:
        raise SystemExit(f"open-file hard limit {hard} is too low for {args.connections}")

    relay, port = start_relay()
    sockets: list[socket.socket] = []
    try:
        time.sleep(0.5)
        before = rss_kib(relay.pid)
        hello = wire.encode(0, wire.HelloServer(PUBLIC))
        started = time.perf_counter()
        for _ in range(args.connections):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(hello)
            sockets.append(sock)
        for sock in sockets:
            read_reply(sock)
        elapsed = time.perf_counter() - started
        time.sleep(1.0)  # let the relay settle (allocator, pending tasks)
        after = rss_kib(relay.pid)
        if relay.poll() is not None:
            raise SystemExit("the relay died during the run")
        per = (after - before) / args.connections
        print(f"idle registered senders : {args.connections}")
        print(f"registration time       : {elapsed:.2f} s "
              f"({args.connections / elapsed:.0f} Hellos/s)")
        print(f"relay RSS before        : {before} KiB")
        print(f"relay RSS after         : {after} KiB")
        print(f"cost per connection     : {per:.1f} KiB")
    finally:
        for sock in sockets:
            sock.close()
        relay.terminate()
        try:
            relay.wait(timeout=30)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
