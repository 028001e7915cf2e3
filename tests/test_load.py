"""Load: many concurrent transfers of mixed sizes through one relay, every file verified.

The CI version runs 40 pairs of in-process peers (real handshake machines, meeting driver,
channel, data phase and disk sides; no command line) through an in-process relay, all at
once, and prints p50/p99 handshake time and aggregate throughput. ``bench/load.py`` does 200
concurrent transfers against a relay process (docs/reliability.md).
"""

from __future__ import annotations

import os
import random
import statistics
import time

import trio

from inprocess import relay_config, run_pair, running_relay

PAIRS = int(os.environ.get("PEER_RELAY_LOAD_PAIRS", "40"))
SIZES = [0, 1, 100, 32_765, 32_766, 32_767, 65_532, 100_000, 1 << 20, 3 << 20 | 12345]
"""Around the record boundaries (32766 file bytes per DATA record), and some bulk."""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def test_many_concurrent_transfers_of_mixed_sizes(tmp_path):
    rng = random.Random(PAIRS)
    sources = []
    for i in range(PAIRS):
        folder = tmp_path / f"src{i}"
        folder.mkdir()
        if i % 8 == 7:  # some directories too: several files, one empty, one nested
            tree = folder / f"tree{i}"
            (tree / "inner").mkdir(parents=True)
            (tree / "a.bin").write_bytes(rng.randbytes(rng.choice(SIZES)))
            (tree / "inner" / "b.bin").write_bytes(rng.randbytes(rng.choice(SIZES[:6])))
            (tree / "empty.txt").write_bytes(b"")
            sources.append(tree)
        else:
            path = folder / f"file{i}.bin"
            path.write_bytes(rng.randbytes(SIZES[i % len(SIZES)]))
            sources.append(path)
    results = []
    started = time.perf_counter()
    with trio.fail_after(120):
        async with running_relay(relay_config(room_timeout=30.0)) as address:
            async def one(i: int) -> None:
                results.append(await run_pair(address, f"{100 + i}-load-test-pair", sources[i],
                                              tmp_path / f"out{i}", timeout=100))

            async with trio.open_nursery() as nursery:
                for i in range(PAIRS):
                    nursery.start_soon(one, i)
    elapsed = time.perf_counter() - started
    failures = [r.error for r in results if not r.ok]
    assert not failures, failures[:5]
    assert len(results) == PAIRS
    handshakes = [r.handshake_seconds for r in results]
    total = sum(r.size for r in results)
    print(f"\nload: {PAIRS} concurrent pairs, {total / 2**20:.1f} MiB, all verified; handshake "
          f"p50 {statistics.median(handshakes) * 1000:.0f} ms, p99 "
          f"{percentile(handshakes, 0.99) * 1000:.0f} ms; {elapsed:.2f} s wall, aggregate "
          f"{total / 2**20 / elapsed:.1f} MiB/s (peers and relay in one process)")
