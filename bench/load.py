#!/usr/bin/env python3
"""Many concurrent transfers of mixed sizes through one relay process, every file verified.

    python bench/load.py [--pairs 200] [--workers 2] [--seed 1] [--processes]

The relay is a real ``python -m relay`` process (as deployed). The peers are, by default,
in-process peers spread over ``--workers`` processes (each runs its share of the pairs at once
in one trio loop): the real handshake machines, meeting driver, channel, data phase and disk
sides, without the command line, so 400 peers fit on a small machine. ``--processes`` runs
every peer as its own ``python -m peer`` process instead (two per pair: about 40 MB each).

All pairs start together; each receiver starts once its sender is registered. Sizes are
mixed (seeded): a third tiny (0-4 KiB), about 40% 32 KiB-1 MiB, a quarter 1-8 MiB and a few
16-32 MiB. Files live on /dev/shm when there is one, so the disk is not what is measured.

Printed: pairs verified and failed, bytes, handshake time p50/p99 (in-process peers: from a
receiver's first byte to the relay until both sides hold the open room), per-pair total time
p50/p99, aggregate throughput (all bytes / wall time from the first start to the last
verification), and the relay's CPU seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
READY = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(handshake\) and 127\.0\.0\.1:(\d+)")
CLK = os.sysconf("SC_CLK_TCK")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PEER_RELAY", "PEER_PASSWORD")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def size_for(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.33:
        return rng.randrange(0, 4097)
    if roll < 0.73:
        return rng.randrange(32 << 10, 1 << 20)
    if roll < 0.97:
        return rng.randrange(1 << 20, 8 << 20)
    return rng.randrange(16 << 20, 32 << 20)


def make_sources(work: Path, pairs: int, seed: int) -> list[Path]:
    rng = random.Random(seed)
    sources = []
    for i in range(pairs):
        folder = work / f"src{i}"
        folder.mkdir()
        path = folder / f"file{i}.bin"
        with open(path, "wb") as out:
            left = size_for(rng)
            while left:
                chunk = min(left, 1 << 20)
                out.write(rng.randbytes(chunk))
                left -= chunk
        sources.append(path)
    return sources


def relay_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, resident bytes) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return (int(fields[11]) + int(fields[12])) / CLK, rss


class PeakMemory(threading.Thread):
    """Samples the relay's RSS every 20 ms while the load runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def run(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, relay_stats(self.pid)[1])
            except OSError:
                return
            time.sleep(0.02)


# --- in-process peers, in worker processes -----------------------------------------------


def worker(port: int, secure_port: int, jobs: list[tuple[int, str, str]]) -> list[dict]:
    """Run these pairs at once in one trio loop; return one result dict per pair."""
    import trio

    from inprocess import run_pair
    from peer.address import RelayAddress

    address = RelayAddress("127.0.0.1", port, secure_port)
    results: list[dict] = []

    async def one(index: int, source: str, out: str) -> None:
        started = time.perf_counter()
        result = await run_pair(address, f"{index + 1}-load-bench-pair", Path(source), Path(out),
                                timeout=600, room_timeout=120)
        results.append({"index": index, "size": result.size, "error": result.error,
                        "handshake": result.handshake_seconds,
                        "total": time.perf_counter() - started})

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for index, source, out in jobs:
                nursery.start_soon(one, index, source, out)

    trio.run(main)
    return results


def run_in_process(port: int, secure: int, sources: list[Path], work: Path, workers: int) -> list[dict]:
    jobs = [(i, str(src), str(work / f"out{i}")) for i, src in enumerate(sources)]
    shares = [jobs[w::workers] for w in range(workers)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(worker, port, secure, share) for share in shares if share]
        return [row for future in futures for row in future.result()]


# --- every peer a process ------------------------------------------------------------------


