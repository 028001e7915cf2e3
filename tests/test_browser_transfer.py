"""The browser's data phase (peer/browser/lib/{messages,offer,transfer,zip}.js) against the
Python reference: messages byte for byte both ways, the same verdicts on good and hostile
offers, the sessions driven message by message, and ZIP archives Python's zipfile reads.
One headless Chromium for the whole file."""

from __future__ import annotations

import io
import json
import zipfile

import blake3
import pytest
from browser import app_server, browser_missing, chromium, run_js

from peer import messages as pm
from peer.errors import ProtocolError
from peer.offer import Offer, OfferEntry

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")

# Turns a decoded message into JSON: bytes as hex, BigInts as strings.
PLAIN = """
const plain = (value) => {
  if (value instanceof Uint8Array) return {hex: Array.from(value, b => b.toString(16).padStart(2, '0')).join('')};
  if (typeof value === 'bigint') return {big: value.toString()};
  if (Array.isArray(value)) return value.map(plain);
  if (value instanceof Set) return [...value].map(plain);
  if (value && typeof value === 'object') return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]));
  return value;
};
const fromHex = (hex) => Uint8Array.from(hex.match(/../g) || [], h => parseInt(h, 16));
const toHex = (u8) => Array.from(u8, b => b.toString(16).padStart(2, '0')).join('');
"""


@pytest.fixture(scope="module")
def page():
    with app_server() as origin, chromium() as driver:
        driver.get(origin + "/")
        yield driver


def js(page, body, *args):
    return run_js(page, PLAIN + body, *args)


# --- messages ------------------------------------------------------------------------------

PUBLIC = bytes(range(34))


def python_messages():
    return [
        pm.Hello(1, [], None),
        pm.Hello(1, ["big-records", "text", "unknown-size"], pm.public_digest(PUBLIC)),
        pm.Hello(7, ["x" * 32, "a-b"], None),
        pm.OfferPart(True, b"{" * 32765),
        pm.OfferPart(False, b"}"),
        pm.Answer(False, "the receiver said no"),
        pm.Answer(False, ""),
        pm.Answer(True),
        pm.Answer(True, "", [(3, 16 * 2**20), (2**32 - 1, 2**64 - 1)]),
        pm.FileStart(0, 0),
        pm.FileStart(2**32 - 1, 2**53 + 1),
        pm.Data(b"\x00\xff" * 100),
        pm.FileEnd(bytes(range(32))),
        pm.Done(),
        pm.Ack(2, 1234),
        pm.Ack(2**64 - 1, 0),
        pm.Error("disk full"),
        pm.Error("caf\u00e9 \u202e\x1b[31m"),
        pm.CompressedData(False, b"zz"),
        pm.Check(bytes(32)),
    ]


def expected_json(message):
    """What messages.js's decodeMessage should return for `message`, as PLAIN shows it."""
    num = lambda n: n if n <= 2**53 - 1 else {"big": str(n)}  # noqa: E731
    hexed = lambda b: {"hex": bytes(b).hex()}  # noqa: E731
    if isinstance(message, pm.Hello):
        return {"type": 1, "version": message.version, "capabilities": list(message.capabilities),
                "publicDigest": None if message.public_digest is None else hexed(message.public_digest)}
    if isinstance(message, pm.OfferPart):
        return {"type": 2, "more": message.more, "chunk": hexed(message.chunk)}
    if isinstance(message, pm.Answer):
        return {"type": 3, "accepted": message.accepted, "reason": message.reason,
                "resumePoints": [[i, num(o)] for i, o in message.resume_points]}
    if isinstance(message, pm.FileStart):
        return {"type": 4, "index": message.index, "offset": num(message.offset)}
    if isinstance(message, pm.Data):
        return {"type": 5, "data": hexed(message.data)}
    if isinstance(message, pm.FileEnd):
        return {"type": 6, "digest": hexed(message.digest)}
    if isinstance(message, pm.Done):
        return {"type": 7}
    if isinstance(message, pm.Ack):
        return {"type": 8, "fileCount": num(message.file_count), "totalBytes": num(message.total_bytes)}
    if isinstance(message, pm.Error):
        return {"type": 9, "reason": message.reason}
    if isinstance(message, pm.CompressedData):
        return {"type": 10, "more": message.more, "chunk": hexed(message.chunk)}
    if isinstance(message, pm.Check):
        return {"type": 11, "digest": hexed(message.digest)}
    raise AssertionError(message)


