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
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import cpu_of, env, wait_cpu

ROOT = Path(__file__).resolve().parent.parent
SINK = r"""
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
buf = bytearray(1 << 20)
view = memoryview(buf)
total = 0
while True:
    n = conn.recv_into(view)
    if not n:
        break
    total += n
print(total, flush=True)
"""
SOURCE = r"""
import socket, sys
size, port = int(sys.argv[1]), int(sys.argv[2])
chunk = bytes(1 << 20)
conn = socket.create_connection(("127.0.0.1", port))
left = size
while left:
    n = min(left, len(chunk))
    conn.sendall(chunk[:n] if n < len(chunk) else chunk)
    left -= n
conn.close()
"""








def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, read from /proc (a probe would use up
    socat's single connection)."""
    wanted = f":{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(wanted) and fields[3] == "0A":
            return True
    return False


def plain_copy(size: int) -> dict[str, float]:
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    sink_port = int(sink.stdout.readline())
    front = free_port()
    socat = subprocess.Popen(
        ["socat", f"TCP-LISTEN:{front},bind=127.0.0.1,reuseaddr", f"TCP:127.0.0.1:{sink_port}"]
    )
    for _ in range(500):
        if listening(front):
            break
        time.sleep(0.01)
    start = time.perf_counter()
    source = subprocess.Popen([sys.executable, "-c", SOURCE, str(size), str(front)])
    source_cpu = wait_cpu(source)
    received = int(sink.stdout.readline())
    elapsed = time.perf_counter() - start
    sink_cpu = wait_cpu(sink)
    socat_cpu = wait_cpu(socat)
    if received != size:
        raise RuntimeError(f"plain copy moved {received} of {size} bytes")
    return {"seconds": elapsed, "sender": source_cpu, "forwarder": socat_cpu, "receiver": sink_cpu}


READY = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(handshake\) and 127\.0\.0\.1:(\d+)")


def ours(source_file: Path, out_dir: Path, size: int) -> dict[str, float]:
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "0", "--secure-port", "0", "-q"],
        stdout=subprocess.PIPE, text=True, env=env(),
    )
    match = READY.search(relay.stdout.readline())
    port, secure = match[1], match[2]
    relay_before = cpu_of(relay.pid)
    common = ["--relay", f"127.0.0.1:{port}", "--secure-port", secure, "-q"]
    code = "321-bench-mark-code"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    start = time.perf_counter()
    sender = subprocess.Popen([sys.executable, "-m", "peer", "send", *common, "--password", code, str(source_file)], env=env())
    receiver = subprocess.Popen(
        [sys.executable, "-m", "peer", "recv", *common, "-y", "-o", str(out_dir), code], env=env()
    )
    receiver_cpu = wait_cpu(receiver)
    sender_cpu = wait_cpu(sender)
    elapsed = time.perf_counter() - start
    relay_cpu = cpu_of(relay.pid) - relay_before
    relay.terminate()
    relay.wait(10)
    if sender.returncode or receiver.returncode:
        raise RuntimeError(f"transfer failed: send {sender.returncode}, recv {receiver.returncode}")
    received = (out_dir / source_file.name).stat().st_size
    if received != size:
        raise RuntimeError(f"received {received} of {size} bytes")
    shutil.rmtree(out_dir)
    return {"seconds": elapsed, "sender": sender_cpu, "forwarder": relay_cpu, "receiver": receiver_cpu}


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
        results: dict[str, list[dict[str, float]]] = {"plain": [], "ours": []}
        for run in range(args.runs):
            results["plain"].append(plain_copy(size))
            results["ours"].append(ours(source, work / "out", size))
            print(f"run {run + 1}/{args.runs}: plain {size / results['plain'][-1]['seconds'] / 2**20:.0f} MiB/s, "
                  f"ours {size / results['ours'][-1]['seconds'] / 2**20:.0f} MiB/s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gib = size / 2**30
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{args.size} MiB, {args.runs} runs, files on {base}")
    print(f"{'':8} {'MiB/s':>8} {'sender':>10} {'relay':>10} {'receiver':>10}   (CPU s per GiB, medians)")
    medians = {}
    for name, rows in results.items():
        speed = statistics.median(size / r["seconds"] / 2**20 for r in rows)
        medians[name] = speed
        cpu = {k: statistics.median(r[k] for r in rows) / gib for k in ("sender", "forwarder", "receiver")}
        label = "socat" if name == "plain" else "ours"
        print(f"{label:8} {speed:8.0f} {cpu['sender']:10.2f} {cpu['forwarder']:10.2f} {cpu['receiver']:10.2f}")
    print(f"ours / plain copy through socat: {medians['ours'] / medians['plain']:.0%}")


if __name__ == "__main__":
    main()
