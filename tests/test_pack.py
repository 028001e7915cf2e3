"""bob's pack payload: decoding real git packs, encoding what git accepts, hostile input.

Packs are checked against the `git` command: it builds packs with real deltas for the
reader, and it indexes, unpacks and lists the packs the encoders make. Test packs
with deliberate defects are built by the small encoder below, written independently
of peer/pack.py so the two check each other.
"""

import hashlib
import os
import random
import re
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer import pack
from peer.pack import (
    Directory,
    FileData,
    PackEnd,
    PackError,
    PackLimits,
    PackReader,
    SingleFile,
    TreeEntry,
    directory_pack,
    single_file_records,
)
from peer.records import MAX_RECORD_SIZE
from peer.source import SourceError

# --- an independent little pack writer -------------------------------------------------

COMMIT, TREE, BLOB, TAG, OFS_DELTA, REF_DELTA = 1, 2, 3, 4, 6, 7


def header(kind: int, size: int) -> bytes:
    first = (kind << 4) | (size % 16)
    size //= 16
    rest = []
    while size:
        rest.append(size % 128)
        size //= 128
    out = [first | (0x80 if rest else 0)]
    for i, part in enumerate(rest):
        out.append(part | (0x80 if i < len(rest) - 1 else 0))
    return bytes(out)


def ofs_distance(distance: int) -> bytes:
    """Git's big-endian base-128 encoding with the +1 bias on each continuation."""
    out = [distance & 0x7F]
    distance >>= 7
    while distance:
        distance -= 1
        out.insert(0, 0x80 | (distance & 0x7F))
        distance >>= 7
    return bytes(out)


def delta_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def entry(kind: int, content: bytes) -> bytes:
    return header(kind, len(content)) + zlib.compress(content, 4)


def finish(body: bytes, count: int) -> bytes:
    data = b"PACK" + struct.pack(">II", 2, count) + body
    return data + hashlib.sha1(data).digest()


def build(*entries: bytes) -> bytes:
    return finish(b"".join(entries), len(entries))


def git_id(kind: str, content: bytes) -> bytes:
    return hashlib.sha1(b"%s %d\0" % (kind.encode(), len(content)) + content).digest()


def tree(*items: tuple[bytes, bytes, bytes]) -> bytes:
    return b"".join(b"%s %s\0%s" % (mode, name, oid) for mode, name, oid in items)


def root(name: bytes, tree_id: bytes, count: int = 3) -> bytes:
    return b"%s\0%s%d" % (name, tree_id, count)


def rooted(top: bytes, *more: bytes) -> bytes:
    """A directory pack named "d": its root object, the top tree `top`, then `more` entries."""
    return build(entry(COMMIT, root(b"d", git_id("tree", top))), entry(TREE, top), *more)


def single_pack(name: bytes, content: bytes) -> bytes:
    return build(entry(TAG, name), entry(BLOB, content))


def directory_of(*files: tuple[bytes, bytes], name: bytes = b"dir") -> bytes:
    """A flat directory pack: root first, then the tree, then the blobs."""
    blobs = [(n, c, git_id("blob", c)) for n, c in files]
    top = tree(*((b"100644", n, oid) for n, _, oid in blobs))
    top_id = git_id("tree", top)
    return build(entry(COMMIT, root(name, top_id)), entry(TREE, top), *(entry(BLOB, c) for _, c, _ in blobs))


# --- driving the reader ----------------------------------------------------------------


def decode(data: bytes, cuts=(), **options):
    """All events of `data` fed in pieces cut at `cuts`, with each file entry's content."""
    reader = PackReader(**options)
    events, contents = [], {}
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    try:
        for start, end in zip(points, points[1:]):
            reader.feed(data[start:end])
            while (event := reader.next_event()) is not None:
                events.append(event)
                if isinstance(event, TreeEntry) and event.kind == "file":
                    contents[event.path] = b"".join(reader.iter_blob(event.id))
        while (event := reader.next_event()) is not None:
            events.append(event)
        reader.eof()
    finally:
        reader.close()
    return events, contents


def single_content(events) -> bytes:
    assert isinstance(events[0], SingleFile)
    assert isinstance(events[-1], PackEnd)
    assert all(isinstance(e, FileData) for e in events[1:-1])
    return b"".join(e.data for e in events[1:-1])


def expect_error(data: bytes, pattern: str | None = None, **options) -> PackError:
    with pytest.raises(PackError, match=pattern) as caught:
        decode(data, **options)
    return caught.value


# --- git ------------------------------------------------------------------------------