def test_javascript_decodes_what_python_encodes(page):
    messages = python_messages()
    decoded = js(page, """
        const m = await import('./lib/messages.js');
        return args[0].map(hex => plain(m.decodeMessage(fromHex(hex))));
    """, [message.encode().hex() for message in messages])
    for message, got in zip(messages, decoded):
        want = expected_json(message)
        if isinstance(message, pm.Error):
            want["reason"] = pm.Error.decode(memoryview(message.encode())[1:]).reason  # cleaned
        assert got == want, message


def test_python_decodes_what_javascript_encodes(page):
    encoded = js(page, """
        const m = await import('./lib/messages.js');
        const digest = m.publicDigest(Uint8Array.from({length: 34}, (_, i) => i));
        return [
          m.encodeHello({capabilities: ['big-records', 'text', 'unknown-size'], publicDigest: digest}),
          m.encodeHello(),
          m.encodeOfferPiece(true, new Uint8Array(32765).fill(0x7b)),
          m.encodeOfferPiece(false, fromHex('7d')),
          m.encodeAccept(),
          m.encodeDecline('the receiver said no'),
          m.encodeFileStart(4294967295, 2 ** 53 - 1),
          m.encodeData(fromHex('00ff00')),
          m.encodeData(new Uint8Array(262143), {big: true}),
          m.encodeFileEnd(Uint8Array.from({length: 32}, (_, i) => i)),
          m.encodeDone(),
          m.encodeAck(2, 1234),
          m.encodeError('disk full'),
          m.encodeError('\u00e9'.repeat(600)),
        ].map(toHex);
    """)
    want = [
        pm.Hello(1, ["big-records", "text", "unknown-size"], pm.public_digest(PUBLIC)),
        pm.Hello(1, [], None),
        pm.OfferPart(True, b"{" * 32765),
        pm.OfferPart(False, b"}"),
        pm.Answer(True),
        pm.Answer(False, "the receiver said no"),
        pm.FileStart(2**32 - 1, 2**53 - 1),
        pm.Data(b"\x00\xff\x00"),
        None,  # a big DATA: Python's Data.encode refuses big ones, decode_message takes it
        pm.FileEnd(bytes(range(32))),
        pm.Done(),
        pm.Ack(2, 1234),
        pm.Error("disk full"),
        pm.Error("\u00e9" * 600),
    ]
    for hexed, message in zip(encoded, want):
        data = bytes.fromhex(hexed)
        if message is None:
            assert pm.decode_message(data, big=True) == pm.Data(memoryview(bytes(262143)))
            continue
        assert data == message.encode(), message  # reasons cut at 1024 bytes alike
        assert pm.decode_message(data) == pm.decode_message(message.encode())


HOSTILE_MESSAGES = [
    b"",
    b"\x00",
    b"\x0c",
    b"PACK\x00\x00\x00\x02",
    b"\x01peer-relax\x00\x01\x00",
    b"\x01peer-relay\x00\x01",
    b"\x01peer-relay\x00\x01\x01",
    b"\x01peer-relay\x00\x01\x01\x05text",
    b"\x01peer-relay\x00\x01\x01\x04TEXT",
    b"\x01peer-relay\x00\x01\x01\x04t\xe9xt",
    b"\x01peer-relay\x00\x01\x00\x00",
    b"\x01peer-relay\x00\x01\x02\x20pub-" + b"0" * 28 + b"\x04text",
    b"\x01peer-relay\x00\x01\x01\x20pub-" + b"0" * 27 + b"A",
    b"\x02",
    b"\x02\x00",
    b"\x02\x02x",
    b"\x03",
    b"\x03\x02",
    b"\x03\x01\x00\x00\x00",
    b"\x03\x01\x00\x00\x00\x01" + bytes(11),
    b"\x03\x00" + b"x" * 1025,
    b"\x04" + bytes(11),
    b"\x04" + bytes(13),
    b"\x05",
    b"\x05" + bytes(32767),
    b"\x06" + bytes(31),
    b"\x07\x00",
    b"\x08" + bytes(15),
    b"\x09" + b"x" * 1025,
    b"\x0a\x01",
    b"\x0b" + bytes(33),
]


def test_the_same_messages_are_refused(page):
    verdicts = js(page, """
        const m = await import('./lib/messages.js');
        return args[0].map(hex => {
          try { m.decodeMessage(fromHex(hex)); return null; }
          catch (error) { return error instanceof m.ProtocolError ? error.message : 'WRONG ' + error; }
        });
    """, [data.hex() for data in HOSTILE_MESSAGES])
    for data, verdict in zip(HOSTILE_MESSAGES, verdicts):
        with pytest.raises(ProtocolError) as raised:
            pm.decode_message(data)
        assert verdict is not None, data
        assert verdict == str(raised.value), data


