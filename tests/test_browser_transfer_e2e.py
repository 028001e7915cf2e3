"""receiveFiles and sendFiles (peer/browser/lib/receiving.js, sending.js) end to end against
the Python peer: the modules in headless Chromium, B's rendezvous over a real relay's
WebSocket port, real `peer send` and `peer recv` processes, the received bytes checked.
Below the page's UI (tests/test_browser_e2e.py drives that): one Chromium for the file."""

from __future__ import annotations

import os
import re
import threading
import time
import zipfile
from pathlib import Path

import pytest
from browser import app_server, browser_missing, chromium, run_js

from peer.codes import generate_code
from processes import peer
from transport_helpers import start_relay

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")

MiB = 1 << 20
LIMIT = 90.0  # seconds: the bound of every wait here

# The page's side: B's rendezvous (words from the app server), then our drivers.
MODULES = """
const words = await (await import('./lib/codes.js')).loadWords(new URL('/words.txt', location.href));
const rendezvous = await import('./lib/rendezvous.js');
const receiving = await import('./lib/receiving.js');
const sending = await import('./lib/sending.js');
"""

PATTERN_JS = """
const chunkOf = (k, size) => { const c = new Uint8Array(size); for (let j = 0; j < size; j++) c[j] = (k * 31 + j) & 0xff; return c; };
const fileOf = (size, name) => { const parts = []; for (let at = 0, k = 0; at < size; at += 262144, k++) parts.push(chunkOf(k, Math.min(262144, size - at))); return new File(parts, name); };
"""


