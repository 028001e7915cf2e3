#!/usr/bin/env python3
"""How much look-alike senders slow down an honest receiver.

    python bench/impostors.py [--impostors 10] [--runs 3]

Anyone on a relay sees every sender's nameplate (it is in the salt of the public that 04
announces to all receivers), so anyone can register senders with the same nameplate, another
code and the largest PBKDF2 iteration count a receiver accepts (spoke.MAX_ITERATIONS). An
honest receiver must try each of them. This script runs a real relay, a real ``peer send``
and ``peer recv`` of a small file, with 0 and then N such impostors registered before the
receiver starts (raw sockets that say Hello and never answer), and prints the receiver's
wall time, median of the runs.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from processes import finish, peer, start_relay, stop_relay  # noqa: E402

from peer import handshake, spoke  # noqa: E402
from relay import wire  # noqa: E402

NAMEPLATE = 731
CODE = f"{NAMEPLATE}-cobalt-lemon-unicycle"


def impostor(port: int) -> socket.socket:
    _, public = spoke.generate(b"%d-some-other-code" % NAMEPLATE, salt=handshake.salt_for(NAMEPLATE),
                               iterations=spoke.MAX_ITERATIONS)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(wire.encode(0, wire.HelloServer(public.encode())))
    sock.recv(64)  # its 02: registered
    return sock


def one_run(work: Path, impostors: int) -> float:
    relay = start_relay()
    held: list[socket.socket] = []
    try:
        sender = peer("send", *relay.peer_args(), "-q", "--password", CODE, "f.bin", cwd=work)
        time.sleep(1.0)  # the sender stretches its code and registers
        held = [impostor(relay.port) for _ in range(impostors)]
        out = work / f"out-{impostors}-{time.monotonic_ns()}"
        started = time.perf_counter()
        receiver = peer("recv", *relay.peer_args(), "-q", "-y", "-o", f"{out}/", CODE, cwd=work)
        status, _, err = finish(receiver, 120)
        elapsed = time.perf_counter() - started
        s_status, _, s_err = finish(sender, 30)
        if (status, s_status) != (0, 0):
            raise SystemExit(f"transfer failed: {err.strip()} {s_err.strip()}")
        if (out / "f.bin").read_bytes() != (work / "f.bin").read_bytes():
            raise SystemExit("received file differs")
        return elapsed
    finally:
        for sock in held:
            sock.close()
        stop_relay(relay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impostors", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "f.bin").write_bytes(os.urandom(64 << 10))
        times = {n: [] for n in (0, args.impostors)}
        for _ in range(args.runs):
            for n in times:  # interleaved, so both see the same machine load
                times[n].append(one_run(work, n))
    base = statistics.median(times[0])
    for n, values in times.items():
        median = statistics.median(values)
        print(f"{n:3d} impostors ({spoke.MAX_ITERATIONS} iterations each): receiver "
              f"{median:.2f} s (median of {len(values)}; {median / base:.2f}x without)")


if __name__ == "__main__":
    main()