def test_a_big_data_message_only_under_big_records(page):
    verdicts = js(page, """
        const m = await import('./lib/messages.js');
        const big = new Uint8Array(262144); big[0] = 5;
        const tooBig = new Uint8Array(262145); tooBig[0] = 5;
        const bigOther = new Uint8Array(40000); bigOther[0] = 9;
        const tryIt = (u8, opts) => { try { return m.decodeMessage(u8, opts).data.length; } catch (e) { return e.message; } };
        return [tryIt(big, {big: true}), tryIt(big, {}), tryIt(tooBig, {big: true}), tryIt(bigOther, {big: true})];
    """)
    assert verdicts[0] == 262143
    for data, verdict in zip([bytes([5]) + bytes(262143), bytes([5]) + bytes(262144), bytes([9]) + bytes(39999)],
                             verdicts[1:]):
        with pytest.raises(ProtocolError) as raised:
            pm.decode_message(data, big=verdict != verdicts[1])
        assert verdict == str(raised.value)


def test_error_reasons_are_cleaned_as_python_cleans_them(page):
    bodies = [b"ok", b"a\x00b\x1b[2J", b"\xff\xfe", b"\xf0\x80", b"\xe2\x80\xae evil", b"\xef\xbb\xbfbom",
              "\u2066x\u2069\u061c\u200e".encode(), b"\xed\xa0\x80", b"tab\there\nnewline"]
    got = js(page, """
        const m = await import('./lib/messages.js');
        return args[0].map(hex => m.decodeMessage(fromHex('09' + hex)).reason);
    """, [body.hex() for body in bodies])
    assert got == [pm.decode_message(b"\x09" + body).reason for body in bodies]


# --- offers --------------------------------------------------------------------------------

def doc(entries=None, **extra):
    entries = [] if entries is None else entries
    files = [e for e in entries if isinstance(e, dict) and e.get("kind") == "file"]
    document = {"version": 1, "features": [], "file_count": len(files),
                "total_bytes": sum(e.get("size") or 0 for e in files if isinstance(e.get("size"), int)),
                "entries": entries}
    document.update(extra)
    return json.dumps(document, ensure_ascii=False).encode()


def f(path, size=1, **extra):
    return {"kind": "file", "path": path, "size": size, "executable": False, **extra}


def d(path, **extra):
    return {"kind": "dir", "path": path, **extra}


GOOD_OFFERS = [
    doc([f("a.txt")]),
    doc([d("photos"), f("photos/a.jpg", 1200), d("photos/empty"), f("notes.txt", 34)]),
    doc([f(".hidden", 0), d(".git"), d(".git/hooks"), f(".git/hooks/x", 5)]),
    doc([f("caf\u00e9", 3), f("cafe\u0301x", 3)]),
    doc([f("x", 2**53 - 1)]),
    doc([f("x", 5)], unknown_key={"anything": [1.5, None]}),
    doc([f("x", 5, id="0123abcd", executable=True)]),
    doc([d("d", size=99, executable="no")]),
    doc([f("x", 5)], skipped=["secret", "dir/other"]),
    doc([f("1:b", 1), f("CON", 1), f("x.", 1)]),
    doc([f("x", None)], features=["unknown-size"]),
    doc([], text="hello \u00e9", features=["text"]),
    b'{"version":1,"file_count":1.0,"total_bytes":5,"entries":[{"kind":"file","path":"x","size":5}]}',
    b'{"version":1,"file_count":true,"total_bytes":5,"entries":[{"kind":"file","path":"x","size":5}]}',
    b'{"version":1, "features":[], "file_count":1,"total_bytes":5,"entries":[{"kind":"file","path":"x","size":5,"id":null}]}',
    doc([f("\U0001f600/x" if False else "\U0001f600", 1)]),
    doc([f("y" * 255, 1)]),
    doc([d("a")] + [d("a/" + "b" * 200)] + [f("a/" + "b" * 200 + "/" + "c" * 200, 1)]),
    doc([f("x", 0)], version=2),  # any int version parses; the session refuses it
]

