"""The page's own BLAKE3 (peer/browser/lib/blake3.js) against Python's blake3 (bindings to
the official Rust implementation) and the vendored @noble/hashes blake3, in Chromium: every length around the block (64 B), chunk
(1 KiB) and tree boundaries, fed whole and in pieces of many sizes, at aligned and unaligned
offsets (the two ways it reads words), so that a wrong flag, counter or merge shows up."""

from __future__ import annotations

import blake3
import pytest
from browser import app_server, browser_missing, chromium, run_js
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")

# The same bytes on both sides without shipping them: byte i of the pattern.
PATTERN_JS = "const pattern = (n) => { const b = new Uint8Array(n); for (let i = 0; i < n; i++) b[i] = (i * 31 + (i >> 8)) & 255; return b; };"
TO_HEX = "const toHex = (u8) => Array.from(u8, b => b.toString(16).padStart(2, '0')).join('');"


def pattern(n: int) -> bytes:
    return bytes((i * 31 + (i >> 8)) & 255 for i in range(n))


LENGTHS = sorted({0, 1, 3, 4, 5, 63, 64, 65, 127, 128, 129, 960, 1023, 1024, 1025, 1088,
                  2047, 2048, 2049, 3071, 3072, 3073, 4095, 4096, 4097, 5120, 7169, 8191,
                  8192, 8193, 16384, 31744, 65535, 65536, 65537, 100_000, 1_048_575,
                  1_048_576, 1_048_577, 3 * 1_048_576 + 17})
PIECES = [0, 1, 7, 63, 64, 65, 130, 500, 1024, 1027, 4096, 65536]  # 0: the whole input in one update
OFFSETS = [0, 1, 2, 4]


@pytest.fixture(scope="module")
def page():
    with app_server() as origin, chromium() as driver:
        driver.get(origin + "/")
        driver.set_script_timeout(120)
        yield driver


def hash_in_page(page, cases):
    """Digests of (length, offset, piece) cases, by lib/blake3.js and by noble."""
    return run_js(page, PATTERN_JS + TO_HEX + """
        const {Blake3} = await import('./lib/blake3.js');
        const {blake3} = await import('./vendor/noble.js');
        const longest = Math.max(...args[0].map(([length, offset]) => length + offset));
        const source = pattern(longest);
        return args[0].map(([length, offset, piece]) => {
          // the pattern from byte 0, placed at `offset` in a fresh buffer
          const data = new Uint8Array(length + offset).subarray(offset);
          data.set(source.subarray(0, length));
          const hash = new Blake3();
          if (!piece) hash.update(data);
          else for (let at = 0; at < length; at += piece) hash.update(data.subarray(at, at + piece));
          return [toHex(hash.digest()), toHex(blake3(data))];
        });
    """, cases)


def test_every_boundary_every_piece_size_every_alignment(page):
    cases = [[length, offset, piece] for length in LENGTHS for offset in OFFSETS for piece in PIECES
             if piece == 0 or length // max(piece, 1) < 20_000]
    expected = {length: blake3.blake3(pattern(length)).hexdigest() for length in LENGTHS}
    got = hash_in_page(page, cases)
    assert len(got) == len(cases) > 1000
    wrong = [(case, ours) for case, (ours, noble) in zip(cases, got, strict=True)
             if ours != expected[case[0]] or noble != expected[case[0]]]
    assert not wrong, wrong[:5]


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=12),
       st.integers(min_value=0, max_value=3))
def test_any_split_gives_the_digest_of_the_whole(page, pieces, offset):
    total = sum(pieces)
    got = run_js(page, PATTERN_JS + TO_HEX + """
        const {Blake3} = await import('./lib/blake3.js');
        const [pieces, offset] = args;
        const total = pieces.reduce((a, b) => a + b, 0);
        const data = new Uint8Array(total + offset).subarray(offset);
        data.set(pattern(total));
        const hash = new Blake3();
        let at = 0;
        for (const n of pieces) { hash.update(data.subarray(at, at + n)); at += n; }
        return toHex(hash.digest());
    """, pieces, offset)
    assert got == blake3.blake3(pattern(total)).hexdigest()


def test_a_finished_hash_refuses_more(page):
    got = run_js(page, """
        const {Blake3} = await import('./lib/blake3.js');
        const hash = new Blake3();
        hash.update(new Uint8Array(10));
        hash.digest();
        const refused = [];
        for (const act of [() => hash.update(new Uint8Array(1)), () => hash.digest()]) {
          try { act(); refused.push(false); } catch (error) { refused.push(String(error.message)); }
        }
        return refused;
    """)
    assert all(got) and "already finished" in got[0]
