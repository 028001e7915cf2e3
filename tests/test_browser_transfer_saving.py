"""Saving received bytes in headless Chromium (peer/browser/lib/saving.js and sw.js): bytes
handed to the service worker arrive as a regular download, whole, without a partial file
left; an aborted one, or one whose page closed, leaves nothing under its name; several
entries arrive as one ZIP that Python reads; the worker's port protocol hands buffers over
without copies, holds bytes back while the browser does not read, and reports a cancelled
read. One Chromium for the file, downloading into a temporary folder."""

from __future__ import annotations

import time
import zipfile

import pytest
from browser import app_server, browser_missing, chromium, run_js

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")

MiB = 1024 * 1024

# Chunk k of 256 KiB holds bytes (k * 31 + j) & 0xff: cheap in both languages, and a lost,
# repeated or reordered chunk changes the file.
PATTERN_JS = """
const chunkOf = (k, size) => { const c = new Uint8Array(size); for (let j = 0; j < size; j++) c[j] = (k * 31 + j) & 0xff; return c; };
"""


def pattern(size, chunk=256 * 1024):
    out = bytearray()
    k = 0
    while len(out) < size:
        n = min(chunk, size - len(out))
        out += bytes((k * 31 + j) & 0xFF for j in range(256)) * (n // 256) + bytes((k * 31 + j) & 0xFF for j in range(n % 256))
        k += 1
    return bytes(out)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def page(downloads):
    with app_server() as origin, chromium(downloads) as driver:
        driver.get(origin + "/")
        yield driver


def wait_for(predicate, what, seconds=60.0):
    """Polls `predicate` (bounded in time and count) until it returns something true."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds * 10)):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def settled(folder, name, size):
    path = folder / name
    partial = list(folder.glob("*.crdownload"))
    return path.exists() and path.stat().st_size == size and not partial


def test_a_streamed_download_arrives_whole(page, downloads):
    size = 20 * MiB
    result = run_js(page, PATTERN_JS + """
        const s = await import('./lib/saving.js');
        const download = await s.startDownload('twenty \u00e9.bin', args[0]);
        const before = performance.memory ? performance.memory.usedJSHeapSize : 0;
        let peak = 0;
        for (let k = 0; k * 262144 < args[0]; k++) {
          await download.write(chunkOf(k, Math.min(262144, args[0] - k * 262144)));
          if (performance.memory) peak = Math.max(peak, performance.memory.usedJSHeapSize - before);
        }
        await download.close();
        return {kind: download.constructor.name, peak};
    """, size)
    assert result["kind"] == "StreamDownload"  # the service worker, not the in-memory fallback
    wait_for(lambda: settled(downloads, "twenty \u00e9.bin", size), "the download")
    assert (downloads / "twenty \u00e9.bin").read_bytes() == pattern(size)


def test_an_aborted_download_leaves_nothing_under_its_name(page, downloads):
    run_js(page, PATTERN_JS + """
        const s = await import('./lib/saving.js');
        window.aborting = await s.startDownload('aborted.bin', 10 * 1048576);
        for (let k = 0; k < 12; k++) await window.aborting.write(chunkOf(k, 262144));
    """)
    # The download is under way: its partial file is there.
    wait_for(lambda: list(downloads.glob("*.crdownload")), "the partial download")
    run_js(page, "await window.aborting.abort('the sender went away');")
    # Chromium fails the download and deletes its partial file.
    wait_for(lambda: not list(downloads.glob("*.crdownload")), "the partial download to go")
    time.sleep(1)
    assert not (downloads / "aborted.bin").exists()
    assert not [p for p in downloads.iterdir() if "aborted" in p.name]


def test_without_a_service_worker_the_download_is_built_in_memory(page, downloads):
    # Where no service worker can run (some private windows), the bytes are kept as a Blob
    # and saved at the end: small transfers still work, just not in constant memory.
    origin = page.current_url
    page.get(origin)  # a fresh module graph: saving.js has not met the worker yet
    try:
        kind = run_js(page, PATTERN_JS + """
            delete Navigator.prototype.serviceWorker;
            const s = await import('./lib/saving.js');
            const download = await s.startDownload('in memory.bin', 3 * 262144 + 5);
            for (let k = 0; k < 4; k++) await download.write(chunkOf(k, k < 3 ? 262144 : 5));
            await download.close();
            return download.constructor.name;
        """)
    finally:
        page.get(origin)
    assert kind == "MemoryDownload"
    wait_for(lambda: settled(downloads, "in memory.bin", 3 * 262144 + 5), "the download")
    assert (downloads / "in memory.bin").read_bytes() == pattern(3 * 262144 + 5)


def test_a_worker_left_from_an_earlier_version_is_replaced_before_use(page, downloads):
    # A visitor of an earlier release still has that release's worker registered; the page
    # registers its own under a URL naming the protocol, which installs it, and uses it.
    origin = page.current_url
    page.get(origin)
    try:
        got = run_js(page, PATTERN_JS + """
            const old = await navigator.serviceWorker.register('./sw.js?protocol=0', {scope: './'});
            const installing = old.installing || old.waiting;
            if (installing) await new Promise(resolve => installing.addEventListener('statechange', () => { if (installing.state === 'activated') resolve(); }));
            const before = (await navigator.serviceWorker.getRegistration('./')).active.scriptURL;
            const s = await import('./lib/saving.js');
            const download = await s.startDownload('after upgrade.bin', 1000);
            await download.write(chunkOf(0, 1000));
            await download.close();
            const after = (await navigator.serviceWorker.getRegistration('./')).active.scriptURL;
            return {before, after, protocol: s.WORKER_PROTOCOL};
        """)
    finally:
        page.get(origin)
    assert got["before"].endswith("/sw.js?protocol=0")
    assert got["after"].endswith(f"/sw.js?protocol={got['protocol']}")
    wait_for(lambda: settled(downloads, "after upgrade.bin", 1000), "the download")
    assert (downloads / "after upgrade.bin").read_bytes() == pattern(1000)


def test_several_entries_arrive_as_one_zip(page, downloads):
    entries = [
        {"kind": "dir", "path": "album"},
        {"kind": "file", "path": "album/a.bin", "size": 300_000, "executable": False},
        {"kind": "dir", "path": "album/empty"},
        {"kind": "dir", "path": "album/sub"},
        {"kind": "file", "path": "album/sub/zero", "size": 0, "executable": False},
    ]
    saved = run_js(page, PATTERN_JS + """
        const s = await import('./lib/saving.js');
        const o = await import('./lib/offer.js');
        const entries = args[0];
        const summary = o.summarize({entries, fileCount: 2, totalBytes: 300000, skipped: [], text: null, sizesKnown: true});
        const saver = await s.prepareSaver(summary, {preferPicker: true, nameplate: '7'});
        for (const entry of entries) {
          if (entry.kind !== 'file') continue;
          await saver.openFile(entry);
          for (let at = 0, k = 0; at < entry.size; at += 262144, k++) await saver.write(chunkOf(k, Math.min(262144, entry.size - at)));
          await saver.commitFile(entry);
        }
        await saver.finish();
        return saver.savedAs;
    """, entries)
    assert saved == "album.zip"  # one top-level directory names the archive
    wait_for(lambda: (downloads / "album.zip").exists() and not list(downloads.glob("*.crdownload")), "the zip")
    archive = zipfile.ZipFile(downloads / "album.zip")
    assert archive.testzip() is None
    assert archive.namelist() == ["album/", "album/a.bin", "album/empty/", "album/sub/", "album/sub/zero"]
    assert archive.read("album/a.bin") == pattern(300_000)
    assert archive.read("album/sub/zero") == b""


def test_download_names(page):
    names = run_js(page, """
        const s = await import('./lib/saving.js');
        const f = (path) => ({kind: 'file', path, size: 1, executable: false});
        const d = (path) => ({kind: 'dir', path});
        const name = (entries) => s.downloadName({entries, topLevel: entries.filter(e => !e.path.includes('/')).map(e => e.path)}, '42');
        return [name([f('a.txt')]), name([d('x'), f('x/a')]), name([f('a'), f('b')]), name([d('x'), d('y')]),
                s.pickerAvailable()];
    """)
    assert names == ["a.txt", "x.zip", "peer-relay-42.zip", "peer-relay-42.zip", False]


# --- the service worker's port protocol (sw.js) ---------------------------------------------

# Registers a download with the service worker by hand and reads it with fetch, so the test
# decides when the "browser" reads.
BY_HAND_JS = """
await import('./lib/saving.js').then(s => s.startDownload('warm-up.bin', 0)).then(d => d.close());
const worker = (await navigator.serviceWorker.ready).active;
const register = async (id, size) => {
  const channel = new MessageChannel();
  const said = [];
  channel.port1.onmessage = ({data}) => said.push(data);
  worker.postMessage({type: 'download', id, name: id, size}, [channel.port2]);
  for (let i = 0; i < 100 && !said.length; i++) await new Promise(r => setTimeout(r, 20));
  return {port: channel.port1, said};
};
const settle = () => new Promise(r => setTimeout(r, 200));
"""


def test_taken_means_read_by_the_browser_and_chunks_are_handed_over(page):
    got = run_js(page, PATTERN_JS + BY_HAND_JS + """
        const {port, said} = await register('by-hand-1', 40 * 262144);
        const taken = () => said.filter(m => m.type === 'taken').reduce((sum, m) => sum + m.size, 0);
        const chunks = [];
        for (let k = 0; k < 40; k++) {
          const bytes = chunkOf(k, 262144);
          chunks.push(bytes);
          port.postMessage({type: 'chunk', bytes}, [bytes.buffer]);
        }
        const detached = chunks.filter(c => c.length).length;
        await settle();
        const beforeRequest = taken();
        const response = await fetch(`./download/by-hand-1`);
        await settle();
        const whileUnread = taken();
        port.postMessage({type: 'close'});
        const reader = response.body.getReader();
        let total = 0;
        for (;;) { const {value, done} = await reader.read(); if (done) break; total += value.length; }
        await settle();
        const again = await fetch(`./download/by-hand-1`);
        const back = said.filter(m => m.back).map(m => m.back);
        const returned = {count: back.length, intact: back.every((b, k) => b.length === 262144 && b[1] === chunkOf(k, 2)[1] && b[262143] === chunkOf(k, 262144)[262143])};
        return {detached, beforeRequest, whileUnread, total, taken: taken(), returned, said: said.map(m => m.type),
                length: response.headers.get('content-length'), again: again.status};
    """)
    assert got["detached"] == 0  # every buffer transferred, none copied
    assert got["beforeRequest"] == 0  # nothing counts as taken until the browser reads
    assert got["whileUnread"] <= 2 * MiB  # an idle reader holds the rest back in the worker
    assert got["total"] == got["taken"] == 40 * 262144 and got["length"] == str(40 * 262144)
    # read chunks come back to the page, in order, but for the last two (kept as a margin)
    assert got["returned"] == {"count": 38, "intact": True}
    assert got["said"][0] == "registered" and "started" in got["said"] and got["said"][-1] == "consumed"
    assert got["again"] == 404  # one request per download


def test_a_download_the_browser_stops_reading_tells_the_page(page):
    # What Chromium does when a person cancels the download in its UI: it cancels its read
    # of the body. The worker must say so, or the page would wait for reads forever.
    said = run_js(page, PATTERN_JS + BY_HAND_JS + """
        const {port, said} = await register('by-hand-2', null);
        for (let k = 0; k < 8; k++) { const bytes = chunkOf(k, 262144); port.postMessage({type: 'chunk', bytes}, [bytes.buffer]); }
        const response = await fetch(`./download/by-hand-2`);
        const reader = response.body.getReader();
        await reader.read();
        await reader.cancel();
        for (let i = 0; i < 100 && !said.some(m => m.type === 'cancelled'); i++) await settle();
        const bytes = chunkOf(9, 10);
        port.postMessage({type: 'chunk', bytes}, [bytes.buffer]);  // ignored from now on
        await settle();
        return said.map(m => m.type);
    """)
    assert said[-1] == "cancelled" and said.count("cancelled") == 1
    assert "consumed" not in said


def test_a_page_that_goes_away_fails_its_download(page, downloads):
    # A tab of its own, closed mid-download: the worker no longer finds it among its clients
    # and errors the stream (a page that merely goes quiet is given up after QUIET_LIMIT).
    first = page.current_window_handle
    origin = page.current_url
    page.switch_to.new_window("tab")
    try:
        page.get(origin)
        run_js(page, PATTERN_JS + """
            const s = await import('./lib/saving.js');
            window.orphan = await s.startDownload('orphan.bin', 10 * 1048576);
            for (let k = 0; k < 12; k++) await window.orphan.write(chunkOf(k, 262144));
        """)
        wait_for(lambda: list(downloads.glob("*.crdownload")), "the partial download")
        page.close()
    finally:
        page.switch_to.window(first)
    wait_for(lambda: not list(downloads.glob("*.crdownload")), "the partial download to go", seconds=30)
    time.sleep(1)
    assert not (downloads / "orphan.bin").exists()