HOSTILE_OFFERS = [
    b"",
    b"not json",
    b"\xef\xbb\xbf" + doc([f("a")]),
    b"\xff" + doc([f("a")]),
    b"[]",
    b"null",
    b'{"features":[],"file_count":1,"total_bytes":1,"entries":[{"kind":"file","path":"x","size":1}]}',
    b'{"version":"1","file_count":1,"total_bytes":1,"entries":[{"kind":"file","path":"x","size":1}]}',
    b'{"version":1.0,"file_count":1,"total_bytes":1,"entries":[{"kind":"file","path":"x","size":1}]}',
    b'{"version":true,"file_count":1,"total_bytes":1,"entries":[{"kind":"file","path":"x","size":1}]}',
    doc([f("a")], features="text"),
    doc([f("a")], features=["Text"]),
    doc([f("a")], features=None),
    b'{"version":1,"file_count":0,"total_bytes":0,"entries":{"x":1}}',
    doc([]),
    doc(["file"]),
    doc([{"kind": "link", "path": "x"}]),
    doc([{"path": "x"}]),
    doc([{"kind": "file", "path": "x"}]),
    doc([f("x", -1)]),
    doc([f("x", 2**63)]),
    doc([f("x", "5")]),
    doc([f("x", True)]),
    b'{"version":1,"file_count":1,"total_bytes":5,"entries":[{"kind":"file","path":"x","size":5.0}]}',
    doc([f("x", 5, executable=None)]),
    doc([f("x", 5, executable=1)]),
    doc([f("x", 5, id="ABC")]),
    doc([f("x", 5, id="")]),
    doc([f("x", 5, id=5)]),
    doc([f("")]),
    doc([f("/etc/passwd")]),
    doc([f("../x")]),
    doc([f("a/../x")]),
    doc([d("a"), f("a//x")]),
    doc([f("./x")]),
    doc([f("a\\b")]),
    doc([f("C:x")]),
    doc([f("a\x00b")]),
    doc([f("a\x7fb")]),
    doc([f("a\u0085b")]),
    doc([f("invoice\u202efdp.exe")]),
    doc([f("a\u2028b")]),
    doc([f("a\u2066b")]),
    doc([f("a\u061cb")]),
    doc([f("y" * 256)]),
    doc([f("/".join(["y" * 200] * 21))]),
    b'{"version":1,"file_count":1,"total_bytes":1,"entries":[{"kind":"file","path":"\\ud800","size":1}]}',
    doc([f("x"), f("x")]),
    doc([f("caf\u00e9"), f("cafe\u0301")]),
    doc([f("a/b")]),
    doc([f("a"), f("a/b")]),
    doc([f("a/b"), d("a")]),
    doc([d("a"), d("a")]),
    doc([f("x", 5)], file_count=2),
    doc([f("x", 5)], total_bytes=4),
    doc([f("x", 5)], total_bytes="5"),
    doc([f("x", 5)], total_bytes=None),
    doc([f("x", 5)], skipped="secret"),
    doc([f("x", 5)], skipped=[1]),
    doc([f("x", 5)], text=5),
    doc([f("x", 5)], text="and entries"),
    doc([], text="x" * (1024 * 1024 + 1)),
    b'{"version":1,"file_count":0,"total_bytes":0,"entries":[],"text":"\\udc00"}',
    doc([f(f"f{i}", 0) for i in range(100_001)]),
    b'{"version":1,"file_count":0,"total_bytes":0,"entries":[],"x":"' + b'\\"kind\\"' * 10 + b'",'
    + b'"y":[' + b",".join([b'"kind"'] * 100_001) + b"]}",
    b"[" * 100_000 + b"]" * 100_000,
]


def python_verdict(data):
    try:
        offer, version, features = Offer.from_json(data)
    except ProtocolError as error:
        return None, str(error)
    return (offer, version, features), None


def test_offer_verdicts_match_python(page):
    documents = GOOD_OFFERS + HOSTILE_OFFERS
    results = js(page, """
        const o = await import('./lib/offer.js');
        return args[0].map(hex => {
          try {
            const {offer, version, features} = o.parseOffer(fromHex(hex));
            return {ok: {entries: offer.entries, fileCount: offer.fileCount, totalBytes: offer.totalBytes,
                         text: offer.text, skipped: offer.skipped, version, features}};
          } catch (error) {
            return {error: error.name + ': ' + error.message};
          }
        });
    """, [data.hex() for data in documents])
    for data, result in zip(documents, results):
        parsed, error = python_verdict(data)
        shown = data[:120]
        if parsed is None:
            assert "error" in result, (shown, error)
            assert result["error"].startswith("ProtocolError: "), (shown, result)
            continue
        assert "ok" in result, (shown, result)
        offer, version, features = parsed
        got = result["ok"]
        assert got["version"] == version and set(got["features"]) == set(features)
        assert (got["fileCount"], got["totalBytes"]) == (offer.file_count, offer.total_bytes)
        assert got["text"] == offer.text and got["skipped"] == list(offer.skipped)
        want = [{"kind": e.kind, "path": e.path, **({"size": e.size, "executable": e.executable}
                                                      if e.is_file else {})} for e in offer.entries]
        assert got["entries"] == want, shown


