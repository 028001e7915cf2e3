#!/usr/bin/env python3
"""Many small files through a local relay: ours beside magic-wormhole.

    python bench/small_files.py [--counts 2000 20000] [--size 9] [--runs 1] [--wormhole-venv DIR]

Each run sends one directory of COUNT files of SIZE bytes (``peer send DIR`` → ``peer-relay``
→ ``peer recv -o OUT``) and reports the wall seconds from starting both ends until both
exited, files per second, and the ratio to magic-wormhole (its own mailbox server and
transit relay on loopback, both ends ``--no-listen``, see bench/contenders.py) when a
virtual environment with it is given or ``wormhole`` and ``twist`` are on PATH; without
it, ours alone is printed and the line says so. Every received file is checked.

The files live under ``--dir`` (default: the system's temporary directory), which should
be a real disk: on tmpfs a sync costs nothing, and what is measured is the receiver paying
for durability once per transfer instead of once per file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contenders import CODE, WORMHOLE_CODE, Children, start_wormhole_services  # noqa: E402
from measure import child_cwd, env, relay_command, relay_ports  # noqa: E402


def make_tree(root: Path, count: int, size: int) -> Path:
    """COUNT files of SIZE bytes, 1,000 to a subdirectory (as a source tree would have them)."""
    source = root / f"small-{count}"
    shutil.rmtree(source, ignore_errors=True)
    for index in range(count):
        folder = source / f"d{index // 1000:03}"
        if index % 1000 == 0:
            folder.mkdir(parents=True)
        (folder / f"f{index:06}.txt").write_bytes(f"{index:0{size}}"[-size:].encode() if size else b"")
    return source


def check_tree(source: Path, received: Path) -> None:
    """Every file arrived with its bytes."""
    count = 0
    for path in source.rglob("*"):
        if path.is_file():
            twin = received / path.relative_to(source)
            if twin.read_bytes() != path.read_bytes():
                raise RuntimeError(f"{twin} differs from {path}")
            count += 1
    if count == 0:
        raise RuntimeError("nothing was checked")


def ours(source: Path, out: Path) -> float:
    children = Children()
    try:
        relay = children.start("relay", relay_command(), stdout=subprocess.PIPE, text=True,
                               env=env(), cwd=child_cwd())
        port, secure = relay_ports(relay)[:2]
        where = ["--relay", f"127.0.0.1:{port}", "--secure-port", str(secure)]
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        started = time.perf_counter()
        children.start("sender", [sys.executable, "-m", "peer", "send", *where, "-q", "--password", CODE,
                                  str(source)], env=env(), cwd=child_cwd())
        children.start("receiver", [sys.executable, "-m", "peer", "recv", *where, "-q", "-y", "-o",
                                    str(out), CODE], env=env(), cwd=child_cwd(), stderr=subprocess.PIPE)
        return _finish(children, started, ["relay"], "ours", source, out / source.name)
    finally:
        children.stop_all()
        shutil.rmtree(out, ignore_errors=True)


def wormhole(source: Path, out: Path, bin_dir: Path) -> float:
    children = Children()
    work = out.parent
    try:
        _, common = start_wormhole_services(children, bin_dir, work)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        started = time.perf_counter()
        children.start("sender", [*common, "send", "--no-listen", "--hide-progress", "--no-qr",
                                  "--code", WORMHOLE_CODE, str(source)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        children.start("receiver", [*common, "receive", "--no-listen", "--hide-progress",
                                    "--accept-file", "-o", str(out / source.name), WORMHOLE_CODE],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return _finish(children, started, ["relay", "mailbox"], "wormhole", source, out / source.name)
    finally:
        children.stop_all()
        shutil.rmtree(out, ignore_errors=True)
        for leftover in work.glob("mailbox.sqlite*"):
            leftover.unlink()


def _finish(children: Children, started: float, servers: list[str], what: str,
            source: Path, received: Path) -> float:
    statuses = children.wait("receiver"), children.wait("sender")
    elapsed = time.perf_counter() - started
    for role in servers:
        children.stop(role)
    if statuses != (0, 0):
        stream = children.processes["receiver"].stderr
        said = stream.read().decode(errors="replace").strip()[-300:] if stream else ""
        raise RuntimeError(f"{what} failed: recv {statuses[0]}, send {statuses[1]} {said}")
    check_tree(source, received)
    return elapsed


def wormhole_bin(venv: Path | None) -> Path | None:
    """Where magic-wormhole's ``wormhole`` and ``twist`` are, if anywhere."""
    if venv is not None:
        return venv / "bin"
    found, twist = shutil.which("wormhole"), shutil.which("twist")
    if found and twist and Path(found).parent == Path(twist).parent:
        return Path(found).parent
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--size", type=int, default=9, help="bytes per file (default 9)")
    parser.add_argument("--runs", type=int, default=1, help="runs per contender; the median is shown")
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (a real disk)")
    parser.add_argument("--wormhole-venv", type=Path, default=None,
                        help="a virtual environment with magic-wormhole, its mailbox server and transit relay")
    args = parser.parse_args()
    bin_dir = wormhole_bin(args.wormhole_venv)
    with tempfile.TemporaryDirectory(prefix="peer-small-", dir=args.dir) as tmp:
        work = Path(tmp)
        print(f"{args.size}-byte files in {work} ({os.uname().sysname}, {os.cpu_count()} cores)")
        if bin_dir is None:
            print("magic-wormhole is not installed (no --wormhole-venv, no wormhole/twist on PATH): ours alone")
        print(f"{'files':>7} {'ours s':>8} {'files/s':>8} {'wormhole s':>11} {'files/s':>8} {'ours/wormhole':>14}")
        for count in args.counts:
            source = make_tree(work, count, args.size)
            mine = statistics.median(ours(source, work / "out") for _ in range(args.runs))
            line = f"{count:>7} {mine:>8.2f} {count / mine:>8.0f}"
            if bin_dir is not None:
                theirs = statistics.median(wormhole(source, work / "out", bin_dir) for _ in range(args.runs))
                line += f" {theirs:>11.2f} {count / theirs:>8.0f} {mine / theirs:>13.2f}×"
            print(line, flush=True)
            shutil.rmtree(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