def run_processes(port: int, secure: int, sources: list[Path], work: Path) -> list[dict]:
    common = ["--relay", f"127.0.0.1:{port}", "--secure-port", str(secure), "-q"]
    running = []
    for i, source in enumerate(sources):
        code = f"{i + 1}-load-bench-pair"
        out = work / f"out{i}"
        started = time.perf_counter()
        sender = subprocess.Popen([sys.executable, "-m", "peer", "send", *common, "--password", code,
                                   str(source)], env=child_env(), stderr=subprocess.PIPE)
        receiver = subprocess.Popen([sys.executable, "-m", "peer", "recv", *common, "-y", "-o",
                                     str(out), code], env=child_env(), stderr=subprocess.PIPE)
        running.append((i, source, out, started, sender, receiver))
    finished: dict[int, float] = {}
    deadline = time.monotonic() + 900
    while len(finished) < len(running) and time.monotonic() < deadline:
        for i, _, _, _, sender, receiver in running:
            if i not in finished and sender.poll() is not None and receiver.poll() is not None:
                finished[i] = time.perf_counter()
        time.sleep(0.05)
    results = []
    for i, source, out, started, sender, receiver in running:
        errors = []
        for name, process in (("sender", sender), ("receiver", receiver)):
            if process.poll() is None:
                process.kill()
                errors.append(f"{name} did not finish")
            _, err = process.communicate()
            if process.returncode:
                errors.append(f"{name} exited {process.returncode}: {err.decode(errors='replace').strip()}")
        received = out / source.name
        if not errors and (not received.exists() or received.read_bytes() != source.read_bytes()):
            errors.append("the received file differs from the source")
        results.append({"index": i, "size": source.stat().st_size, "error": "; ".join(errors) or None,
                        "handshake": None, "total": finished.get(i, time.perf_counter()) - started})
    return results


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=200, help="concurrent transfers (default 200)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for the in-process peers (default: one per core)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the sizes and contents")
    parser.add_argument("--processes", action="store_true", help="every peer as its own process")
    args = parser.parse_args()

    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="peer-load-", dir=base))
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "0", "--secure-port", "0",
         "-q", "--room-timeout", "300"],
        stdout=subprocess.PIPE, text=True, env=child_env(),
    )
    try:
        match = READY.search(relay.stdout.readline())
        if not match:
            sys.exit("the relay did not start")
        port, secure = int(match[1]), int(match[2])
        sources = make_sources(work, args.pairs, args.seed)
        total = sum(s.stat().st_size for s in sources)
        cpu_before, rss_before = relay_stats(relay.pid)
        memory = PeakMemory(relay.pid)
        memory.start()
        started = time.perf_counter()
        if args.processes:
            results = run_processes(port, secure, sources, work)
        else:
            results = run_in_process(port, secure, sources, work, args.workers)
        elapsed = time.perf_counter() - started
        memory.running = False
        cpu_after, _ = relay_stats(relay.pid)
    finally:
        relay.terminate()
        relay.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    failed = [r for r in results if r["error"]]
    verified = len(results) - len(failed)
    mode = "peer processes" if args.processes else f"in-process peers in {args.workers} workers"
    print(f"{args.pairs} concurrent transfers ({mode}), {total / 2**20:.1f} MiB, seed {args.seed}, "
          f"{os.cpu_count()} cores, files on {base}")
    print(f"verified {verified}, failed {len(failed)}")
    for row in failed[:10]:
        print(f"  pair {row['index']}: {row['error']}")
    handshakes = [r["handshake"] for r in results if r["handshake"] is not None]
    if handshakes:
        print(f"handshake p50 {statistics.median(handshakes) * 1000:.0f} ms, "
              f"p99 {percentile(handshakes, 0.99) * 1000:.0f} ms")
    totals = [r["total"] for r in results]
    print(f"per pair, start to verified: p50 {statistics.median(totals):.2f} s, "
          f"p99 {percentile(totals, 0.99):.2f} s")
    print(f"wall {elapsed:.2f} s, aggregate {total / 2**20 / elapsed:.1f} MiB/s")
    print(f"relay: {cpu_after - cpu_before:.2f} CPU s, RSS {rss_before >> 20} MiB -> peak "
          f"{memory.peak >> 20} MiB")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