def test_offers_past_what_a_browser_counts_are_refused_with_a_reason(page):
    # The one known difference from Python: sizes past 2^53 (8 PiB), which no browser holds.
    data = doc([f("x", 2**53), f("y", 2**63 - 1 - 2**53)])
    assert python_verdict(data)[0] is not None
    error = js(page, """
        const o = await import('./lib/offer.js');
        try { o.parseOffer(fromHex(args[0])); return null; } catch (e) { return e.message; }
    """, data.hex())
    assert error == "the offer lists more bytes than a browser can count"


def test_name_problem_agrees_with_python(page):
    from peer.offer import name_problem
    names = ["a", "a/b", "", "/a", "a/", "a//b", ".", "..", "a/./b", ".a", "a\\b", "C:", "c:x", "1:x",
             "a\x01", "\u200f", "\u2069", "\u00e9", "x" * 4096, "x/" * 2048, "y" * 255 + "/z", "y" * 256,
             "\U0001f600" * 63, "\U0001f600" * 64, "a:b", "CON"]
    got = js(page, """
        const o = await import('./lib/offer.js');
        return args[0].map(name => o.nameProblem(name));
    """, names)
    assert got == [name_problem(name) for name in names]


def test_built_offers_are_what_python_writes(page):
    # Two files at the top, a tree with files before subdirectories, an empty directory.
    selection = ["b.txt", "a.txt", "photos/z.jpg", "photos/2021/x.jpg", "photos/a.jpg",
                 "photos/empty/", "\u00e9t\u00e9/\U0001f600.txt", "\u00e9t\u00e9/\uff5e.txt"]
    built = js(page, """
        const o = await import('./lib/offer.js');
        const selection = args[0].map((path, i) => path.endsWith('/')
          ? {path: path.slice(0, -1)}
          : {path, file: new File([new Uint8Array(i)], path.split('/').pop())});
        const {offer, files} = o.buildOffer(selection);
        return {document: new TextDecoder().decode(o.offerDocument(offer, {features: ['big-records']})),
                names: files.map(file => file && file.size)};
    """, selection)
    entries = [
        OfferEntry("file", "a.txt", 1), OfferEntry("file", "b.txt", 0),
        OfferEntry("dir", "photos"), OfferEntry("file", "photos/a.jpg", 4), OfferEntry("file", "photos/z.jpg", 2),
        OfferEntry("dir", "photos/2021"), OfferEntry("file", "photos/2021/x.jpg", 3),
        OfferEntry("dir", "photos/empty"),
        OfferEntry("dir", "\u00e9t\u00e9"), OfferEntry("file", "\u00e9t\u00e9/\uff5e.txt", 7),
        OfferEntry("file", "\u00e9t\u00e9/\U0001f600.txt", 6),
    ]
    assert built["document"].encode() == Offer(entries).to_json(features=["big-records"])
    assert built["names"] == [None if e.is_directory else e.size for e in entries]


def test_building_refuses_what_a_receiver_would(page):
    cases = [["a/../b"], ["x", "x"], ["a", "a/b"], ["a/b", "a"], ["caf\u00e9", "cafe\u0301"], ["a\u202eb"]]
    got = js(page, """
        const o = await import('./lib/offer.js');
        return args[0].map(paths => {
          try { o.buildOffer(paths.map(path => ({path, file: new File(['x'], 'x')}))); return null; }
          catch (error) { return error.message; }
        });
    """, cases)
    assert all(message and message.startswith("cannot send") for message in got), got


def test_the_summary_names_every_hidden_path(page):
    entries = [d("photos"), f("photos/a.jpg"), d("photos/.git"), d("photos/.git/hooks"),
               f("photos/.git/hooks/post"), d("photos/.empty"), f(".env", 3), f("notes", None)]
    data = doc(entries, features=["unknown-size"], skipped=["secret"])
    summary = js(page, """
        const o = await import('./lib/offer.js');
        const s = o.summarize(o.parseOffer(fromHex(args[0])).offer);
        return {topLevel: s.topLevel, hidden: s.hidden, skipped: s.skipped, fileCount: s.fileCount,
                totalBytes: s.totalBytes, sizesKnown: s.sizesKnown, topItems: s.topItems};
    """, data.hex())
    assert summary["topLevel"] == ["photos", ".env", "notes"]
    assert summary["hidden"] == ["photos/.git/hooks/post", "photos/.empty", ".env"]
    assert summary["skipped"] == ["secret"]
    assert (summary["fileCount"], summary["totalBytes"], summary["sizesKnown"]) == (4, 5, False)
    assert summary["topItems"][0] == {"name": "photos", "directory": True, "files": 2, "bytes": 2, "sizeKnown": True}
    # Python's prompt lists the same hidden paths.
    offer = Offer.from_json(data)[0]
    assert "photos/.git/hooks/post, photos/.empty, .env" in "\n".join(offer.listing())


