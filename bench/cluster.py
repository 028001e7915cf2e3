#!/usr/bin/env python3
"""Handshakes per second through nginx with one relay instance and with two, side by side.

    python bench/cluster.py [--pairs 600] [--concurrency 100] [--rounds 2]

Each round runs the same load twice, against docs/nginx-cluster.conf (plain ws:// on
loopback, no TLS, so that nginx and the peers spend their CPU on the handshakes) rendered
first for one relay instance and then for two; the rounds alternate the order. The peers are
those of bench/handshakes.py (the real handshake machines and meeting driver in this
process, every pair with its own nameplate, bob's 16 PBKDF2 iterations), going to
``ws://127.0.0.1:PORT/peer-relay/``. A pair counts once both hold their open secure room.

Printed per run: handshakes per second, relay CPU per handshake (all instances together,
and how it split between them), and how busy each party was: CPU seconds over the run's wall
seconds, for the peers (this process), the relays and nginx. On a 2-core machine whichever
party sits near one full core (1.00) is the limit; 2 instances can only beat 1 when the relays
are.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import INSTALLED, ROOT, cpu_of, start_relay  # noqa: E402

if not INSTALLED:
    sys.path.insert(0, str(ROOT))

from handshakes import run  # noqa: E402
from peer.address import parse_relay  # noqa: E402

NGINX = Path("/usr/sbin/nginx")
EXAMPLE = ROOT / "docs" / "nginx-cluster.conf"


def render(workdir: Path, port: int, ws_ports: list[int]) -> Path:
    """docs/nginx-cluster.conf on plain HTTP at ``port``, for the instances at ``ws_ports``."""
    text = EXAMPLE.read_text()
    text = re.sub(r"listen 443 ssl;", f"listen 127.0.0.1:{port};", text)
    text = re.sub(r"\n\s*listen \[::\]:443 ssl;", "", text)
    text = re.sub(r"\n\s*ssl_certificate(_key)?\s+\S+;", "", text)
    servers = re.findall(r"^\s*server 127\.0\.0\.1:90\d2 .*$", text, re.MULTILINE)
    if len(servers) < len(ws_ports):
        raise SystemExit(f"{EXAMPLE} lists {len(servers)} instances, not {len(ws_ports)}")
    for number, line in enumerate(servers):
        if number < len(ws_ports):
            new = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{ws_ports[number]}", line)
        else:
            new = ""
        text = text.replace(line + "\n", new + "\n" if new else "", 1)
    temp = "".join(f"    {name}_temp_path {workdir / name};\n"
                   for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    config = (f"daemon off;\nmaster_process on;\nworker_processes 1;\n"
              f"{'user root;' if os.geteuid() == 0 else ''}\n"
              f"pid {workdir / 'nginx.pid'};\nerror_log {workdir / 'error.log'} error;\n"
              f"events {{ worker_connections 4096; }}\nworker_rlimit_nofile 8192;\n"
              f"http {{\n    access_log off;\n{temp}{text}\n}}\n")
    path = workdir / "nginx.conf"
    path.write_text(config)
    return path


def family_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (nginx's master and workers)."""
    total = cpu_of(pid)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                total += cpu_of(int(entry.name))
    return total


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port: int, timeout: float = 10.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nginx did not listen on {port}")
            time.sleep(0.05)


def measure(instances: int, pairs: int, concurrency: int, iterations: int) -> dict:
    relays = []
    nginx = None
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as work:
        try:
            for _ in range(instances):
                relays.append(start_relay("--ws-port", "0", "--max-connections", "0",
                                          "--hello-rate", "0", "--max-rooms", "0",
                                          "--trust-proxy", "127.0.0.1"))
            port = free_port()
            config = render(Path(work), port, [ports[2] for _, ports in relays])
            nginx = subprocess.Popen([str(NGINX), "-p", work, "-c", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_listening(port)
            address = parse_relay(f"ws://127.0.0.1:{port}/peer-relay/")
            before = ([cpu_of(r.pid) for r, _ in relays], family_cpu(nginx.pid), own_cpu())
            started = time.perf_counter()
            took = trio.run(run, address, pairs, concurrency, iterations)
            elapsed = time.perf_counter() - started
            relay_cpu = [cpu_of(r.pid) - b for (r, _), b in zip(relays, before[0])]
            nginx_cpu = family_cpu(nginx.pid) - before[1]
            peers_cpu = own_cpu() - before[2]
        finally:
            if nginx is not None:
                nginx.send_signal(signal.SIGQUIT)
                nginx.wait(30)
            for relay, _ in relays:
                relay.terminate()
                relay.wait(30)
                relay.stdout.close()
    took.sort()
    return {"instances": instances, "per_second": pairs / elapsed, "seconds": elapsed,
            "relay_ms": sum(relay_cpu) / pairs * 1000, "split": relay_cpu,
            "busy": {"peers": peers_cpu / elapsed, "relays": sum(relay_cpu) / elapsed,
                     "nginx": nginx_cpu / elapsed},
            "p50": statistics.median(took)}


def show(r: dict) -> str:
    split = "/".join(f"{cpu:.1f}" for cpu in r["split"])
    busy = ", ".join(f"{name} {value:.2f}" for name, value in r["busy"].items())
    return (f"{r['instances']} instance{'s' if r['instances'] > 1 else ' '}: "
            f"{r['per_second']:5.0f} handshakes/s (p50 {r['p50'] * 1000:.0f} ms); relay CPU "
            f"{r['relay_ms']:.2f} ms per handshake (CPU s by instance {split}); "
            f"cores busy: {busy}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not NGINX.exists():
        raise SystemExit(f"bench/cluster.py: needs nginx at {NGINX} (Debian: nginx-light)")
    results: dict[int, list[dict]] = {1: [], 2: []}
    print(f"{os.cpu_count()} cores; {args.pairs} pairs per run, {args.concurrency} at a time, "
          f"PBKDF2 {args.iterations}, through nginx (ws://, 1 worker)")
    for number in range(args.rounds):
        for instances in ((1, 2) if number % 2 == 0 else (2, 1)):
            result = measure(instances, args.pairs, args.concurrency, args.iterations)
            results[instances].append(result)
            print(show(result), flush=True)
    one = statistics.median(r["per_second"] for r in results[1])
    two = statistics.median(r["per_second"] for r in results[2])
    busiest = max(results[2][-1]["busy"].items(), key=lambda item: item[1])
    print(f"median: 1 instance {one:.0f}/s, 2 instances {two:.0f}/s: {two / one:.2f}x; "
          f"with 2 instances the busiest party was {busiest[0]} ({busiest[1]:.2f} of a core)")
    # CPU per handshake of each party (all runs), and what one core of it could sustain:
    # the party with the lowest rate per core is the one that limits this machine.
    every = results[1] + results[2]
    per = {name: statistics.median(r["busy"][name] / r["per_second"] * 1000 for r in every)
           for name in ("peers", "relays", "nginx")}
    print("CPU per handshake (median of all runs): " + ", ".join(
        f"{name} {ms:.2f} ms ({f'{1000 / ms:.0f}/s' if ms else 'too little to tell'} per core)"
        for name, ms in per.items()))


if __name__ == "__main__":
    main()