def pattern(size, chunk=256 * 1024):
    out = bytearray()
    k = 0
    while len(out) < size:
        n = min(chunk, size - len(out))
        block = bytes((k * 31 + j) & 0xFF for j in range(256))
        out += block * (n // 256) + block[: n % 256]
        k += 1
    return bytes(out)


@pytest.fixture(scope="module")
def relay():
    relay = start_relay("--ws-port", "0")
    try:
        yield relay
    finally:
        relay.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with app_server() as origin, chromium(tmp_path_factory.mktemp("downloads")) as driver:
        driver.get(origin + "/")
        yield driver


@pytest.fixture
def downloads(browser, tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
    return folder


class Peer:
    """A `peer` process whose output is collected while it runs; always stopped at the end."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.process = peer(*args, cwd=cwd)
        self.text: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(pipe,), daemon=True)
                        for pipe in (self.process.stdout, self.process.stderr)]
        for reader in self.readers:
            reader.start()

    def _read(self, pipe) -> None:
        for line in iter(pipe.readline, b""):
            self.text.append(line.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self.text)

    def wait_for(self, pattern_: str) -> re.Match:
        deadline = time.monotonic() + LIMIT
        while time.monotonic() < deadline:
            match = re.search(pattern_, self.output)
            if match:
                return match
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern_!r} from peer: {self.output}")

    def finish(self) -> int:
        try:
            return self.process.wait(LIMIT)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for reader in self.readers:
            reader.join(10)
        self.process.stdout.close()
        self.process.stderr.close()


@pytest.fixture
def peers():
    started: list[Peer] = []

    def start(*args: str, cwd: Path) -> Peer:
        started.append(Peer(*args, cwd=cwd))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def base(relay) -> str:
    return f"http://127.0.0.1:{relay.ws_port}/"


def settled(folder: Path, name: str) -> Path:
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        if (folder / name).exists() and not list(folder.glob("*.crdownload")):
            return folder / name
        time.sleep(0.1)
    raise AssertionError(f"{name} never finished downloading: {sorted(os.listdir(folder))}")


RECEIVE = MODULES + """
const rv = await rendezvous.receiveRendezvous({base: args[0], code: args[1], words});
const seen = {progress: 0, summary: null};
try {
  const result = await receiving.receiveFiles(rv, {
    decide: async (summary) => { seen.summary = {topLevel: summary.topLevel, fileCount: summary.fileCount, totalBytes: summary.totalBytes}; return {accept: args[2]}; },
    onProgress: (p) => { seen.progress += 1; seen.last = p; },
  });
  return {result, seen, verification: rv.verification};
} catch (error) {
  return {error: error.message, seen};
}
"""


def test_receiving_a_20_mib_file_from_peer_send(relay, browser, downloads, peers, tmp_path):
    data = os.urandom(20 * MiB)
    (tmp_path / "big.bin").write_bytes(data)
    code = generate_code()
    sender = peers("send", "--relay", f"ws://127.0.0.1:{relay.ws_port}/", "--password", code, "big.bin", cwd=tmp_path)
    sender.wait_for("On the other machine run")
    got = run_js(browser, RECEIVE, base(relay), code, True)
    assert "error" not in got, got
    assert got["result"] == {"files": 1, "bytes": 20 * MiB, "savedAs": "big.bin", "text": None}
    assert got["seen"]["summary"] == {"topLevel": ["big.bin"], "fileCount": 1, "totalBytes": 20 * MiB}
    assert got["seen"]["last"]["bytes"] == 20 * MiB and got["seen"]["progress"] >= 1
    assert settled(downloads, "big.bin").read_bytes() == data
    assert sender.finish() == 0, sender.output
    assert got["verification"] in sender.output


def test_receiving_a_tree_from_peer_send_as_a_zip(relay, browser, downloads, peers, tmp_path):
    files = {"a.txt": b"top\n", "sub/b.bin": os.urandom(300_000), "sub/deeper/c.bin": os.urandom(1_000_001),
             "sub/deeper/empty": b"", ".hidden/x": b"dot"}
    for relative, content in files.items():
        path = tmp_path / "album" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (tmp_path / "album" / "vacant").mkdir()
    code = generate_code()
    sender = peers("send", "--relay", f"tcp://127.0.0.1:{relay.port}", "--secure-port", str(relay.secure_port),
                   "--password", code, "album", cwd=tmp_path)
    sender.wait_for("On the other machine run")
    got = run_js(browser, RECEIVE, base(relay), code, True)
    assert "error" not in got, got
    assert got["result"]["savedAs"] == "album.zip" and got["result"]["files"] == 5
    with zipfile.ZipFile(settled(downloads, "album.zip")) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        contents = {name: archive.read(name) for name in names if not name.endswith("/")}
    assert contents == {f"album/{path}": content for path, content in files.items()}
    assert "album/vacant/" in names
    assert sender.finish() == 0, sender.output


def test_declining_stops_both_sides(relay, browser, downloads, peers, tmp_path):
    (tmp_path / "f.txt").write_bytes(b"unwanted")
    code = generate_code()
    sender = peers("send", "--relay", f"ws://127.0.0.1:{relay.ws_port}/", "--password", code, "f.txt", cwd=tmp_path)
    sender.wait_for("On the other machine run")
    got = run_js(browser, RECEIVE, base(relay), code, False)
    assert got["error"] == "you declined"
    assert sender.finish() != 0
    assert "declined" in sender.output
    assert os.listdir(downloads) == []


SEND = MODULES + PATTERN_JS + """
const items = args[2].map(([path, size]) => size === null ? {path} : {path, file: fileOf(size, path.split('/').pop())});
const selection = sending.selectionFrom(items);
let registered;
const ready = new Promise((resolve) => { registered = resolve; });
window.sendingResult = (async () => {
  const statuses = [];
  try {
    const rv = await rendezvous.sendRendezvous({base: args[0], code: args[1], words,
      onStatus: (text, stage) => { if (stage === 'registered') registered(); }});
    const result = await sending.sendFiles(rv, selection, {onStatus: (s) => statuses.push(s)});
    return {result, statuses, verification: rv.verification};
  } catch (error) {
    registered();
    return {error: error.message, statuses};
  }
})();
await ready;
return selection.summary.topLevel;
"""


def test_sending_files_and_a_tree_to_peer_recv(relay, browser, peers, tmp_path):
    items = [["one.bin", 20 * MiB + 3], ["two name.txt", 5], ["tree/sub/c.bin", 70_000], ["tree/empty", None],
             ["tree/zero", 0]]
    code = generate_code()
    tops = run_js(browser, SEND, base(relay), code, items)
    assert tops == ["one.bin", "two name.txt", "tree"]
    out = tmp_path / "out"
    receiver = peers("recv", "--relay", f"ws://127.0.0.1:{relay.ws_port}/", "-y", "-o", f"{out}/", code, cwd=tmp_path)
    got = run_js(browser, "return await window.sendingResult;")
    assert "error" not in got, got
    assert got["result"] == {"files": 4, "bytes": 20 * MiB + 3 + 5 + 70_000}
    assert got["statuses"][-1] == "done"
    assert receiver.finish() == 0, receiver.output
    assert got["verification"] in receiver.output
    for path, size in items:
        if size is None:
            assert (out / path).is_dir() and not list((out / path).iterdir())
        else:
            assert (out / path).read_bytes() == pattern(size), path


def test_a_receiver_that_declines_stops_the_browser_sender(relay, browser, peers, tmp_path):
    code = generate_code()
    run_js(browser, SEND, base(relay), code, [["x.bin", 10]])
    # `peer recv` without -y asks; end of input answers no.
    receiver = peers("recv", "--relay", f"ws://127.0.0.1:{relay.ws_port}/", "-o", f"{tmp_path}/out/", code, cwd=tmp_path)
    got = run_js(browser, "return await window.sendingResult;")
    assert got.get("error", "").startswith("the receiver declined"), got
    assert receiver.finish() != 0
    assert not (tmp_path / "out" / "x.bin").exists()
