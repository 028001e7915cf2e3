#!/usr/bin/env python3
"""Handshakes per second through one relay, with many pairs at once.

    python bench/handshakes.py [--pairs 2000] [--concurrency 200] [--iterations 16]

The relay is a real ``python -m relay`` process with its limits lifted (all the pairs come
from loopback). The peers run in this process: the real handshake machines and meeting
driver, each pair a sender and a receiver with their own code and nameplate, up to
``--concurrency`` pairs at a time. A pair counts once both hold their open secure room
(Hello, the six forwarded handshake packets, Accepted, Done, and the room joined).

The peers stretch their codes with ``--iterations`` of PBKDF2 (bob's 16 by default, so the
peers' CPU does not hide the relay's; our senders use 4,096 in real use). Both the peers and
the relay share this machine's cores, so the printed rate is a floor; the relay's CPU per
handshake says what one relay core could sustain on its own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import INSTALLED, cpu_of, start_relay  # noqa: E402

if not INSTALLED:
    sys.path.insert(0, str(ROOT))


from peer import handshake  # noqa: E402
from peer.address import RelayAddress  # noqa: E402
from peer.meeting import meet  # noqa: E402


async def one_pair(address: RelayAddress, number: int, iterations: int, took: list[float]) -> None:
    code = f"{number % 65536}-bench-hand-shake".encode()
    registered = trio.Event()
    started = time.perf_counter()

    async def on_registered() -> None:
        registered.set()

    async def sender() -> None:
        machine = handshake.SenderHandshake(code, iterations=iterations)
        meeting = await meet(address, machine, notify=lambda _: None, on_registered=on_registered)
        await meeting.stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await registered.wait()
        meeting = await meet(address, handshake.ReceiverHandshake(code), notify=lambda _: None)
        took.append(time.perf_counter() - started)
        await meeting.stream.aclose()


async def run(address: RelayAddress, pairs: int, concurrency: int, iterations: int) -> list[float]:
    took: list[float] = []
    limiter = trio.Semaphore(concurrency)

    async def limited(number: int) -> None:
        async with limiter:
            await one_pair(address, number, iterations, took)

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for number in range(pairs):
                nursery.start_soon(limited, number)
    return took


def measure(pairs: int = 2000, concurrency: int = 200, iterations: int = 16,
            python: str = sys.executable) -> dict[str, float]:
    relay, (port, secure) = start_relay("--max-connections", "0", "--hello-rate", "0",
                                        "--max-rooms", "0", python=python)
    try:
        address = RelayAddress("127.0.0.1", port, secure)
        before = cpu_of(relay.pid)
        started = time.perf_counter()
        took = trio.run(run, address, pairs, concurrency, iterations)
        elapsed = time.perf_counter() - started
        relay_cpu = cpu_of(relay.pid) - before
    finally:
        relay.terminate()
        relay.wait(30)
    took.sort()
    return {"pairs": pairs, "concurrency": concurrency, "seconds": elapsed,
            "per_second": pairs / elapsed, "relay_cpu": relay_cpu,
            "relay_ms_per_handshake": relay_cpu / pairs * 1000,
            "p50": statistics.median(took), "p99": took[int(0.99 * (len(took) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=16)
    args = parser.parse_args()
    r = measure(args.pairs, args.concurrency, args.iterations)
    print(f"{r['pairs']} pairs, {r['concurrency']} at a time: {r['per_second']:.0f} handshakes/s "
          f"(p50 {r['p50'] * 1000:.0f} ms, p99 {r['p99'] * 1000:.0f} ms per pair); relay CPU "
          f"{r['relay_ms_per_handshake']:.2f} ms per handshake = "
          f"{1000 / r['relay_ms_per_handshake']:.0f} handshakes/s per relay core")


if __name__ == "__main__":
    main()