# --- zip -----------------------------------------------------------------------------------

ZIP_JS = """
const z = await import('./lib/zip.js');
const chunks = [];
const writer = new z.ZipWriter(async (bytes) => { chunks.push(bytes.slice()); }, {zip64Threshold: args[1]});
for (const [kind, path, hex, declared] of args[0]) {
  if (kind === 'dir') { await writer.directory(path); continue; }
  const data = fromHex(hex);
  await writer.beginFile(path, declared === 'unknown' ? null : data.length);
  // In uneven pieces, as records arrive.
  for (let at = 0; at < data.length; at += 7777) await writer.write(data.subarray(at, at + 7777));
  await writer.endFile();
}
await writer.finish();
const size = chunks.reduce((sum, c) => sum + c.length, 0);
const all = new Uint8Array(size); let at = 0;
for (const c of chunks) { all.set(c, at); at += c.length; }
return toHex(all);
"""


def zip_in_browser(page, items, threshold=0xFFFFFFFF):
    return bytes.fromhex(js(page, ZIP_JS, items, threshold))


def zip_items():
    import random
    rng = random.Random(7)
    return [
        ["dir", "photos", "", None],
        ["file", "photos/a.jpg", rng.randbytes(30_000).hex(), None],
        ["dir", "photos/empty", "", None],
        ["dir", "photos/2021", "", None],
        ["file", "photos/2021/\u00e9t\u00e9 \U0001f600.txt", b"summer".hex(), None],
        ["file", "photos/zero", "", None],
        ["file", "notes.txt", (b"line\n" * 1000).hex(), "unknown"],
    ]


@pytest.mark.parametrize("threshold", [0xFFFFFFFF, 100], ids=["plain", "zip64-forced"])
def test_python_reads_the_zip_the_browser_writes(page, threshold):
    items = zip_items()
    data = zip_in_browser(page, items, threshold)
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None  # every CRC checked
    names = [info.filename for info in archive.infolist()]
    assert names == [path + "/" if kind == "dir" else path for kind, path, _, _ in items]
    for kind, path, hexed, _ in items:
        if kind == "dir":
            assert archive.getinfo(path + "/").is_dir()
        else:
            assert archive.read(path) == bytes.fromhex(hexed)
            assert archive.getinfo(path).compress_type == zipfile.ZIP_STORED
    assert all(info.flag_bits & 0x800 for info in archive.infolist())  # UTF-8 names
    has_zip64 = b"PK\x06\x06" in data and b"PK\x06\x07" in data
    assert has_zip64 == (threshold == 100)
    if threshold == 100:
        # Sizes and offsets past the threshold really are in ZIP64 extra fields.
        info = archive.getinfo("photos/a.jpg")
        assert info.extra[:2] == b"\x01\x00" and info.file_size == 30_000
    # The data descriptors agree with the central directory (what a streaming reader uses).
    for info in archive.infolist():
        if info.is_dir():
            continue
        end = data.index(b"PK\x07\x08", info.header_offset)
        crc = int.from_bytes(data[end + 4 : end + 8], "little")
        assert crc == info.CRC


