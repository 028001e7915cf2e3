"""Saving received bytes in headless Chromium (peer/browser/lib/saving.js and sw.js): a
stream handed to the service worker arrives as a regular download, whole, without a
partial file left; an aborted one leaves nothing under its name; several entries arrive as
one ZIP that Python reads. One Chromium for the file, downloading into a temporary folder."""

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
