"""The benchmark harness still works: a tiny pass of bench/compare.py, no figures asserted.

Benchmarks themselves are scripts (bench/, docs/performance.md); this only makes sure that
the one command a maintainer runs before a release does not rot between releases: every
contender it measures here moves its bytes and is checked, and the report has its lines.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("socat") is None,
                                reason="socat is not installed (apt-get install socat)")


def test_a_tiny_comparison_runs_and_reports_every_line(tmp_path):
    figures = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare.py"), "--sizes", "1", "--runs", "1",
         "--idle", "200", "--pairs", "20", "--concurrency", "5", "--room-gib", "0.01",
         "--json", str(figures)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = done.stdout
    for line in ("== One core", "== End-to-end, 1 MiB", "ours TCP", "ours WebSocket",
                 "socat copy (ref)", "loopback copy (ref)", "croc", "== Relay capacity",
                 "idle handshake connections, 200 asked: 200 held", "handshakes, 20 pairs",
                 "secure room", "== Targets", "relay ≥ socat's forwarding throughput"):
        assert line in report, f"{line!r} missing from:\n{report}"
    assert figures.stat().st_size > 0