def git(*args, cwd=None, input=None) -> bytes:
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, LC_ALL="C")
    done = subprocess.run(["git", *args], cwd=cwd, input=input, env=env, capture_output=True, timeout=60)
    if done.returncode:
        raise AssertionError(f"git {args[0]} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout


def git_tree(work: Path, git_dir: Path) -> str:
    """The id `git write-tree` gives the directory `work` (with a repository elsewhere)."""
    git("init", "-q", "--bare", str(git_dir))
    git(f"--git-dir={git_dir}", f"--work-tree={work}", "add", "-A", cwd=work)
    return git(f"--git-dir={git_dir}", "write-tree").decode().strip()


def ls_tree(git_dir: Path, tree_id: str) -> list[tuple[str, str, str, str]]:
    """(mode, type, id, path) of everything below the tree, as git lists it."""
    out = git(f"--git-dir={git_dir}", "ls-tree", "-r", "-t", "-z", tree_id)
    rows = []
    for line in out.decode("utf-8").split("\0"):
        if line:
            meta, path = line.split("\t", 1)
            mode, kind, oid = meta.split()
            rows.append((mode, kind, oid, path))
    return rows


def make_tree(work: Path) -> None:
    """Files that make git find deltas (two similar 200 KiB texts) and the usual cases."""
    rng = random.Random(7)
    words = [f"word{i}" for i in range(500)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    text = "\n".join(lines).encode()
    assert len(text) > 200 * 1024
    changed = lines[:]
    changed[100] = "a changed line"
    changed[2500:2502] = ["two", "more changes"]
    (work / "sub" / "deeper").mkdir(parents=True)
    (work / "big.txt").write_bytes(text)
    (work / "sub" / "big-edited.txt").write_bytes("\n".join(changed).encode())
    (work / "sub" / "deeper" / "noise.bin").write_bytes(rng.randbytes(10_000))
    (work / "sub" / "a.txt").write_bytes(b"same\n")
    (work / "same-as-a.txt").write_bytes(b"same\n")
    (work / "empty").write_bytes(b"")
    (work / ".dotfile").write_bytes(b"dot\n")
    (work / "caf\u00e9 \u00fcber.txt").write_bytes(b"unicode name\n")


@pytest.fixture(scope="module")
def git_source(tmp_path_factory):
    """A directory, its git tree id and listing, and git's own packs of it."""
    base = tmp_path_factory.mktemp("git")
    work = base / "photos"
    work.mkdir()
    make_tree(work)
    git_dir = base / "repo.git"
    tree_id = git_tree(work, git_dir)
    listing = ls_tree(git_dir, tree_id)
    names = "".join(f"{oid} {path}\n" for _, _, oid, path in listing)
    objects = (f"{tree_id}\n" + names).encode()
    packs = {}
    for flavour, extra in (("ofs", ["--delta-base-offset"]), ("ref", [])):
        packs[flavour] = git(
            f"--git-dir={git_dir}", "pack-objects", "--stdout", "--window=10", "--depth=50", *extra,
            input=objects,
        )
    return {"work": work, "git_dir": git_dir, "tree": tree_id, "listing": listing, "packs": packs}


def delta_types(git_pack: bytes, where: Path) -> dict[str, int]:
    """Object id -> raw pack type of each delta object, per `git verify-pack -v`."""
    path = where / f"check-{hashlib.sha1(git_pack).hexdigest()[:8]}.pack"
    path.write_bytes(git_pack)
    git("index-pack", str(path))
    found = {}
    for line in git("verify-pack", "-v", str(path)).decode().splitlines():
        fields = line.split()
        if len(fields) == 7 and re.fullmatch(r"[0-9a-f]{40}", fields[0]):
            offset = int(fields[4])
            found[fields[0]] = (git_pack[offset] >> 4) & 7
    return found


def bob_shaped(git_pack: bytes, tree_id: str, name: bytes = b"photos", root_first: bool = False) -> bytes:
    """git's objects plus bob's type-1 root object, re-counted and re-hashed.

    OFS_DELTA distances are relative, so moving every object by the root's length
    (root first) keeps them valid.
    """
    count = struct.unpack(">I", git_pack[8:12])[0]
    objects = git_pack[12:-20]
    root_entry = entry(COMMIT, root(name, bytes.fromhex(tree_id), 12))
    body = root_entry + objects if root_first else objects + root_entry
    return finish(body, count + 1)


# --- decoding git's packs ---------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["ofs", "ref"])
def test_git_made_deltas_of_the_expected_kind(git_source, flavour, tmp_path):
    deltas = delta_types(git_source["packs"][flavour], tmp_path)
    assert deltas, "git found no delta; the test files are not similar enough"
    assert set(deltas.values()) == {OFS_DELTA if flavour == "ofs" else REF_DELTA}


@pytest.mark.parametrize("flavour", ["ofs", "ref"])
@pytest.mark.parametrize("root_first", [False, True])
def test_reader_rebuilds_git_packs_with_deltas(git_source, flavour, root_first, tmp_path):
    data = bob_shaped(git_source["packs"][flavour], git_source["tree"], root_first=root_first)
    on_disk = PackLimits(memory_spool=0)
    events, contents = decode(data, cuts=range(0, len(data), 1000), temp_dir=tmp_path, limits=on_disk)
    assert isinstance(events[0], Directory) and isinstance(events[-1], PackEnd)
    entries = events[1:-1]
    expected = [
        ("photos/" + path, "dir" if kind == "tree" else "file", oid)
        for mode, kind, oid, path in git_source["listing"]
    ]
    assert [(e.path, e.kind, e.id.hex()) for e in entries] == expected
    work = git_source["work"]
    files = {e.path: e.size for e in entries if e.kind == "file"}
    assert files == {p: (work / p.split("/", 1)[1]).stat().st_size for p in files}
    assert contents == {p: (work / p.split("/", 1)[1]).read_bytes() for p in files}
    assert events[0] == Directory("photos", len(entries), len(files), sum(files.values()))
    assert not any(e.executable for e in entries)
    assert os.listdir(tmp_path) == []


def test_reader_offer_matches_the_events(git_source):
    data = bob_shaped(git_source["packs"]["ofs"], git_source["tree"])
    with PackReader() as reader:
        reader.feed(data)
        events = []
        while (event := reader.next_event()) is not None:
            events.append(event)
            if isinstance(event, Directory):
                offer = reader.offer()
    assert [e.path for e in offer.entries] == ["photos"] + [e.path for e in events[1:-1]]
    assert offer.total_bytes == events[0].total_size
    assert offer.entries[1:] == tuple(e.offer_entry() for e in events[1:-1])


# --- encoding, checked by git ---------------------------------------------------------


def test_directory_pack_matches_git(git_source, tmp_path):
    work = git_source["work"]
    made = directory_pack(work)
    assert made.name == "photos" and made.warnings == ()
    assert made.tree_id.hex() == git_source["tree"]
    listing = git_source["listing"]
    distinct = {oid for _, _, oid, _ in listing} | {git_source["tree"]}
    assert made.object_count == len(distinct) + 1  # + bob's root
    assert made.path_count == len(listing) + 1

    records = list(made.records())
    assert all(1 <= len(r) <= MAX_RECORD_SIZE for r in records)
    assert all(len(r) == MAX_RECORD_SIZE for r in records[:-1])
    data = b"".join(records)
    assert made.content_sent == made.content_size
    assert data[-20:] == hashlib.sha1(data[:-20]).digest()

    # git indexes the pack as is (its non-strict mode does not parse bob's fake commit),
    bare = tmp_path / "bare.git"
    git("init", "-q", "--bare", str(bare))
    git(f"--git-dir={bare}", "index-pack", "--stdin", input=data)
    assert ls_tree(bare, git_source["tree"]) == listing
    for _, kind, oid, path in listing:
        if kind == "blob":
            assert git(f"--git-dir={bare}", "cat-file", "blob", oid) == (work / path).read_bytes()
    # and the one type-1 object is bob's root: <name>\0<tree id><paths + 1>.
    (pack_file,) = (bare / "objects" / "pack").glob("*.pack")
    types = {}
    for line in git("verify-pack", "-v", str(pack_file)).decode().splitlines():
        fields = line.split()
        if len(fields) >= 5 and re.fullmatch(r"[0-9a-f]{40}", fields[0]):
            assert len(fields) == 5, "the encoder makes no deltas"
            types[fields[0]] = fields[1]
    commits = [oid for oid, kind in types.items() if kind == "commit"]
    assert len(commits) == 1 and len(types) == made.object_count
    assert git(f"--git-dir={bare}", "cat-file", "commit", commits[0]) == (
        b"photos\0" + bytes.fromhex(git_source["tree"]) + b"%d" % (made.path_count + 1)
    )

    events, contents = decode(data)
    assert [e.path for e in events[1:-1]] == ["photos/" + p for *_, p in listing]
    assert all(contents[p] == (work / p.split("/", 1)[1]).read_bytes() for p in contents)


def test_directory_pack_level_zero_and_small_records(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 5000)
    made = directory_pack(tmp_path / "d", "renamed")
    records = list(made.records(level=0, record_size=1000))
    assert all(1 <= len(r) <= 1000 for r in records)
    data = b"".join(records)
    assert len(data) > 5000  # stored, not compressed
    events, contents = decode(data)
    assert events[0].name == "renamed"
    assert contents == {"renamed/f": b"x" * 5000}


def test_directory_pack_skips_links_and_special_files_but_sends_dot_files(tmp_path):
    top = tmp_path / "top"
    (top / "empty-dir").mkdir(parents=True)
    (top / ".hidden").write_bytes(b"h")
    (top / "target").write_bytes(b"t")
    os.symlink("target", top / "link")
    os.mkfifo(top / "pipe")
    made = directory_pack(top)
    assert sorted(made.warnings) == [
        f"skipped {top / 'link'}: it is a symbolic link",
        f"skipped {top / 'pipe'}: it is a named pipe",
    ]
    events, contents = decode(b"".join(made.records()))
    assert [(e.path, e.kind) for e in events[1:-1]] == [
        ("top/.hidden", "file"),
        ("top/empty-dir", "dir"),
        ("top/target", "file"),
    ]
    assert events[2].id.hex() == "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # git's empty tree
    assert made.path_count == 4


def test_directory_pack_refuses_unsendable_names(tmp_path):
    top = tmp_path / "top"
    top.mkdir()
    (top / "bad\x01name").write_bytes(b"")
    with pytest.raises(SourceError, match="control character"):
        directory_pack(top)
    with pytest.raises(SourceError, match="'/'"):
        directory_pack(top, "a/b")


def test_directory_pack_notices_a_file_changed_after_hashing(tmp_path):
    top = tmp_path / "top"
    top.mkdir()
    (top / "f").write_bytes(b"before")
    made = directory_pack(top)
    (top / "f").write_bytes(b"after!")  # same size, other content
    with pytest.raises(SourceError, match="changed"):
        b"".join(made.records())
    (top / "f").write_bytes(b"longer now")
    with pytest.raises(SourceError, match="changed"):
        b"".join(made.records())


# --- single files ---------------------------------------------------------------------


def check_bob_chunking(records: list[bytes], name: bytes, size: int) -> None:
    """docs/protocol.md §8.2: each header alone, the trailer alone and last."""
    assert all(1 <= len(r) <= MAX_RECORD_SIZE for r in records)
    assert records[0] == b"PACK" + struct.pack(">II", 2, 2)
    assert records[1] == header(TAG, len(name))
    assert zlib.decompress(records[2]) == name
    assert records[3] == header(BLOB, size)
    data = records[4:-1]
    assert data, "a zlib stream is never empty"
    assert zlib.decompressobj().decompress(b"".join(data)) is not None
    assert records[-1] == hashlib.sha1(b"".join(records[:-1])).digest()


@pytest.mark.parametrize("size", [0, 1, 5 * 1024 * 1024])
def test_single_file_round_trip(size, tmp_path):
    rng = random.Random(size)
    content = (rng.randbytes(size // 2) + b"compressible " * (size // 26))[:size].ljust(size, b"z")
    chunks = [content[i : i + 100_000] for i in range(0, size, 100_000)]
    records = list(single_file_records("photo \u00e9.jpg", size, iter(chunks)))
    check_bob_chunking(records, "photo \u00e9.jpg".encode(), size)
    events, _ = decode(b"".join(records), cuts=range(7, size + 1000, 33_333))
    assert events[0] == SingleFile("photo \u00e9.jpg", size)
    assert single_content(events) == content
    assert all(len(e.data) <= 256 * 1024 for e in events[1:-1])

    # git agrees: the pack indexes and the blob id is git hash-object's.
    (tmp_path / "f").write_bytes(content)
    blob = git("hash-object", str(tmp_path / "f")).decode().strip()
    git("init", "-q", "--bare", str(tmp_path / "bare.git"))
    git(f"--git-dir={tmp_path / 'bare.git'}", "index-pack", "--stdin", input=b"".join(records))
    assert git(f"--git-dir={tmp_path / 'bare.git'}", "cat-file", "-s", blob) == b"%d\n" % size


def test_single_file_levels_and_record_size():
    content = os.urandom(50_000)
    for level in (0, 9):
        records = list(single_file_records("f", len(content), [content], level, record_size=2047))
        check_bob_chunking(records, b"f", len(content))
        assert all(len(r) <= 2047 for r in records)
        assert single_content(decode(b"".join(records))[0]) == content


def test_single_file_reads_its_chunks_lazily():
    pulled = []

    def chunks():
        for i in range(100):
            pulled.append(i)
            yield os.urandom(100_000)

    records = single_file_records("f", 10_000_000, chunks())
    assert not pulled
    first = [next(records) for _ in range(5)]
    assert len(first[4]) == MAX_RECORD_SIZE and len(pulled) == 1
    rest = list(records)
    assert len(pulled) == 100 and len(rest[-1]) == 20


def test_single_file_size_must_match_the_chunks():
    with pytest.raises(SourceError, match="ended after 3 of its announced 5"):
        list(single_file_records("f", 5, [b"abc"]))
    sent = []
    with pytest.raises(SourceError, match="grew past"):
        for record in single_file_records("f", 5, [b"abc", b"defg"]):
            sent.append(record)
    assert b"".join(sent[4:]) == b""  # nothing of the second chunk went out


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\0b", "/etc/passwd", "bell\x07", "C:evil"])
def test_single_file_encoder_refuses_bad_names(name):
    with pytest.raises(ValueError):
        single_file_records(name, 0, [])


@pytest.mark.parametrize(
    "name",
    [b"", b".", b"..", b"a/b", b"../x", b"a\0b", b"/etc/passwd", b"\xff\xfe", b"esc\x1b[2J", b"x" * 300],
)
def test_reader_refuses_hostile_file_names(name):
    expect_error(single_pack(name, b"content"), "the file name")


def test_single_file_pack_shape_is_enforced():
    expect_error(build(entry(TAG, b"a"), entry(BLOB, b"x"), entry(BLOB, b"y")), "holds 2 objects")
    expect_error(build(entry(TAG, b"a"), entry(TREE, b"")), "not a blob")
    expect_error(build(entry(TAG, b"n" * 5000), entry(BLOB, b"")), "file name is 5000 bytes")


def test_byte_at_a_time_from_memoryviews():
    for data in (single_pack(b"f", b"0123456789" * 50), directory_of((b"a", b"x" * 3000), (b"b", b""))):
        reader = PackReader()
        events = []
        with memoryview(data) as view:
            for i in range(len(view)):
                reader.feed(view[i : i + 1])
                while (event := reader.next_event()) is not None:
                    events.append(event)
        reader.eof()
        reader.close()
        whole, _ = decode(data)
        assert isinstance(events[-1], PackEnd)
        assert summary(events, {}) == summary(whole, {})


@pytest.mark.parametrize("size", [256 * 1024 - 1, 256 * 1024, 256 * 1024 + 1, 512 * 1024, 300_000])
def test_stream_end_in_the_call_that_fills_the_output(size):
    """zlib may report the end of a stream in the same call whose output is capped;
    the input it used must still be counted right (CPython leaves a stale tail)."""
    content = bytes(size // 2) + b"ab" * (size // 4)
    content = content.ljust(size, b"c")
    data = directory_of((b"big", content), (b"after", b"next object"))
    for cuts in ((), range(0, len(data), 1000), (40, 41)):
        _, contents = decode(data, cuts=cuts)
        assert contents == {"dir/after": b"next object", "dir/big": content}
    events, _ = decode(single_pack(b"f", content))
    assert single_content(events) == content


# --- damaged and hostile packs ------------------------------------------------------------


def test_corrupted_trailer():
    good = single_pack(b"f", b"data")
    expect_error(good[:-1] + bytes([good[-1] ^ 1]), "SHA-1 trailer")
    bad_dir = directory_of((b"a", b"1"))
    expect_error(bad_dir[:-1] + bytes([bad_dir[-1] ^ 1]), "SHA-1 trailer")


def test_truncated_stream_is_an_error_at_eof():
    good = directory_of((b"a", b"1" * 1000), (b"b", b"2"))
    for cut in (0, 3, 12, 13, 40, len(good) - 21, len(good) - 1):
        reader = PackReader()
        reader.feed(good[:cut])
        while reader.next_event() is not None:
            pass
        with pytest.raises(PackError, match="ended early"):
            reader.eof()
        reader.close()


def test_data_after_the_trailer():
    good = single_pack(b"f", b"data")
    expect_error(good + b"x", "after the pack's SHA-1 trailer")
    reader = PackReader()
    reader.feed(good)
    while reader.next_event() is not None:
        pass
    with pytest.raises(PackError, match="after"):
        reader.feed(b"more")


def test_bad_signature_version_and_types():
    expect_error(b"PAKC" + bytes(8), "no PACK signature")
    expect_error(b"HTTP/1.1 200", "no PACK signature")
    expect_error(b"PACK" + struct.pack(">II", 3, 0) + bytes(20), "version 3")
    expect_error(build(entry(COMMIT, b"x"), header(5, 1) + zlib.compress(b"x")), "unknown type 5")
    expect_error(build(), "no objects")
    expect_error(b"PACK" + struct.pack(">II", 2, 2**31), "over the")


def test_declared_size_must_match_the_inflated_size():
    expect_error(build(entry(TAG, b"f"), header(BLOB, 10) + zlib.compress(b"short")), "inflates to 5 bytes")
    expect_error(build(entry(TAG, b"f"), header(BLOB, 3) + zlib.compress(b"long")), "more than its declared 3")
    expect_error(build(header(COMMIT, 1) + zlib.compress(b"too long")), "more than its declared 1")


def test_bad_zlib():
    expect_error(build(entry(TAG, b"f"), header(BLOB, 4) + b"not zlib at all"), "corrupt zlib")


def test_object_count_mismatch():
    two = entry(TAG, b"f") + entry(BLOB, b"x")
    expect_error(finish(two, 3), "holds 2 objects")
    expect_error(finish(entry(COMMIT, b"x") + entry(BLOB, b"x"), 3))  # the trailer is read as an object
    expect_error(finish(entry(COMMIT, b"x") + entry(BLOB, b"x"), 1), "SHA-1 trailer")


def delta(base_size: int, result_size: int, *instructions: bytes) -> bytes:
    return delta_varint(base_size) + delta_varint(result_size) + b"".join(instructions)


def copy(offset: int, size: int) -> bytes:
    opcode, args = 0x80, b""
    for i in range(4):
        if (offset >> (8 * i)) & 0xFF:
            opcode |= 1 << i
            args += bytes([(offset >> (8 * i)) & 0xFF])
    for i in range(3):
        if (size >> (8 * i)) & 0xFF:
            opcode |= 0x10 << i
            args += bytes([(size >> (8 * i)) & 0xFF])
    return bytes([opcode]) + args


def insert(data: bytes) -> bytes:
    return bytes([len(data)]) + data


def delta_directory(instructions: bytes, base: bytes = b"hello world", distance: int | None = None) -> bytes:
    """root, tree (file 'f' = the delta's result), base blob, OFS_DELTA on that blob."""
    result = apply_delta(base, instructions)
    top = tree((b"100644", b"f", git_id("blob", result)))
    entries = [entry(COMMIT, root(b"d", git_id("tree", top))), entry(TREE, top), entry(BLOB, base)]
    base_offset = 12 + len(entries[0]) + len(entries[1])
    delta_offset = base_offset + len(entries[2])
    distance = delta_offset - base_offset if distance is None else distance
    compressed = zlib.compress(instructions)
    entries.append(header(OFS_DELTA, len(instructions)) + ofs_distance(distance) + compressed)
    return build(*entries)


def apply_delta(base: bytes, instructions: bytes) -> bytes:
    """What the reader should build; for well-formed deltas only (else empty)."""
    try:
        position = 0

        def varint():
            nonlocal position
            value = shift = 0
            while True:
                byte = instructions[position]
                position += 1
                value |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    return value

        varint()
        varint()
        out = b""
        while position < len(instructions):
            op = instructions[position]
            position += 1
            if op & 0x80:
                offset = size = 0
                for i in range(4):
                    if op & (1 << i):
                        offset |= instructions[position] << (8 * i)
                        position += 1
                for i in range(3):
                    if op & (0x10 << i):
                        size |= instructions[position] << (8 * i)
                        position += 1
                out += base[offset : offset + (size or 0x10000)]
            else:
                out += instructions[position : position + op]
                position += op
        return out
    except IndexError:
        return b""


def test_handmade_delta_resolves():
    instructions = delta(11, 16, copy(6, 5), insert(b", big "), copy(0, 5))
    events, contents = decode(delta_directory(instructions))
    assert contents == {"d/f": b"world, big hello"}


@pytest.mark.parametrize(
    "instructions, message",
    [
        (delta(12, 5, copy(0, 5)), "expects a base of 12 bytes"),
        (delta(11, 6, copy(0, 5)), "builds 5 bytes, its header says 6"),
        (delta(11, 4, copy(0, 5)), "more than its declared 4"),
        (delta(11, 5, copy(8, 5)), "copies bytes 8..13"),
        (delta(11, 2, insert(b"abc")), "more than its declared 2"),
        (delta(11, 1, b"\x00"), "reserved instruction 0"),
        (delta(11, 5, b"\x05ab"), "middle of an instruction"),
        (delta(11, 3, b"\x91"), "middle of an instruction"),
    ],
)
def test_bad_delta_instructions(instructions, message):
    expect_error(delta_directory(instructions), message)


def test_delta_base_outside_the_pack():
    instructions = delta(11, 5, copy(0, 5))
    expect_error(delta_directory(instructions, distance=10**6), "outside the pack")
    expect_error(delta_directory(instructions, distance=0), "outside the pack")
    expect_error(delta_directory(instructions, distance=3), "where no object starts")
    first = header(OFS_DELTA, len(instructions)) + ofs_distance(1) + zlib.compress(instructions)
    expect_error(build(first), "outside the pack")


def test_ref_delta_to_a_missing_base():
    instructions = delta(11, 5, copy(0, 5))
    orphan = header(REF_DELTA, len(instructions)) + b"\x42" * 20 + zlib.compress(instructions)
    expect_error(build(entry(COMMIT, root(b"d", bytes(20))), orphan), "not in the pack")


def test_delta_chain_resolves_in_any_order():
    """REF_DELTA bases after their deltas, and a delta on a delta."""
    base = b"0123456789" * 10
    first = delta(100, 20, copy(0, 10), copy(50, 10))
    middle = apply_delta(base, first)
    second = delta(20, 20, copy(5, 15), insert(b"-tail"))
    final = apply_delta(middle, second)
    top = tree((b"100644", b"base", git_id("blob", base)), (b"100644", b"final", git_id("blob", final)))
    data = build(
        entry(COMMIT, root(b"d", git_id("tree", top))),
        header(REF_DELTA, len(second)) + git_id("blob", middle) + zlib.compress(second),
        header(REF_DELTA, len(first)) + git_id("blob", base) + zlib.compress(first),
        entry(TREE, top),
        entry(BLOB, base),
    )
    _, contents = decode(data)
    assert contents == {"d/base": base, "d/final": final}


@pytest.mark.parametrize(
    "name, message",
    [
        (b"..", "'..' component"),
        (b".", "'.' component"),
        (b"", "is empty"),
        (b"a/b", "'/'"),
        (b"tab\there", "control character"),
        (b"\xc3\x28", "not valid UTF-8"),
        (b"C:", "drive letter"),
    ],
)
def test_hostile_tree_entries(name, message):
    blob = git_id("blob", b"x")
    top = tree((b"100644", name, blob))
    data = rooted(top, entry(BLOB, b"x"))
    expect_error(data, message)


def test_a_nul_in_a_tree_name_cannot_smuggle_anything():
    """A NUL ends a tree entry's name, so the rest is read as the id: nothing matches."""
    blob = git_id("blob", b"x")
    top = b"100644 evil\0name\0" + blob
    data = rooted(top, entry(BLOB, b"x"))
    expect_error(data, "no blob")


@pytest.mark.parametrize(
    "mode, message",
    [
        (b"120000", "symbolic link"),
        (b"160000", "submodule"),
        (b"100664", "unknown mode"),
        (b"644", "unknown mode"),
    ],
)
def test_unsupported_tree_modes(mode, message):
    blob = git_id("blob", b"x")
    top = tree((mode, b"f", blob))
    data = rooted(top, entry(BLOB, b"x"))
    expect_error(data, message)


def test_executable_mode_is_accepted():
    blob = git_id("blob", b"#!/bin/sh\n")
    top = tree((b"100755", b"run", blob))
    data = rooted(top, entry(BLOB, b"#!/bin/sh\n"))
    events, _ = decode(data)
    assert events[1].executable and events[1].path == "d/run"


def test_tree_problems():
    blob = git_id("blob", b"x")
    twice = tree((b"100644", b"f", blob), (b"100644", b"f", blob))
    expect_error(rooted(twice, entry(BLOB, b"x")), "twice")
    missing = tree((b"100644", b"f", b"\x01" * 20))
    expect_error(rooted(missing), "no blob")
    wrong_kind = tree((b"40000", b"f", blob))
    expect_error(rooted(wrong_kind, entry(BLOB, b"x")), "no tree")
    cut = tree((b"100644", b"f", blob))[:-3]
    expect_error(rooted(cut), "cut short")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"no nul", "no NUL"),
        (b"d\0short", "not <name>"),
        (b"d\0" + bytes(20) + b"x", "not <name>"),
        (b"..\0" + bytes(20) + b"3", "'..' component"),
        (b"a/b\0" + bytes(20) + b"3", "'/'"),
        (b"d\0" + bytes(20) + b"3", "no tree"),
    ],
)
def test_bad_root_objects(content, message):
    expect_error(build(entry(COMMIT, content), entry(TREE, b"")), message)


def test_no_root_object():
    expect_error(build(entry(TREE, b""), entry(BLOB, b"x")), "root object")


def test_zip_bomb_is_held_to_its_declared_size():
    small = PackLimits(max_object_size=1000)
    expect_error(directory_of((b"zeros", bytes(2_000_000))), "over the 1000-byte limit", limits=small)
    zeros = zlib.compress(bytes(2_000_000))
    lying = rooted(tree((b"100644", b"f", git_id("blob", bytes(1000)))), header(BLOB, 1000) + zeros)
    expect_error(lying, "inflates to more than its declared 1000 bytes")


def test_deltas_past_the_identification_budget_show_no_size_until_extracted():
    many_copies = delta(11, 11 * 20_000, *([copy(0, 11)] * 20_000))
    data = delta_directory(many_copies)
    with PackReader(limits=PackLimits(max_identified=100_000)) as reader:
        reader.feed(data)
        directory = reader.next_event()
        assert isinstance(directory, Directory)
        sizes = [entry.size for entry in reader.offer().files]
        assert None in sizes and reader.most_bytes >= 11 * 20_000
        assert reader.spooled == len(data) - 20  # nothing inflated: the pack as it came
        rest = []
        while (event := reader.next_event()) is not None:
            rest.append(event)
            if isinstance(event, TreeEntry) and event.size == 11 * 20_000:
                assert b"".join(reader.iter_blob(event.id)) == b"hello world" * 20_000
    assert isinstance(rest[-1], PackEnd)
    assert sorted(e.size for e in rest[:-1] if e.kind == "file") == sorted(s or 11 * 20_000 for s in sizes)
    # Within the budget (the default), the same delta is identified before the decision.
    events, _ = decode(data)
    assert events[0].total_size == sum(e.size for e in events[1:-1] if e.kind == "file")


def test_tree_bomb_is_stopped():
    """Each level names the one below 50 times: 50**4 paths from a few hundred bytes."""
    content = b"x" * 100
    blob = git_id("blob", content)
    level = tree(*((b"100644", b"f%02d" % i, blob) for i in range(50)))
    trees = [level]
    for _ in range(3):
        below = git_id("tree", trees[-1])
        trees.append(tree(*((b"40000", b"d%02d" % i, below) for i in range(50))))
    data = rooted(trees[-1], *(entry(TREE, t) for t in trees[:-1]), entry(BLOB, content))
    assert len(data) < 2000
    expect_error(data, "over 10000 entries", limits=PackLimits(max_entries=10_000))
    expect_error(data, "trees hold over 5000 bytes", limits=PackLimits(max_described=5000))
    expect_error(data, "trees down to", limits=PackLimits(max_tree_size=3000))


def spool_fds(directory: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_spool_file_is_gone_after_close(tmp_path):
    data = directory_of((b"a", os.urandom(300_000)), (b"b", b"small"))
    limits = PackLimits(memory_spool=1000)
    # Closed after success,
    reader = PackReader(temp_dir=tmp_path, limits=limits)
    reader.feed(data)
    events = []
    while (event := reader.next_event()) is not None:
        events.append(event)
    assert isinstance(events[-1], PackEnd)
    assert len(spool_fds(tmp_path)) == 2  # the pack as it came, then inflated
    reader.close()
    assert spool_fds(tmp_path) == [] and os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):
        reader.feed(b"x")
    # after a failure in the middle,
    reader = PackReader(temp_dir=tmp_path, limits=limits)
    reader.feed(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(PackError):
        while reader.next_event() is not None:
            pass
    assert len(spool_fds(tmp_path)) == 1
    reader.close()
    assert spool_fds(tmp_path) == [] and os.listdir(tmp_path) == []
    # and when the stream stopped early.
    with PackReader(temp_dir=tmp_path, limits=limits) as reader:
        reader.feed(data[:200_000])
        assert reader.next_event() is None
        with pytest.raises(PackError, match="ended early"):
            reader.eof()
    assert spool_fds(tmp_path) == [] and os.listdir(tmp_path) == []


def test_errors_are_sticky_and_blobs_need_a_directory():
    reader = PackReader()
    reader.feed(b"NOPE")
    with pytest.raises(PackError) as first:
        reader.next_event()
    with pytest.raises(PackError) as again:
        reader.next_event()
    assert again.value is first.value
    with pytest.raises(PackError):
        reader.feed(b"more")
    with pytest.raises(RuntimeError):
        reader.iter_blob(bytes(20))
    reader.close()


def test_iter_blob_refuses_unknown_ids():
    data = directory_of((b"a", b"content"))
    with PackReader() as reader:
        reader.feed(data)
        event = reader.next_event()
        assert isinstance(event, Directory)
        with pytest.raises(RuntimeError):
            reader.iter_blob(b"\x00" * 20)  # nothing is inflated before the decision
        tree_entry = reader.next_event()
        with pytest.raises(KeyError):
            reader.iter_blob(b"\x00" * 20)
        assert b"".join(reader.iter_blob(tree_entry.id)) == b"content"


# --- properties ----------------------------------------------------------------------------


class Samples(dict):
    """Packs for the property tests, with a short repr for hypothesis's reports."""

    def __repr__(self) -> str:
        return f"<packs {', '.join(f'{k}: {len(v)} bytes' for k, v in self.items())}>"


@pytest.fixture(scope="module")
def sample_packs(git_source):
    single = b"".join(single_file_records("s.bin", 70_000, [random.Random(1).randbytes(70_000)]))
    return Samples(
        git=bob_shaped(git_source["packs"]["ofs"], git_source["tree"]),
        ours=b"".join(directory_pack(git_source["work"]).records()),
        single=single,
    )


def summary(events, contents):
    """What must not depend on how the stream was cut (FileData pieces may)."""
    kept = [e for e in events if not isinstance(e, FileData)]
    return kept, contents, b"".join(e.data for e in events if isinstance(e, FileData))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["git", "ours", "single"]), cuts=st.lists(st.integers(0, 10**6), max_size=40))
def test_any_split_decodes_the_same(sample_packs, which, cuts):
    data = sample_packs[which]
    assert summary(*decode(data, cuts=cuts)) == summary(*decode(data))


@settings(max_examples=150, deadline=None)
@given(garbage=st.binary(max_size=300), prefix=st.sampled_from([b"", b"PACK", b"PACK\0\0\0\x02\0\0\0\x02"]))
def test_garbage_raises_only_pack_errors(garbage, prefix):
    with pytest.raises(PackError):
        decode(prefix + garbage)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.sampled_from(["git", "ours", "single"]),
    position=st.integers(0, 10**6),
    flip=st.integers(1, 255),
    cut=st.booleans(),
)
def test_any_damage_is_a_pack_error(sample_packs, which, position, flip, cut):
    data = sample_packs[which]
    position %= len(data)
    if cut:
        damaged = data[:position]
    else:
        damaged = data[:position] + bytes([data[position] ^ flip]) + data[position + 1 :]
    with pytest.raises(PackError):
        decode(damaged)


