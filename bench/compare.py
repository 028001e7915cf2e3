#!/usr/bin/env python3
"""Everything side by side in one run: ours, magic-wormhole, the physical references, the relay.

    bench/run [options]                     (installs the contenders, then runs this)
    python bench/compare.py [--wormhole-venv DIR] [options]     (this source tree as it is)

Prints one report (docs/performance.md explains every line): the machine; one core's
AES-256-GCM and hash throughput; for each file size, end-to-end transfers on loopback by
every contender, interleaved run by run so that all see the same machine, with medians of
MiB/s, CPU seconds per GiB of each process and peak memory, and the ratios between them;
the relay's capacity (idle connections held and memory per connection, handshakes per
second, secure-room throughput and CPU per GiB against socat); and where we stand against
the targets of issue 7.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contenders  # noqa: E402
import handshakes  # noqa: E402
import primitives  # noqa: E402
import relay_idle  # noqa: E402
import room_throughput  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30


def say(text: str) -> None:
    """Progress on stderr; the report alone goes to stdout."""
    print(text, file=sys.stderr, flush=True)


STALE_WARNING = 1 << 30
"""Bytes already used where the files go, above which the report warns."""


def describe_machine(files_on: Path) -> list[str]:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), 0)
    lines = [
        f"machine: {model}, {os.cpu_count()} cores, {memory / 2**20:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()} {platform.machine()}",
        f"Python {platform.python_version()}; files on {files_on}; "
        f"load average at start {os.getloadavg()[0]:.2f}",
    ]
    used = shutil.disk_usage(files_on).used
    if used > STALE_WARNING:
        # Seen here: a report made with 5 GiB of old files on /dev/shm had our receiver at
        # 4.6 CPU s/GiB; eight minutes later, with them removed, 1.6.
        lines.append(f"WARNING: {used / 2**30:.1f} GiB already used on {files_on} before this run; "
                     "writes there are slower, so are the transfers: clear it and run again")
    return lines


def versions(wormhole_venv: Path | None) -> str:
    parts = []
    try:
        parts.append(f"peer-relay {metadata.version('peer-relay')}")
    except metadata.PackageNotFoundError:
        parts.append("peer-relay (source tree)")
    if wormhole_venv is not None:
        listing = subprocess.run(
            [str(wormhole_venv / "bin" / "python"), "-c",
             "from importlib.metadata import version as v; print(v('magic-wormhole'), "
             "v('magic-wormhole-mailbox-server'), v('magic-wormhole-transit-relay'))"],
            capture_output=True, text=True, check=True).stdout.split()
        parts.append(f"magic-wormhole {listing[0]} (mailbox server {listing[1]}, "
                     f"transit relay {listing[2]})")
    socat = subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout
    line = next((l for l in socat.splitlines() if "socat version" in l), "socat")
    parts.append(line.replace("socat by Gerhard Rieger and contributors - see www.dest-unreach.org", "").strip())
    return "versions: " + "; ".join(parts)


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MIB)
            f.write(os.urandom(n))
            left -= n


def transfers(sizes: list[int], runs: int, work: Path, wormhole_venv: Path | None,
              croc_note: str) -> tuple[list[str], dict]:
    lines: list[str] = []
    results: dict = {}
    for size in sizes:
        source = work / f"random-{size // MIB}MiB.bin"
        make_file(source, size)
        out = work / "out"
        plan = {
            "ours TCP": lambda: contenders.ours(source, out, "tcp"),
            "ours WebSocket": lambda: contenders.ours(source, out, "ws"),
        }
        if wormhole_venv is not None:
            plan["magic-wormhole"] = lambda: contenders.wormhole(source, out, wormhole_venv)
        plan["socat copy (ref)"] = lambda: contenders.socat_copy(size)
        plan["loopback copy (ref)"] = lambda: contenders.loopback_copy(size)
        rows: dict[str, list[contenders.Run]] = {name: [] for name in plan}
        for run in range(runs):
            for name, go in plan.items():
                rows[name].append(go())
                say(f"  {size // MIB} MiB, run {run + 1}/{runs}: {name} "
                    f"{size / rows[name][-1].seconds / MIB:.0f} MiB/s")
        source.unlink()
        speed = {name: statistics.median(size / r.seconds / MIB for r in rs) for name, rs in rows.items()}
        lines.append("")
        lines.append(f"== End-to-end, {size // MIB} MiB random file, loopback "
                     f"(medians of {runs} interleaved runs)")
        lines.append(f"{'':22}{'MiB/s':>7}{'×wormhole':>10}{'of socat':>9}   "
                     f"{'CPU s per GiB':^20}   {'peak RSS MiB':^17}")
        lines.append(f"{'':22}{'':7}{'':10}{'':9}   {'send':>6}{'relay':>7}{'recv':>7}   "
                     f"{'send':>5}{'relay':>6}{'recv':>6}")
        wormhole_speed = speed.get("magic-wormhole")
        socat_speed = speed["socat copy (ref)"]
        results[size] = {}
        for name, rs in rows.items():
            cpu = {role: statistics.median(r.cpu.get(role, 0.0) for r in rs) / (size / GIB)
                   for role in ("sender", "relay", "receiver")}
            peak = {role: max(r.peak_kib.get(role, 0) for r in rs) / 1024
                    for role in ("sender", "relay", "receiver")}
            versus = f"{speed[name] / wormhole_speed:9.2f}×" if wormhole_speed else f"{'-':>10}"
            lines.append(
                f"{name:22}{speed[name]:7.0f}{versus}{speed[name] / socat_speed:9.0%}   "
                f"{cpu['sender']:6.2f}{cpu['relay']:7.2f}{cpu['receiver']:7.2f}   "
                f"{peak['sender']:5.0f}{peak['relay']:6.0f}{peak['receiver']:6.0f}")
            results[size][name] = {"mib_s": speed[name], "cpu_s_per_gib": cpu, "peak_mib": peak,
                                   "runs": [attrs_of(r) for r in rs]}
        lines.append(f"{'croc':22}{croc_note}")
        if "magic-wormhole" in rows:
            lines.append("(magic-wormhole: both ends --no-listen, data through its transit relay; its "
                         f"mailbox server used {statistics.median(r.cpu.get('mailbox', 0) for r in rows['magic-wormhole']):.2f} CPU s per run)")
    return lines, results


def attrs_of(run: contenders.Run) -> dict:
    return {"seconds": run.seconds, "cpu": run.cpu, "peak_kib": run.peak_kib}


def capacity(idle: list[int], pairs: int, concurrency: int, room_gib: float) -> tuple[list[str], dict]:
    lines = ["", "== Relay capacity"]
    results: dict = {"idle": []}
    for count in idle:
        say(f"  idle connections: {count}")
        r = relay_idle.measure(count)
        results["idle"].append(r)
        held = f"{r['connections']:,} held" + (f" ({r['limited_by']})" if r["limited_by"] else "")
        lines.append(f"idle handshake connections, {count:,} asked: {held}; relay RSS "
                     f"{r['rss_before_kib'] / 1024:.0f} → {r['rss_after_kib'] / 1024:.0f} MiB, "
                     f"{r['kib_per_connection']:.1f} KiB per connection")
    say(f"  handshakes: {pairs} pairs, {concurrency} at a time")
    h = handshakes.measure(pairs, concurrency)
    results["handshakes"] = h
    lines.append(f"handshakes, {pairs} pairs with {concurrency} at a time (peers in one process, "
                 f"PBKDF2 16): {h['per_second']:.0f}/s, p50 {h['p50'] * 1000:.0f} ms, "
                 f"p99 {h['p99'] * 1000:.0f} ms; relay CPU {h['relay_ms_per_handshake']:.2f} ms "
                 f"per handshake (≈ {1000 / h['relay_ms_per_handshake']:.0f}/s per relay core)")
    total = int(room_gib * GIB)
    room_runs = {"ours": [], "socat": []}
    for _ in range(3):
        say(f"  secure room vs socat, {room_gib:g} GiB")
        room_runs["ours"].append(room_throughput.run_relay(total))
        room_runs["socat"].append(room_throughput.run_socat(shutil.which("socat"), total))
    for name, rs in room_runs.items():
        for elapsed, cpu, received in rs:
            if received != total:
                raise RuntimeError(f"{name}: {received} of {total} bytes arrived")
    room = {name: {"mib_s": statistics.median(total / r[0] / MIB for r in rs),
                   "cpu_s_per_gib": statistics.median(r[1] for r in rs) / room_gib}
            for name, rs in room_runs.items()}
    results["room"] = room
    lines.append(f"secure room, {room_gib:g} GiB one way (medians of 3): ours "
                 f"{room['ours']['mib_s']:.0f} MiB/s at {room['ours']['cpu_s_per_gib']:.2f} CPU s/GiB; "
                 f"socat {room['socat']['mib_s']:.0f} MiB/s at {room['socat']['cpu_s_per_gib']:.2f} CPU s/GiB "
                 f"({room['ours']['mib_s'] / room['socat']['mib_s']:.2f}× its throughput)")
    return lines, results


def targets(transfer_results: dict, relay_results: dict | None) -> list[str]:
    lines = ["", "== Targets (issue 7)"]

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    for size, rows in transfer_results.items():
        ours = rows["ours TCP"]["mib_s"]
        if "magic-wormhole" in rows:
            ratio = ours / rows["magic-wormhole"]["mib_s"]
            lines.append(f"end-to-end ≥ 3× magic-wormhole ({size // MIB} MiB): {ratio:.2f}×  {mark(ratio >= 3)}")
        share = ours / rows["socat copy (ref)"]["mib_s"]
        lines.append(f"end-to-end ≥ 45% of the socat copy ({size // MIB} MiB): {share:.0%}  {mark(share >= 0.45)}")
    if relay_results:
        room = relay_results["room"]
        ratio = room["ours"]["mib_s"] / room["socat"]["mib_s"]
        lines.append(f"relay ≥ socat's forwarding throughput: {ratio:.2f}×  {mark(ratio >= 1)}")
        cpu = room["ours"]["cpu_s_per_gib"]
        lines.append(f"relay < 0.4 CPU s per GiB forwarded: {cpu:.2f}  {mark(cpu < 0.4)}")
        for r in relay_results["idle"]:
            if r["wanted"] >= 30_000:
                held = r["connections"]
                ok = r["kib_per_connection"] < 20
                verdict = mark(ok) if held >= 30_000 else (
                    f"{'under 20 KiB' if ok else 'NOT under 20 KiB'} at {held:,}; 30,000 not reachable here")
                lines.append(f"< 20 KiB per idle connection at 30,000: "
                             f"{r['kib_per_connection']:.1f} KiB  {verdict}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wormhole-venv", type=Path, help="a virtual environment with magic-wormhole, "
                        "magic-wormhole-mailbox-server and magic-wormhole-transit-relay")
    parser.add_argument("--croc-note", default="not measured: no croc package on this machine's "
                        "registries (bench/run looks for one)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1024], help="MiB (default 100 1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each transfer (default 3)")
    parser.add_argument("--idle", type=int, nargs="*", default=[10_000, 30_000])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--room-gib", type=float, default=1.0)
    parser.add_argument("--no-relay", action="store_true", help="skip the relay capacity part")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    if not shutil.which("socat"):
        sys.exit("bench: socat is needed for the references (apt-get install socat)")

    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="peer-bench-", dir=base))
    report = [f"peer-relay benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
              *describe_machine(base), versions(args.wormhole_venv)]
    everything: dict = {}
    try:
        say("primitives")
        prim = primitives.measure()
        everything["primitives"] = prim
        report += ["", "== One core (references)",
                   f"AES-256-GCM, 32 KiB records: seal {prim['aes256gcm_seal']:.0f} MiB/s, "
                   f"open {prim['aes256gcm_open']:.0f} MiB/s; blake3 {prim['blake3']:.0f} MiB/s; "
                   f"SHA-256 {prim['sha256']:.0f} MiB/s"]
        say("end-to-end transfers")
        lines, transfer_results = transfers([s * MIB for s in args.sizes], args.runs, work,
                                            args.wormhole_venv, args.croc_note)
        everything["transfers"] = {str(k): v for k, v in transfer_results.items()}
        report += lines
        relay_results = None
        if not args.no_relay:
            say("relay capacity")
            lines, relay_results = capacity(args.idle, args.pairs, args.concurrency, args.room_gib)
            everything["relay"] = relay_results
            report += lines
        report += targets(transfer_results, relay_results)
        report.append(f"load average at the end {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(report))
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
