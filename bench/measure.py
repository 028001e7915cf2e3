"""What the benchmark scripts share: a child environment and per-process CPU seconds."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK = os.sysconf("SC_CLK_TCK")


INSTALLED = os.environ.get("PEER_BENCH_INSTALLED") == "1"
"""Set by bench/run: measure the peer-relay installed in the running interpreter (with its
compiled bytecode, as a user has it), not this source tree."""


def env(**extra: str) -> dict[str, str]:
    """Our packages importable, and no relay or code leaking in from the caller's shell."""
    e = {k: v for k, v in os.environ.items() if k not in ("PEER_RELAY", "PEER_PASSWORD")}
    if not INSTALLED:
        e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(extra)
    return e


def child_cwd() -> Path | None:
    """Where to start ``python -m relay`` / ``python -m peer``: ``-m`` looks in the working
    directory first, so this tree's root when measuring it, anywhere else otherwise."""
    return None if INSTALLED else ROOT


def cpu_of(pid: int) -> float:
    """User+system CPU seconds a running process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def wait_cpu(process: subprocess.Popen, timeout: float = 900) -> float:
    """Wait for a child and return its user+system CPU seconds (from wait4)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("benchmark process did not finish")
        time.sleep(0.01)
