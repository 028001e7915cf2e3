#!/usr/bin/env python3
"""The browser peer receiving from ``peer send`` and sending to ``peer recv``, side by side
with ``peer send`` → ``peer recv``.

    python bench/browser.py [--size MiB] [--runs N]

Each run, in one go on this machine (loopback, one relay with ``--ws-port 0``):
  python   peer send FILE (TCP) → peer-relay → peer recv -o DIR;
  browser  peer send FILE (TCP) → peer-relay → headless Chromium on the relay's own page
           (``/#receive/CODE``, Accept clicked at once), the file arriving as a download;
  sending  headless Chromium on ``/#send`` (the file picked, Send clicked) → peer-relay →
           peer recv -y -o DIR (TCP), started with the code the page shows.
Files and downloads live on a tmpfs (/dev/shm) when there is one, so the disk is not what is
measured. Times run from starting the sender (clicking Send, for the page) to the end
(``peer recv`` exited; the page shows done and, receiving, the download has its final
name), and the received bytes are checked. The aims are the receiving page's.
It prints MiB/s for each, the browser's as a share of Python's, and the peak resident memory
(VmHWM, polled) of Chromium's renderer processes (``--type=renderer``: the page and its
service worker) and of the other Chromium processes, and the renderer's own anonymous
memory (RssAnon + RssShmem, polled), without the code and files it maps from disk. Aims (issue 14):
at least 100 MiB/s, and a renderer under 300 MiB for 1 GiB.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import contenders
from measure import ROOT, child_cwd, env, start_relay

sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from browser import browser_missing, chromium  # noqa: E402  (the tests' Chromium harness)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="MiB to move (default 1024)")
    parser.add_argument("--runs", type=int, default=1, help="runs of each (default 1)")
    args = parser.parse_args()
    if missing := browser_missing():
        sys.exit(f"cannot run the browser: {missing}")
    size = args.size * 1024 * 1024
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="peer-bench-browser-", dir=base))
    rows: dict[str, list[float]] = {"python": [], "browser": [], "sending": []}
    peaks: list[dict[str, int]] = []
    sending_peaks: list[dict[str, int]] = []
    try:
        source = work / "payload.bin"
        with open(source, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(1024 * 1024))
        for run in range(args.runs):
            rows["python"].append(contenders.ours(source, work / "out", "tcp").seconds)
            seconds, peak = browser_run(source, work / "downloads")
            rows["browser"].append(seconds)
            peaks.append(peak)
            sent, sending_peak = browser_send_run(source, work / "out")
            rows["sending"].append(sent)
            sending_peaks.append(sending_peak)
            print(f"run {run + 1}/{args.runs}: python {size / rows['python'][-1] / 2**20:.0f} MiB/s, "
                  f"browser {size / seconds / 2**20:.0f} MiB/s, renderer peak {peak['renderer'] / 1024:.0f} MiB, "
                  f"sending {size / sent / 2**20:.0f} MiB/s, renderer peak {sending_peak['renderer'] / 1024:.0f} MiB",
                  file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{chromium_version()}, {args.size} MiB, {args.runs} runs, files on {base}")
    medians = {name: statistics.median(size / s / 2**20 for s in seconds) for name, seconds in rows.items()}
    print(f"python   {medians['python']:8.0f} MiB/s  (peer send → peer recv, TCP)")
    print(f"browser  {medians['browser']:8.0f} MiB/s  (peer send → Chromium, TCP sender, WebSocket page)")
    print(f"sending  {medians['sending']:8.0f} MiB/s  (Chromium → peer recv, WebSocket page, TCP receiver)")
    print(f"browser / python: {medians['browser'] / medians['python']:.0%}, "
          f"sending / python: {medians['sending'] / medians['python']:.0%}")
    renderer = max(p["renderer"] for p in peaks) / 1024
    idle = max(p["idle"] for p in peaks) / 1024
    others = max(p["other"] for p in peaks) / 1024
    private = max(p["private"] for p in peaks) / 1024
    print(f"peak resident memory: renderer {renderer:.0f} MiB (aim < 300; {idle:.0f} MiB with the page "
          f"loaded, before the transfer), largest other Chromium process {others:.0f} MiB")
    print(f"  the renderer's own (anonymous) memory peaked at {private:.0f} MiB; the rest of its "
          f"resident size is Chromium's code and files mapped from disk")
    print(f"sending: renderer {max(p['renderer'] for p in sending_peaks) / 1024:.0f} MiB, its own memory "
          f"{max(p['private'] for p in sending_peaks) / 1024:.0f} MiB")


def browser_run(source: Path, downloads: Path) -> tuple[float, dict[str, int]]:
    """One transfer into Chromium: (seconds, peak KiB of its renderer and other processes)."""
    from selenium.webdriver.support.ui import WebDriverWait

    from peer.codes import generate_code

    code = generate_code()  # list words only: the page questions a code with others
    shutil.rmtree(downloads, ignore_errors=True)
    downloads.mkdir()
    sender = None
    try:
        with relay_with_page() as ports, chromium(downloads) as driver:
            watch = MemoryWatch(driver.service.process.pid)
            watch.start()
            try:
                driver.get(f"http://127.0.0.1:{ports[2]}/#receive")  # the page cached, not timed
                WebDriverWait(driver, 60).until(lambda d: visible(d, '[data-role="code-input"]'))
                idle = watch.sample()["renderer"]  # the page loaded, before any transfer
                started = time.perf_counter()
                sender = subprocess.Popen(
                    [sys.executable, "-m", "peer", "send", "--relay", f"127.0.0.1:{ports[0]}",
                     "--secure-port", str(ports[1]), "-q", "--password", code, str(source)],
                    cwd=child_cwd(), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                driver.get(f"http://127.0.0.1:{ports[2]}/#receive/{code}")
                wait = WebDriverWait(driver, 3600, poll_frequency=0.05)
                wait.until(lambda d: visible(d, '[data-action="accept"]')).click()
                state = wait.until(lambda d: visible(d, '[data-view="receive"] [data-state]'))
                if state.get_attribute("data-state") != "done":
                    raise RuntimeError(f"the browser failed: {state.text}")
                received = downloads / source.name
                while not received.exists() or list(downloads.glob("*.crdownload")):
                    if time.perf_counter() - started > 3600:
                        raise RuntimeError("the download never got its final name")
                    time.sleep(0.01)
                seconds = time.perf_counter() - started
                if sender.wait(60) != 0:
                    raise RuntimeError(f"peer send failed: {sender.stderr.read().decode(errors='replace')}")
            finally:
                watch.stop()
        same_bytes(source, received)
        return seconds, {**watch.peaks, "idle": idle}
    finally:
        if sender is not None and sender.poll() is None:
            sender.kill()
            sender.wait(10)
        if sender is not None:
            sender.stderr.close()
        shutil.rmtree(downloads, ignore_errors=True)


def browser_send_run(source: Path, out_dir: Path) -> tuple[float, dict[str, int]]:
    """One transfer from Chromium to ``peer recv``: (seconds, peak KiB as browser_run's)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        with relay_with_page() as ports, chromium() as driver:
            watch = MemoryWatch(driver.service.process.pid)
            watch.start()
            try:
                wait = WebDriverWait(driver, 3600, poll_frequency=0.05)
                driver.get(f"http://127.0.0.1:{ports[2]}/#send")
                wait.until(lambda d: d.execute_script("return document.documentElement.dataset.page") == "ready")
                driver.find_element(By.CSS_SELECTOR, 'input[type=file][data-role="send-files"]').send_keys(str(source))
                send = wait.until(lambda d: visible(d, '[data-action="send"]'))
                started = time.perf_counter()
                send.click()
                code = wait.until(lambda d: visible(d, '[data-role="code"]')).text
                receiver = subprocess.run(
                    [sys.executable, "-m", "peer", "recv", "--relay", f"127.0.0.1:{ports[0]}",
                     "--secure-port", str(ports[1]), "-q", "-y", "-o", f"{out_dir}/", code],
                    cwd=child_cwd(), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    timeout=3600)
                state = wait.until(lambda d: visible(d, '[data-view="send"] [data-state]'))
                seconds = time.perf_counter() - started
                if receiver.returncode != 0:
                    raise RuntimeError(f"peer recv failed: {receiver.stderr.decode(errors='replace')}")
                if state.get_attribute("data-state") != "done":
                    raise RuntimeError(f"the browser failed: {state.text}")
            finally:
                watch.stop()
        same_bytes(source, out_dir / source.name)
        return seconds, dict(watch.peaks)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


@contextlib.contextmanager
def relay_with_page():
    """A relay serving the page on a WebSocket port; its ports (handshake, room, WebSocket)."""
    relay, ports = start_relay("--ws-port", "0")
    try:
        yield ports
    finally:
        relay.terminate()
        relay.wait(15)
        relay.stdout.close()


def visible(driver, css: str):
    from selenium.webdriver.common.by import By

    return next((e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()), None)


class MemoryWatch:
    """Polls the VmHWM of every process under chromedriver (Chromium and its children):
    the largest renderer's, and the largest of the others (browser, network, GPU...)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peaks = {"renderer": 0, "other": 0, "private": 0}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(10)

    def sample(self) -> dict[str, int]:
        """The peaks so far, read now."""
        self._read()
        return dict(self.peaks)

    def _poll(self) -> None:
        while True:
            self._read()
            if self._done.wait(0.1):
                return

    def _read(self) -> None:
        # Two threads may read at once (sample and the poller): max() keeps that harmless.
        for pid in descendants(self.root):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            kib = status_kib(status)
            kind = "renderer" if b"--type=renderer" in cmdline else "other"
            self.peaks[kind] = max(self.peaks[kind], kib.get("VmHWM", 0))
            if kind == "renderer":
                # Its own memory, not the code and files it maps from disk (shared with the
                # other Chromium processes); polled, so a peak between polls may be missed.
                private = kib.get("RssAnon", 0) + kib.get("RssShmem", 0)
                self.peaks["private"] = max(self.peaks["private"], private)


def status_kib(status: str) -> dict[str, int]:
    """The kB fields of a /proc/PID/status text (VmHWM, RssAnon...), as KiB."""
    fields = {}
    for line in status.splitlines():
        name, _, rest = line.partition(":")
        if rest.strip().endswith(" kB"):
            fields[name] = int(rest.split()[0])
    return fields


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def same_bytes(source: Path, received: Path) -> None:
    if received.stat().st_size != source.stat().st_size:
        raise RuntimeError(f"{received} has {received.stat().st_size} of {source.stat().st_size} bytes")
    with open(source, "rb") as a, open(received, "rb") as b:
        while piece := a.read(16 << 20):
            if piece != b.read(len(piece)):
                raise RuntimeError(f"{received} differs from {source}")


def chromium_version() -> str:
    from browser import CHROMIUM

    try:
        return subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "chromium (version unknown)"


if __name__ == "__main__":
    main()