def test_a_tree_delta_is_resolved_before_the_decision_within_bounds():
    """A tree sent as a delta on another tree is rebuilt in memory to describe the offer;
    its instructions count 32 times against max_described (a Python step each)."""
    first = tree((b"100644", b"a", git_id("blob", b"alpha")))
    second = first + tree((b"100644", b"b", git_id("blob", b"beta")))
    top = tree((b"40000", b"in", git_id("tree", second)))
    instructions = delta(len(first), len(second), copy(0, len(first)), insert(second[len(first) :]))
    objects = [entry(COMMIT, root(b"d", git_id("tree", top))), entry(TREE, top), entry(TREE, first)]
    distance = len(objects[-1])
    objects.append(header(OFS_DELTA, len(instructions)) + ofs_distance(distance) + zlib.compress(instructions))
    objects += [entry(BLOB, b"alpha"), entry(BLOB, b"beta")]
    data = build(*objects)
    with PackReader() as reader:
        reader.feed(data)
        directory = reader.next_event()
        assert directory == Directory("d", 3, 2, 9)
        assert reader.spooled <= len(data)
    events, contents = decode(data)
    assert contents == {"d/in/a": b"alpha", "d/in/b": b"beta"}
    tight = PackLimits(max_described=32 * len(instructions) - 1)
    expect_error(data, "tree deltas hold over", limits=tight)
