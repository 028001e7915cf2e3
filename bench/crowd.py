"""What an arriving receiver costs the relay as the crowd of waiting senders grows (issue 13).

Starts ``python -m relay`` on loopback and registers idle senders: 2 on each of the 100
nameplates the receivers will name (what a scoped arrival must cost: O(its own senders)),
and the crowd, C more spread over 1,000 other nameplates (at most 15 share one at
C = 15,000, under the default cap of 64). Then:
- scoped: N receivers arrive one after another, each says Hello_as_a_scoped_client (10) for
  one of the 100, reads its Client_identity and its 2 announcements, and leaves;
- plain (at one crowd size): receivers say Hello_as_a_client (01) and read every
  announcement as they come (the relay paces them by the socket), then leave.
The relay's CPU (user+system, /proc/PID/stat) is read before and after each series, with a
pause to let it settle, and divided by the arrivals (scoped) or the announcements (plain).
The plain figure is given for the arrival and reading alone, and with the departure too (a
departure tells the senders the receiver spoke to with Closed: none here).

Targets (issue 13): the largest crowd's CPU per scoped arrival at most 2x the empty
relay's; at most 20 us of relay CPU per announcement to a plain receiver, all delivered.

Usage: python bench/crowd.py [--crowds 0 1000 5000 15000] [--arrivals 1000] [--plain-at 5000]
Linux only (reads /proc). Needs about max(crowds)+200 open files here and in the relay.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import INSTALLED, cpu_of, start_relay  # noqa: E402
from relay_idle import open_idle, raise_file_limit  # noqa: E402

if not INSTALLED:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay import wire  # noqa: E402

NAMEPLATES = 1000
"""Nameplates of the crowd, 100 to 1099."""
OWN = 100
"""Nameplates the receivers name, 0 to 99, each with OWN_SENDERS senders at every C."""
OWN_SENDERS = 2
PER_SOURCE = 10_000
SETTLE = 0.5
"""Seconds the relay gets to finish what it was doing before its CPU is read."""


def public_for(nameplate: int, n: int) -> bytes:
    return n.to_bytes(4, "big") + bytes(14) + nameplate.to_bytes(2, "big") + bytes(14)


def connect(port: int, n: int) -> socket.socket:
    return open_idle(port, n, per_source=PER_SOURCE, timeout=60)


def frames(sock: socket.socket, parser: wire.Parser, count: int, size: int = 65536) -> list:
    """The next ``count`` frames from ``sock``."""
    got = []
    while len(got) < count:
        frame = parser.next_frame()
        if frame is not None:
            got.append(frame)
            continue
        data = sock.recv(size)
        if not data:
            raise RuntimeError(f"the relay closed a receiver after {len(got)} of {count} frames")
        parser.feed(data)
    return got


def settled_cpu(pid: int) -> float:
    time.sleep(SETTLE)
    return cpu_of(pid)


def run(crowd: int, arrivals: int, plain_arrivals: int) -> dict[str, float]:
    relay, (port, _) = start_relay("--max-connections", "0", "--hello-rate", "0")
    senders: list[socket.socket] = []
    try:
        everyone = OWN * OWN_SENDERS + crowd
        for n in range(everyone):
            sock = connect(port, n)
            nameplate = n % OWN if n < OWN * OWN_SENDERS else OWN + n % NAMEPLATES
            sock.sendall(wire.encode(0, wire.HelloServer(public_for(nameplate, n))))
            senders.append(sock)
        for sock in senders:
            frames(sock, wire.Parser(), 1, 256)

        before = settled_cpu(relay.pid)
        for k in range(arrivals):
            sock = connect(port, everyone + k % 100)
            sock.sendall(wire.encode(0, wire.HelloScopedClient(k % OWN)))
            got = frames(sock, wire.Parser(), 1 + OWN_SENDERS)
            assert all(isinstance(f.packet, wire.NewServer) for f in got[1:])
            sock.close()
        scoped = (settled_cpu(relay.pid) - before) / arrivals

        result = {"crowd": crowd, "scoped_us": scoped * 1e6}
        if plain_arrivals:
            reading = leaving = 0.0
            for k in range(plain_arrivals):
                before = settled_cpu(relay.pid)
                sock = connect(port, everyone + 200 + k)
                sock.sendall(wire.encode(0, wire.HelloClient()))
                got = frames(sock, wire.Parser(), 1 + everyone, 4096)  # reads as it comes
                assert len({f.packet.server_uid for f in got[1:]}) == everyone
                read = settled_cpu(relay.pid)
                sock.close()
                reading += read - before
                leaving += settled_cpu(relay.pid) - read
            announcements = plain_arrivals * everyone
            result["everyone"] = everyone
            result["plain_us"] = reading / announcements * 1e6
            result["plain_with_departure_us"] = (reading + leaving) / announcements * 1e6
        if relay.poll() is not None:
            raise SystemExit("the relay died during the run")
        return result
    finally:
        for sock in senders:
            sock.close()
        relay.terminate()
        relay.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crowds", type=int, nargs="+", default=[0, 1000, 5000, 15000])
    parser.add_argument("--arrivals", type=int, default=1000,
                        help="scoped receivers arriving at each crowd size (default: 1000)")
    parser.add_argument("--plain-at", type=int, default=5000,
                        help="crowd size for the plain receivers (default: 5000)")
    parser.add_argument("--plain-arrivals", type=int, default=5)
    args = parser.parse_args()
    need = max(args.crowds) + OWN * OWN_SENDERS + 400
    limit = raise_file_limit(need)
    if limit < need:
        raise SystemExit(f"needs {need} open files, the limit is {limit}")
    results = [run(crowd, args.arrivals, args.plain_arrivals if crowd == args.plain_at else 0)
               for crowd in args.crowds]
    empty = results[0]["scoped_us"]
    print(f"{OWN_SENDERS} senders wait with each receiver's nameplate; the crowd waits with others")
    print(f"{'crowd':>16} {'relay CPU per scoped arrival':>30} {'vs first':>9}")
    for result in results:
        # Too few arrivals can fall inside one CPU clock tick (10 ms): no ratio then.
        ratio = f"{result['scoped_us'] / empty:>8.2f}x" if empty else f"{'n/a':>9}"
        print(f"{result['crowd']:>16,} {result['scoped_us']:>27.0f} us {ratio}")
    for result in results:
        if "plain_us" in result:
            print(f"plain receiver at {result['everyone']:,} waiting senders: "
                  f"{result['plain_us']:.1f} us of relay CPU per announcement "
                  f"({result['plain_with_departure_us']:.1f} us with its departure), "
                  f"all {result['everyone']:,} delivered to each of {args.plain_arrivals}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