def test_unzip_tests_the_zip_the_browser_writes(page, tmp_path):
    import shutil
    import subprocess
    if not shutil.which("unzip"):
        pytest.skip("unzip is not installed")
    for threshold in (0xFFFFFFFF, 100):
        path = tmp_path / f"t{threshold}.zip"
        path.write_bytes(zip_in_browser(page, zip_items(), threshold))
        result = subprocess.run(["unzip", "-t", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "No errors detected" in result.stdout, result.stdout + result.stderr


def test_crc32_matches_zlib(page):
    import random
    import zlib
    rng = random.Random(3)
    samples = [b"", b"a", rng.randbytes(7), rng.randbytes(8), rng.randbytes(1001), rng.randbytes(65_536 + 5)]
    got = js(page, """
        const z = await import('./lib/zip.js');
        return args[0].map(hex => { const d = fromHex(hex); return [z.crc32(d), z.crc32(d.subarray(3), z.crc32(d.subarray(0, 3)))]; });
    """, [s.hex() for s in samples])
    assert got == [[zlib.crc32(s), zlib.crc32(s)] for s in samples]


# --- the sessions, message by message against Python's ------------------------------------

def test_a_javascript_sender_session_talks_to_a_python_receiver_session(page):
    from peer import transfer
    receiver = transfer.ReceiverSession(features={"big-records", "text", "unknown-size", "resume", "zstd"},
                                        sender_public=PUBLIC)
    hello = receiver.hello()
    contents = {"a.txt": b"hello", "d/big": bytes(range(256)) * 1500, "d/e/zero": b""}
    accept_and_ack = []
    # Python's answers are known ahead: accept, then the ACK of 3 files.
    total = sum(len(v) for v in contents.values())
    accept_and_ack = [pm.Answer(True).encode().hex(), pm.Ack(3, total).encode().hex()]
    result = js(page, """
        const t = await import('./lib/transfer.js');
        const o = await import('./lib/offer.js');
        const {blake3} = await import('./vendor/noble.js');
        const contents = Object.fromEntries(Object.entries(args[1]).map(([k, v]) => [k, fromHex(v)]));
        const {offer} = o.buildOffer(Object.keys(contents).map(path => ({path, file: new File([contents[path]], 'x')})));
        const s = new t.SenderSession(offer, {publicBytes: Uint8Array.from({length: 34}, (_, i) => i)});
        const out = [];
        const events = [plain(s.receive(fromHex(args[0])))];
        out.push(...s.offerMessages());
        events.push(plain(s.receive(fromHex(args[2][0]))));
        for (let item = s.nextFile(); item; item = s.nextFile()) {
          out.push(s.beginFile());
          const data = contents[item.entry.path];
          for (let at = 0; at < data.length;) { const n = Math.min(s.dataRoom(), data.length - at); out.push(s.dataMessage(data.subarray(at, at + n))); at += n; }
          out.push(s.endFile(blake3(data)));
        }
        out.push(s.done());
        events.push(plain(s.receive(fromHex(args[2][1]))));
        return {messages: out.map(toHex), events, succeeded: s.succeeded, features: [...s.features]};
    """, hello.hex(), {k: v.hex() for k, v in contents.items()}, accept_and_ack)
    assert result["events"][0]["type"] == "hello"
    assert result["features"] == ["big-records"]  # neither zstd nor resume, though offered
    assert result["events"][1] == {"type": "accepted"}
    assert result["events"][2] == {"type": "completed", "fileCount": 3, "totalBytes": total}
    assert result["succeeded"]
    received = {}
    current = None
    event = None
    for hexed in result["messages"]:
        event = receiver.receive(bytes.fromhex(hexed))
        if isinstance(event, transfer.OfferReceived):
            assert [e.path for e in event.offer.entries] == ["a.txt", "d", "d/big", "d/e", "d/e/zero"]
            receiver.accept()
        elif isinstance(event, transfer.FileStarted):
            current = event.entry.path
            received[current] = b""
        elif isinstance(event, transfer.FileData):
            received[current] += bytes(event.data)
        elif isinstance(event, transfer.FileFinished):
            assert event.digest == blake3.blake3(received[current]).digest()
    assert isinstance(event, transfer.TransferDone)
    assert received == contents
    assert receiver.acknowledge().hex() == accept_and_ack[1]


def test_a_python_sender_session_talks_to_a_javascript_receiver_session(page):
    from peer import transfer
    hello = js(page, """
        const t = await import('./lib/transfer.js');
        return toHex(new t.ReceiverSession({senderPublic: Uint8Array.from({length: 34}, (_, i) => i)}).hello());
    """)
    entries = [OfferEntry("dir", "p"), OfferEntry("file", "p/a", 70_000), OfferEntry("file", "p/none", 0),
               OfferEntry("file", "top", 3)]
    contents = {"p/a": bytes(70_000), "p/none": b"", "top": b"abc"}
    sender = transfer.SenderSession(Offer(entries), features={"big-records", "text"}, public=PUBLIC)
    assert isinstance(sender.receive(bytes.fromhex(hello)), transfer.HelloReceived)
    assert sender.features == {"big-records", "text"}
    first = [m.hex() for m in sender.offer_messages()]
    sender.receive(pm.Answer(True).encode())
    rest = []
    while (entry := sender.next_file()) is not None:
        rest.append(sender.begin_file(entry).hex())
        data = contents[entry.path]
        at = 0
        while sender.file_remaining:
            buffer = sender.data_buffer()
            n = len(buffer)
            buffer[:n] = data[at : at + n]
            rest.append(bytes(sender.data_message(n)).hex())
            at += n
        rest.append(sender.end_file(blake3.blake3(data).digest()).hex())
    rest.append(sender.done().hex())
    result = js(page, """
        const t = await import('./lib/transfer.js');
        const r = new t.ReceiverSession({senderPublic: Uint8Array.from({length: 34}, (_, i) => i)});
        r.hello();
        const events = [];
        for (const hex of args[0]) events.push(plain(r.receive(fromHex(hex))));
        const accept = toHex(r.accept());
        const sizes = [];
        for (const hex of args[1]) {
          const event = r.receive(fromHex(hex));
          events.push(event.type);
          if (event.type === 'file-data') sizes.push(event.data.length);
        }
        return {events, accept, sizes, ack: toHex(r.acknowledge())};
    """, first, rest)
    assert result["events"][-1 - len(rest)]["type"] == "offer"
    assert result["accept"] == pm.Answer(True).encode().hex()
    assert max(result["sizes"]) > 32766  # big records, which it offered
    assert result["events"][-1] == "transfer-done"
    assert isinstance(sender.receive(bytes.fromhex(result["ack"])), transfer.Completed)


def test_the_receiver_session_refuses_what_python_refuses(page):
    """Driven message by message into a failure; the same verdict, and it stays failed."""
    offer = Offer([OfferEntry("file", "a", 5)]).to_json(features=["big-records"])
    pieces = [pm.OfferPart(False, offer).encode()]
    cases = [
        pieces + [pm.FileStart(1, 0).encode()],
        pieces + [pm.FileStart(0, 5).encode()],
        pieces + [pm.FileStart(0, 0).encode(), pm.Data(b"123456").encode()],
        pieces + [pm.FileStart(0, 0).encode(), pm.Data(b"1234").encode(), pm.FileEnd(bytes(32)).encode()],
        pieces + [pm.Done().encode()],
        pieces + [pm.FileStart(0, 0).encode(), pm.Check(bytes(32)).encode()],
        pieces + [pm.FileStart(0, 0).encode(), pm.CompressedData(False, b"x").encode()],
        [pm.OfferPart(False, Offer([OfferEntry("file", "a", 5)]).to_json(features=["zstd"])).encode()],
        [pm.OfferPart(False, Offer([OfferEntry("file", "a", None)]).to_json()).encode()],
        [pm.OfferPart(False, Offer([OfferEntry("file", "a", 5)]).to_json(version=2)).encode()],
        [pm.Ack(0, 0).encode()],
        [b"PACK\x00\x00\x00\x02"],
    ]
    got = js(page, """
        const t = await import('./lib/transfer.js');
        return args[0].map(messages => {
          const r = new t.ReceiverSession();
          r.hello();
          try {
            for (const hex of messages) { const e = r.receive(fromHex(hex)); if (e && e.type === 'offer') r.accept(); }
            return null;
          } catch (error) {
            let again = null;
            try { r.receive(fromHex('07')); } catch (e) { again = e.message; }
            return [error.name, error.message, again];
          }
        });
    """, [[m.hex() for m in case] for case in cases])
    from peer import transfer
    for case, verdict in zip(cases, got):
        receiver = transfer.ReceiverSession(features={"big-records", "text", "unknown-size"})
        receiver.hello()
        with pytest.raises(ProtocolError) as raised:
            for message in case:
                if isinstance(receiver.receive(message), transfer.OfferReceived):
                    receiver.accept()
        assert verdict is not None, case
        assert verdict[0] == "ProtocolError" and verdict[2] == verdict[1], verdict
        assert verdict[1] == str(raised.value)


def test_the_sender_session_checks_the_public_and_the_ack(page):
    got = js(page, """
        const t = await import('./lib/transfer.js');
        const m = await import('./lib/messages.js');
        const o = await import('./lib/offer.js');
        const {offer} = o.buildOffer([{path: 'a', file: new File(['abc'], 'a')}]);
        const mine = Uint8Array.from({length: 34}, (_, i) => i);
        const other = mine.slice(); other[33] ^= 1;
        const s = new t.SenderSession(offer, {publicBytes: mine});
        let altered;
        try { s.receive(m.encodeHello({capabilities: ['big-records'], publicDigest: m.publicDigest(other)})); }
        catch (e) { altered = [e.name, e.message]; }
        const s2 = new t.SenderSession(offer, {publicBytes: mine});
        s2.receive(m.encodeHello({capabilities: [], publicDigest: m.publicDigest(mine)}));
        s2.offerMessages(); s2.receive(m.encodeAccept());
        s2.beginFile(); s2.dataMessage(new Uint8Array(3)); s2.endFile(new Uint8Array(32)); s2.done();
        let wrongAck;
        try { s2.receive(m.encodeAck(1, 4)); } catch (e) { wrongAck = e.message; }
        return {altered, wrongAck, bigRoom: s2.maxData};
    """)
    assert got["altered"][0] == "HandshakeAltered"
    assert got["altered"][1].startswith("the relay altered the handshake")
    assert got["wrongAck"] == "the receiver confirmed 1 files and 4 bytes, but 1 files and 3 bytes were sent"
    assert got["bigRoom"] == 32766  # no big-records in that hello
