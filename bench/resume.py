#!/usr/bin/env python3
"""Resume after an interruption at 90%, through a real relay.

    python bench/resume.py [--size MiB] [--at 0.9]

Sends a random file, SIGKILLs the sender once the receiver's journal holds `--at` of it,
then starts both peers again and reports: how long the resumed run took from `peer recv`
starting, how long until the receiver's partial file grew again (the first new byte, which
shows that neither side re-read the done part), the bytes on the wire, and the same for a
full transfer for comparison. Files live on a tmpfs (/dev/shm) when there is one.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from peer.transfer import RESUME_CHUNK  # noqa: E402

READY = re.compile(rb"listening on 127\.0\.0\.1:(\d+) \(handshake\) and 127\.0\.0\.1:(\d+) \(secure room\)")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def peer(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "peer", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def chunks_done(out: Path) -> int:
    journals = list(out.glob("*.peer-journal")) if out.exists() else []
    if not journals:
        return 0
    return journals[0].read_bytes().count(b"\nchunk ")


def part_size(out: Path) -> int:
    parts = list(out.glob("*.peer-part")) if out.exists() else []
    try:
        return parts[0].stat().st_size if parts else 0
    except OSError:
        return 0


def run(relay_args, work: Path, out: Path, code: str, *, watch_from: int | None = None):
    sender = peer(["send", *relay_args, "--password", code, "--no-compress", "data.bin"], work)
    time.sleep(0.5)
    started = time.perf_counter()
    receiver = peer(["recv", *relay_args, "-y", "-q", "-o", f"{out}/", code], work)
    first_byte = None
    truncated = False  # the part is first cut back to its verified chunks, then grows
    while receiver.poll() is None:
        if watch_from is not None and first_byte is None:
            size = part_size(out)
            if size and size <= watch_from:
                truncated = True
            elif truncated and size > watch_from:
                first_byte = time.perf_counter() - started
        time.sleep(0.001)
    elapsed = time.perf_counter() - started
    _, err = sender.communicate(timeout=60)
    if receiver.returncode or sender.returncode:
        raise SystemExit(f"transfer failed: {err.decode()}")
    wire = re.search(r", ([\d.]+) (B|KiB|MiB|GiB) on the wire", err.decode())
    return elapsed, first_byte, wire.group(0)[2:] if wire else "everything"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB (default 1024)")
    parser.add_argument("--at", type=float, default=0.9, help="interrupt at this share (default 0.9)")
    args = parser.parse_args()
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "0", "--secure-port", "0", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV)
    match = READY.search(relay.stdout.readline())
    relay_args = ["--relay", f"127.0.0.1:{int(match[1])}", "--secure-port", str(int(match[2]))]
    try:
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            work = Path(tmp)
            size = args.size * 1024 * 1024
            with open(work / "data.bin", "wb") as file:
                for start in range(0, size, 64 << 20):
                    file.write(os.urandom(min(64 << 20, size - start)))
            full, _, _ = run(relay_args, work, work / "full", "1-bench-resume-full")
            print(f"full transfer of {args.size} MiB: {full:.2f} s")
            out = work / "out"
            sender = peer(["send", *relay_args, "--password", "2-bench-resume-cut", "--no-compress", "data.bin"], work)
            time.sleep(0.5)
            receiver = peer(["recv", *relay_args, "-y", "-q", "-o", f"{out}/", "2-bench-resume-cut"], work)
            target = int(size * args.at) // RESUME_CHUNK
            while chunks_done(out) < target:
                if receiver.poll() is not None:
                    raise SystemExit("the transfer finished before the interruption")
                time.sleep(0.005)
            sender.send_signal(signal.SIGKILL)
            sender.wait()
            receiver.wait(30)
            done = chunks_done(out) * RESUME_CHUNK
            print(f"interrupted with {done / size:.0%} verified ({done >> 20} MiB)")
            elapsed, first, wire = run(relay_args, work, out, "3-bench-resume-again", watch_from=done)
            first_text = f"{first:.2f} s" if first is not None else "n/a (too fast to see)"
            print(f"resumed: {elapsed:.2f} s in all, first new byte on disk after {first_text}, "
                  f"{wire}; a full transfer took {full:.2f} s")
            same = (out / "data.bin").read_bytes() == (work / "data.bin").read_bytes()
            print("resumed file identical to the source:", same)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        relay.terminate()
        relay.wait(10)


if __name__ == "__main__":
    main()
