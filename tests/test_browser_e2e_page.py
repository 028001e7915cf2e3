"""The page's own helpers (peer/browser/ui/) against the Python peer they imitate: what a
receiver is shown about an offer, sizes, the cleaning of names from the other side, and the
review of a mistyped code must read the same in a browser as in `peer recv`.

One headless Chromium for the module, the page from tests/browser.py's app_server.
"""

from __future__ import annotations

import random

import pytest

from browser import app_server, browser_missing, chromium, run_js
from peer import codes
from peer.offer import DIRECTORY, FILE, MAX_LISTED, Offer, OfferEntry, format_size, printable

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")


@pytest.fixture(scope="module")
def page():
    with app_server() as origin, chromium() as driver:
        driver.get(origin + "/#receive")
        yield driver


def test_sizes_read_as_peer_recv_prints_them(page):
    rng = random.Random(14)
    sizes = [0, 1, 999, 1023, 1024, 1025, 1536, 10**6, 2**20 - 1, 2**20, 3 * 2**30, 2**40 + 5, 2**50 * 3,
             2**62] + [rng.randrange(2**rng.randrange(1, 60)) for _ in range(200)]
    got = run_js(page, "const f = await import('./ui/format.js'); return args[0].map(f.formatSize);", sizes)
    assert got == [format_size(size) for size in sizes]


def test_names_from_the_other_side_are_cleaned_like_the_prompt_does(page):
    hostile = ["invoice\u202efdp.exe", "a\nb\rc\x1b[31m", "tab\there", "\x7f\x85\x9f", "zero\u200bwidth",
               "line\u2028para\u2029", "arabic\u061cmark", "iso\u2066late\u2069", "lrm\u200erlm\u200f",
               "plain/é/名前.txt", "emoji 🎉"]
    got = run_js(page, "const f = await import('./ui/format.js'); return args[0].map(f.printable);", hostile)
    assert got == [printable(name) for name in hostile]


def _offer(paths: dict[str, int | None], skipped: tuple[str, ...] = ()) -> Offer:
    entries = [OfferEntry(DIRECTORY, path, 0) if size is None else OfferEntry(FILE, path, size)
               for path, size in paths.items()]
    return Offer(entries, skipped=skipped)


OFFERS = {
    "two items and a hidden file": _offer(
        {"photos": None, "photos/.meta": None, "photos/.meta/album.json": 2, "photos/a.jpg": 9 * 2**20,
         "photos/b.jpg": 3 * 2**20, "notes.md": 7}),
    "hidden paths everywhere": _offer(
        {".env": 10, "src": None, "src/.git": None, "src/.git/hooks": None, "src/.git/hooks/post-checkout": 99,
         "src/.empty": None, "src/main.py": 1000}),
    "more than twenty items": _offer({f"file-{i:02}.txt": i * 1000 for i in range(MAX_LISTED + 7)}),
    "more than ten hidden paths": _offer({"a": None, **{f"a/.h{i}": i for i in range(13)}, "b.txt": 1}),
    "skipped files": _offer({"docs": None, "docs/a.md": 5, "x.bin": 2**20}, skipped=("docs/secret", "docs/locked")),
}


@pytest.mark.parametrize("name", OFFERS)
def test_the_offer_lists_what_peer_recv_lists(page, name):
    offer = OFFERS[name]
    entries = [{"kind": "file" if e.is_file else "dir", "path": e.path, "size": e.size if e.is_file else None}
               for e in offer.entries]
    shown = run_js(page, """
        const { describe } = await import('./ui/listing.js');
        const d = describe(args[0], { skipped: args[1] });
        return { names: d.names.map((n) => (typeof n === 'string' ? n : `${n.name} (${n.detail})`)),
                 hidden: d.hidden, skipped: d.skipped, headline: d.headline };
    """, entries, list(offer.skipped))
    # peer recv's lines, in the page's words: a directory is a folder, and each line a sentence.
    expected = [line.strip().replace("(directory, ", "(folder, ") for line in offer.listing()]
    hidden = [line for line in expected if line.startswith("includes hidden paths: ")]
    skipped = [line for line in expected if line.startswith("the sender skipped ")]
    names = [line for line in expected if line not in hidden + skipped]
    assert shown["names"] == names
    assert shown["hidden"] == (hidden[0][0].upper() + hidden[0][1:] if hidden else "")
    assert shown["skipped"] == (skipped[0][0].upper() + skipped[0][1:] if skipped else "")
    plural = "" if offer.file_count == 1 else "s"
    assert shown["headline"] == f"{offer.file_count} file{plural}, {format_size(offer.total_bytes)}"


def test_a_mistyped_code_is_questioned_exactly_when_peer_recv_questions_it(page):
    typed = [
        "417-cobalt-lemon-unicycle",      # all known: tried
        "417-cobolt-lemon-unicycle",      # one typo: corrected
        "417-Cobolt lemno-unicycle",      # case, spaces, two typos
        "417-cobalt-lemon-zzzzzzzzz",     # no close word: questioned, no correction
        "417-xyzzy-plugh-frobozz",        # no known word: someone's own password
        "cobalt-lemno-unicycle",          # no nameplate: used as typed
        "417-cobalt-lemno",               # too few words for a code of ours
        "417-cobalt-lemno-unicycle-extra",
        "417-c0balt-lemon-unicycle",      # a digit inside: a chosen password
        "  99999-cobalt-lemno-unicycle  ",
        "",
    ]
    got = run_js(page, """
        const { loadWords } = await import('./lib/codes.js');
        const { reviewCode } = await import('./ui/review.js');
        const words = await loadWords();
        return args[0].map((text) => reviewCode(text, words));
    """, typed)
    for text, verdict in zip(typed, got):
        suspect = codes.review_code(text)
        if suspect is None:
            assert verdict is None, text
        else:
            assert verdict == {"unknown": list(suspect.unknown), "correction": suspect.correction}, text


def test_files_picked_before_the_page_started_are_kept(page):
    # A slow connection can show the file input before the modules run; a pick made then
    # fired its change event to nobody. The send view takes such files when it starts.
    summary = run_js(page, """
        const { SendView } = await import('./ui/send.js');
        const view = document.querySelector('[data-view="send"]').cloneNode(true);
        document.body.append(view);
        const picked = new DataTransfer();
        picked.items.add(new File(['twelve bytes'], 'early.txt'));
        picked.items.add(new File(['x'.repeat(2048)], 'second.bin'));
        view.querySelector('[data-role="send-files"]').files = picked.files;
        new SendView(view, { base: new URL('.', location.href).href });
        const block = view.querySelector('[data-role="selection"]');
        const result = [block.hidden, view.querySelector('[data-role="selection-summary"]').textContent,
                        view.querySelector('[data-role="send-files"]').files.length];
        view.remove();
        return result;
    """)
    assert summary == [False, "To send: 2 files, 2.0 KiB", 0]
