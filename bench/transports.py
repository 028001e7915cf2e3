#!/usr/bin/env python3
"""One transfer over each transport, side by side: TCP, WebSocket, TLS and WebSocket over TLS.

    python bench/transports.py [--size MiB] [--runs N]

Each run moves the same file (on /dev/shm when there is one, so the disk is not measured)
with ``peer send`` -> ``peer-relay`` -> ``peer recv`` over each transport in turn, both peers
on the same transport: plain TCP (the relay splices), ws:// and tls:// and wss:// (the relay
copies through Python). It prints MiB/s and CPU seconds per GiB of each process, medians
over the runs, and each transport's throughput as a share of TCP's. The machine is shared
and noisy: compare the ratios within one run of this script.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import cpu_of, env, wait_cpu

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from transport_helpers import make_certificates  # noqa: E402  (a throw-away CA and certificate)

READY = re.compile(
    r"listening on 127\.0\.0\.1:(\d+) \(handshake\) and 127\.0\.0\.1:(\d+) \(secure room\), "
    r"127\.0\.0\.1:(\d+) \(websocket\)"
)
TRANSPORTS = ("tcp", "ws", "tls", "wss")








class Relay:
    """A peer-relay with a WebSocket port, with or without TLS on every port."""

    def __init__(self, *extra: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "0", "--secure-port", "0",
             "--ws-port", "0", "-q", *extra],
            stdout=subprocess.PIPE, text=True, env=env(),
        )
        match = READY.search(self.process.stdout.readline())
        if not match:
            self.process.kill()
            raise RuntimeError("the relay did not start")
        self.port, self.secure_port, self.ws_port = match[1], match[2], match[3]

    def args(self, transport: str) -> list[str]:
        if transport in ("ws", "wss"):
            return ["--relay", f"{transport}://localhost:{self.ws_port}/"]
        return ["--relay", f"{transport}://127.0.0.1:{self.port}", "--secure-port", self.secure_port]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def transfer(relay: Relay, transport: str, source: Path, out_dir: Path, trust: dict[str, str]) -> dict[str, float]:
    common = [*relay.args(transport), "-q"]
    code = "321-bench-mark-code"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    relay_before = cpu_of(relay.process.pid)
    start = time.perf_counter()
    sender = subprocess.Popen(
        [sys.executable, "-m", "peer", "send", *common, "--password", code, str(source)], env=env(**trust))
    receiver = subprocess.Popen(
        [sys.executable, "-m", "peer", "recv", *common, "-y", "-o", f"{out_dir}/", code], env=env(**trust))
    receiver_cpu = wait_cpu(receiver)
    sender_cpu = wait_cpu(sender)
    elapsed = time.perf_counter() - start
    relay_cpu = cpu_of(relay.process.pid) - relay_before
    if sender.returncode or receiver.returncode:
        raise RuntimeError(f"{transport}: transfer failed: send {sender.returncode}, recv {receiver.returncode}")
    received = (out_dir / source.name).stat().st_size
    if received != source.stat().st_size:
        raise RuntimeError(f"{transport}: received {received} of {source.stat().st_size} bytes")
    shutil.rmtree(out_dir)
    return {"seconds": elapsed, "sender": sender_cpu, "relay": relay_cpu, "receiver": receiver_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="MiB to move (default 1024)")
    parser.add_argument("--runs", type=int, default=1, help="runs of each transport (default 1)")
    args = parser.parse_args()
    size = args.size * 1024 * 1024
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="peer-bench-", dir=base))
    results: dict[str, list[dict[str, float]]] = {name: [] for name in TRANSPORTS}
    relays: list[Relay] = []
    try:
        source = work / "payload.bin"
        with open(source, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(1024 * 1024))
        certificates = make_certificates(work)
        trust = {"SSL_CERT_FILE": str(certificates.ca)}
        plain = Relay()
        relays.append(plain)
        secure = Relay("--tls-cert", str(certificates.cert), "--tls-key", str(certificates.key))
        relays.append(secure)
        for run in range(args.runs):
            for name in TRANSPORTS:
                relay = secure if name in ("tls", "wss") else plain
                results[name].append(transfer(relay, name, source, work / "out", trust))
                print(f"run {run + 1}/{args.runs}: {name} "
                      f"{size / results[name][-1]['seconds'] / 2**20:.0f} MiB/s", file=sys.stderr)
    finally:
        for relay in relays:
            relay.stop()
        shutil.rmtree(work, ignore_errors=True)

    gib = size / 2**30
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{args.size} MiB, {args.runs} run(s), files on {base}")
    print(f"{'':6} {'MiB/s':>7} {'vs tcp':>7} {'sender':>8} {'relay':>8} {'receiver':>8}   (CPU s per GiB, medians)")
    tcp_speed = statistics.median(size / r["seconds"] / 2**20 for r in results["tcp"])
    for name, rows in results.items():
        speed = statistics.median(size / r["seconds"] / 2**20 for r in rows)
        cpu = {k: statistics.median(r[k] for r in rows) / gib for k in ("sender", "relay", "receiver")}
        print(f"{name:6} {speed:7.0f} {speed / tcp_speed:7.0%} "
              f"{cpu['sender']:8.2f} {cpu['relay']:8.2f} {cpu['receiver']:8.2f}")


if __name__ == "__main__":
    main()
