#!/usr/bin/env python3
"""End-to-end transfer through our relay, side by side with a plain copy through socat.

    python bench/transfer.py [--size MiB] [--runs N]

Each run, in one go on this machine:
  plain  a Python sender → socat forwarder → a Python sink: no crypto, no disk, the ceiling;
  ours   peer send FILE → peer-relay → peer recv -o DIR, with the file and the output on a
         tmpfs (/dev/shm) when there is one, so the disk is not what is measured.
It prints MiB/s and CPU seconds per GiB of every process, medians over the runs, and our
throughput as a share of the plain copy. The machine is shared and noisy: compare the ratio
within one run of this script, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import contenders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="MiB to move (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (default 3)")
    args = parser.parse_args()
    if not shutil.which("socat"):
        sys.exit("socat is needed for the reference copy: apt-get install socat")
    size = args.size * 1024 * 1024
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="peer-bench-", dir=base))
    try:
        source = work / "payload.bin"
        with open(source, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(1024 * 1024))
        results: dict[str, list[contenders.Run]] = {"socat": [], "ours": []}
        for run in range(args.runs):
            results["socat"].append(contenders.socat_copy(size))
            results["ours"].append(contenders.ours(source, work / "out", "tcp"))
            print(f"run {run + 1}/{args.runs}: plain {size / results['socat'][-1].seconds / 2**20:.0f} MiB/s, "
                  f"ours {size / results['ours'][-1].seconds / 2**20:.0f} MiB/s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gib = size / 2**30
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{args.size} MiB, {args.runs} runs, files on {base}")
    print(f"{'':8} {'MiB/s':>8} {'sender':>10} {'relay':>10} {'receiver':>10}   (CPU s per GiB, medians)")
    medians = {}
    for name, rows in results.items():
        medians[name] = statistics.median(size / r.seconds / 2**20 for r in rows)
        cpu = {k: statistics.median(r.cpu.get(k, 0.0) for r in rows) / gib for k in ("sender", "relay", "receiver")}
        print(f"{name:8} {medians[name]:8.0f} {cpu['sender']:10.2f} {cpu['relay']:10.2f} {cpu['receiver']:10.2f}")
    print(f"ours / plain copy through socat: {medians['ours'] / medians['socat']:.0%}")


if __name__ == "__main__":
    main()
