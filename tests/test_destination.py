"""Receiver safety: hostile names, symlink escapes, no overwrite, temporary files, verification."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections import namedtuple
from pathlib import Path

import blake3
import pytest

from peer import destination as destination_module
from peer.destination import Destination, DestinationError, IntegrityError
from peer.errors import ProtocolError
from peer.offer import DIRECTORY, FILE, Offer, OfferEntry
from peer.partfile import PART_SUFFIX

HOSTILE = ["../x", "/etc/passwd", "a/../../b", "..", "C:\\x", "a\\..\\b", "a\0b", "c:x", "./a", "a/./b", "", "a//b"]


@pytest.fixture(autouse=True)
def named_at_commit(monkeypatch):
    """These tests look at each file right after its commit: with no batch to wait for, it is
    named there (how batches of small files are named is tests/test_small_files.py's)."""
    monkeypatch.setattr(destination_module, "SYNC_BATCH_BYTES", 0)


def file_entry(path: str, size: int = 0, executable: bool = False) -> OfferEntry:
    return OfferEntry(FILE, path, size, executable)


def dir_entry(path: str) -> OfferEntry:
    return OfferEntry(DIRECTORY, path)


# Stands in for an Offer that skipped validation, to show the destination's own check.
UncheckedOffer = namedtuple("UncheckedOffer", "entries total_bytes")


def digest(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def receive(destination: Destination, entry: OfferEntry, data: bytes) -> Path:
    part = destination.open_part(entry)
    part.write(data)
    return destination.commit(part, digest(data))


def leftovers(root: Path) -> list[str]:
    return [name for _, _, names in os.walk(root) for name in names if name.endswith(PART_SUFFIX)]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_never_become_an_offer(name):
    with pytest.raises(ValueError):
        Offer([file_entry(name, 1)])
    document = {"version": 1, "entries": [{"kind": "file", "path": name, "size": 1}], "file_count": 1, "total_bytes": 1}
    with pytest.raises(ProtocolError, match="invalid offer: the name"):
        Offer.from_json(json.dumps(document).encode())


@pytest.mark.parametrize("name", HOSTILE)
def test_destination_rejects_hostile_names_on_its_own(tmp_path, name):
    destination = Destination(tmp_path)
    with pytest.raises(DestinationError, match="refusing the name"):
        destination.plan(UncheckedOffer([file_entry(name, 1)], 1))
    assert os.listdir(tmp_path) == []


def test_symlink_escape_is_rejected(tmp_path):
    outside = tmp_path / "outside"
    root = tmp_path / "root"
    outside.mkdir()
    root.mkdir()
    (root / "link").symlink_to(outside)
    (root / "inner").mkdir()
    (root / "alias").symlink_to(root / "inner")
    destination = Destination(root)
    offer = Offer([dir_entry("link"), file_entry("link/x", 1)])
    with pytest.raises(DestinationError, match="outside"):
        destination.plan(offer)
    with pytest.raises(DestinationError, match="outside"):
        destination.plan(Offer([dir_entry("link")]))
    # A symlink that stays inside the destination is just a directory (to merge into).
    paths = Destination(root, merge=True).plan(Offer([dir_entry("alias"), file_entry("alias/y", 1)]))
    assert paths == [root / "alias", root / "alias" / "y"]
    assert os.listdir(outside) == []


def test_an_existing_symlink_at_a_file_name_is_replaced_not_followed(tmp_path):
    outside = tmp_path / "secret"
    outside.write_bytes(b"keep me")
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").symlink_to(outside)
    offer = Offer([file_entry("a", 3)])
    with pytest.raises(DestinationError, match="already exists"):
        Destination(root).plan(offer)
    destination = Destination(root, overwrite=True)
    destination.plan(offer)
    receive(destination, offer.entries[0], b"new")
    assert not (root / "a").is_symlink()
    assert (root / "a").read_bytes() == b"new"
    assert outside.read_bytes() == b"keep me"


def test_no_overwrite_by_default(tmp_path):
    (tmp_path / "a").write_bytes(b"old")
    offer = Offer([file_entry("a", 3)])
    with pytest.raises(DestinationError, match="a already exists in .*; not overwriting it"):
        Destination(tmp_path).plan(offer)
    destination = Destination(tmp_path, overwrite=True)
    destination.plan(offer)
    receive(destination, offer.entries[0], b"new")
    assert (tmp_path / "a").read_bytes() == b"new"


def test_a_file_appearing_during_the_transfer_is_not_overwritten(tmp_path):
    offer = Offer([file_entry("a", 3)])
    destination = Destination(tmp_path)
    destination.plan(offer)
    part = destination.open_part(offer.entries[0])
    part.write(b"new")
    (tmp_path / "a").write_bytes(b"someone else's")
    with pytest.raises(DestinationError, match="appeared during the transfer"):
        destination.commit(part, digest(b"new"))
    assert (tmp_path / "a").read_bytes() == b"someone else's"
    assert leftovers(tmp_path) == []


def test_kind_conflicts(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(DestinationError, match="a directory of that name exists"):
        Destination(tmp_path, overwrite=True).plan(Offer([file_entry("d", 1)]))
    with pytest.raises(DestinationError, match="a file of that name exists"):
        Destination(tmp_path, overwrite=True).plan(Offer([dir_entry("f"), file_entry("f/x", 1)]))
    # An existing directory is merged into only when asked (--merge, or --overwrite).
    with pytest.raises(DestinationError, match="d already exists.*--merge"):
        Destination(tmp_path).plan(Offer([dir_entry("d"), file_entry("d/new", 1)]))
    Destination(tmp_path, merge=True).plan(Offer([dir_entry("d"), file_entry("d/new", 1)]))


def test_final_name_appears_only_after_commit(tmp_path):
    offer = Offer([dir_entry("d"), file_entry("d/a", 6)])
    destination = Destination(tmp_path)
    assert destination.plan(offer) == [tmp_path / "d", tmp_path / "d" / "a"]
    assert os.listdir(tmp_path) == []  # planning writes nothing
    part = destination.open_part(offer.entries[1])
    part.write(b"abc")
    assert not (tmp_path / "d" / "a").exists()
    assert part.part_path.parent == tmp_path / "d"
    assert part.part_path.name.startswith("a.") and part.part_path.name.endswith(PART_SUFFIX)
    assert stat.S_IMODE(os.stat(part.part_path).st_mode) == 0o600
    part.write(memoryview(b"defgh")[:3])
    assert not (tmp_path / "d" / "a").exists()
    assert destination.commit(part, digest(b"abcdef")) == tmp_path / "d" / "a"
    assert (tmp_path / "d" / "a").read_bytes() == b"abcdef"
    assert leftovers(tmp_path) == []


def test_wrong_hash_is_discarded(tmp_path):
    offer = Offer([file_entry("a", 3)])
    destination = Destination(tmp_path)
    destination.plan(offer)
    part = destination.open_part(offer.entries[0])
    part.write(b"abc")
    with pytest.raises(IntegrityError, match="a arrived corrupted"):
        destination.commit(part, digest(b"abd"))
    assert os.listdir(tmp_path) == []


def test_short_file_is_discarded(tmp_path):
    offer = Offer([file_entry("a", 3)])
    destination = Destination(tmp_path)
    destination.plan(offer)
    part = destination.open_part(offer.entries[0])
    part.write(b"ab")
    with pytest.raises(DestinationError, match="received 2 of 3 bytes"):
        destination.commit(part, digest(b"ab"))
    assert os.listdir(tmp_path) == []


def test_too_much_data_is_refused(tmp_path):
    offer = Offer([file_entry("a", 3)])
    destination = Destination(tmp_path)
    destination.plan(offer)
    part = destination.open_part(offer.entries[0])
    with pytest.raises(DestinationError, match="more data than the offered 3 bytes"):
        part.write(b"abcd")
    assert os.listdir(tmp_path) == []


def test_abort_removes_parts_and_new_empty_directories_but_keeps_committed_files(tmp_path):
    (tmp_path / "mine").mkdir()
    offer = Offer(
        [
            dir_entry("mine"),
            file_entry("mine/done", 2),
            dir_entry("new"),
            dir_entry("new/deep"),
            file_entry("new/deep/partial", 5),
        ]
    )
    destination = Destination(tmp_path, merge=True)
    destination.plan(offer)
    receive(destination, offer.entries[1], b"ok")
    part = destination.open_part(offer.entries[4])
    part.write(b"par")
    assert part.part_path.exists()
    destination.abort()
    assert not part.part_path.exists()
    assert sorted(os.listdir(tmp_path)) == ["mine"]
    assert os.listdir(tmp_path / "mine") == ["done"]
    destination.abort()  # twice is harmless


def test_disk_full_is_a_clear_error_and_removes_the_part(tmp_path, monkeypatch):
    offer = Offer([file_entry("big", 10)])
    destination = Destination(tmp_path)
    destination.plan(offer)
    part = destination.open_part(offer.entries[0])

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(destination_module.os, "write", full)
    with pytest.raises(DestinationError, match="^cannot write big: disk full$"):
        part.write(b"0123456789")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_a_failure_in_the_background_write_surfaces_at_the_next_write(tmp_path, monkeypatch):
    # Gathered megabytes are written by a worker thread; its failure must still reach the
    # caller (at a later write, at the latest when the file is complete) and clean up.
    size = 3 << 20
    offer = Offer([file_entry("big", size)])
    destination = Destination(tmp_path)
    destination.plan(offer)
    part = destination.open_part(offer.entries[0])
    real_write = os.write
    calls = []

    def fail_after_the_first(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(destination_module.os, "write", fail_after_the_first)
    record = bytes(32 * 1024)
    with pytest.raises(DestinationError, match="^cannot write big: disk full$"):
        for _ in range(size // len(record)):
            part.write(record)
    monkeypatch.undo()
    assert len(calls) == 2
    assert os.listdir(tmp_path) == []


def test_gathered_writes_arrive_whole_and_in_order(tmp_path):
    data = os.urandom((3 << 20) + 12345)
    offer = Offer([file_entry("f", len(data))])
    destination = Destination(tmp_path)
    destination.plan(offer)
    part = destination.open_part(offer.entries[0])
    for start in range(0, len(data), 32767):
        part.write(data[start:start + 32767])
    destination.commit(part, blake3.blake3(data).digest())
    assert (tmp_path / "f").read_bytes() == data


def test_not_enough_space_is_caught_while_planning(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(destination_module.shutil, "disk_usage", lambda path: usage(100, 90, 10))
    with pytest.raises(DestinationError, match="not enough space in .*: 11 B offered, 10 B free"):
        Destination(tmp_path).plan(Offer([file_entry("a", 11)]))


def test_missing_destination(tmp_path):
    with pytest.raises(DestinationError, match="no such file or directory"):
        Destination(tmp_path / "nope").plan(Offer([file_entry("a")]))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DestinationError, match="not a directory"):
        Destination(tmp_path / "file").plan(Offer([file_entry("a")]))


def test_modes_follow_the_offer_and_the_umask_with_keep_modes(tmp_path):
    offer = Offer([file_entry("run", 2, True), file_entry("data", 2)])
    destination = Destination(tmp_path, keep_modes=True)
    destination.plan(offer)
    receive(destination, offer.entries[0], b"#!")
    receive(destination, offer.entries[1], b"{}")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "data").st_mode) == 0o666 & ~umask


def test_finish_creates_empty_directories(tmp_path):
    offer = Offer([dir_entry("top"), dir_entry("top/empty"), dir_entry("top/with"), file_entry("top/with/f", 1)])
    destination = Destination(tmp_path)
    destination.plan(offer)
    with pytest.raises(RuntimeError):
        destination.finish()
    receive(destination, offer.entries[3], b"x")
    assert not (tmp_path / "top" / "empty").exists()
    destination.finish()
    assert (tmp_path / "top" / "empty").is_dir()
    assert (tmp_path / "top" / "with" / "f").read_bytes() == b"x"


def test_longest_names_still_get_a_temporary_name(tmp_path):
    name = "é" * 127  # 254 bytes
    offer = Offer([file_entry(name, 1)])
    destination = Destination(tmp_path)
    destination.plan(offer)
    assert receive(destination, offer.entries[0], b"z") == tmp_path / name


def test_unplanned_entries_are_refused(tmp_path):
    destination = Destination(tmp_path)
    destination.plan(Offer([file_entry("a", 1)]))
    with pytest.raises(RuntimeError):
        destination.open_part(file_entry("b", 1))
    receive(destination, file_entry("a", 1), b"1")
    with pytest.raises(RuntimeError):
        destination.open_part(file_entry("a", 1))


# --- what to do with names that exist: refuse, overwrite, rename ------------------------------


@pytest.mark.parametrize(
    "name, number, directory, expected",
    [
        ("report.pdf", 1, False, "report (1).pdf"),
        ("report.pdf", 12, False, "report (12).pdf"),
        ("logs.tar.gz", 2, False, "logs (2).tar.gz"),
        (".bashrc", 1, False, ".bashrc (1)"),
        ("photos.2024", 1, True, "photos.2024 (1)"),
        ("noext", 3, False, "noext (3)"),
        ("é" * 127 + ".txt", 1, False, "é" * 123 + " (1).txt"),
    ],
)
def test_numbered_names(name, number, directory, expected):
    result = destination_module.numbered_name(name, number, directory=directory)
    assert result == expected
    assert len(result.encode()) <= 255


def test_rename_saves_a_file_beside_the_existing_one(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"old")
    (tmp_path / "a (1).txt").write_bytes(b"older")
    offer = Offer([file_entry("a.txt", 3)])
    destination = Destination(tmp_path, rename=True)
    assert destination.plan(offer) == [tmp_path / "a (2).txt"]
    assert receive(destination, offer.entries[0], b"new") == tmp_path / "a (2).txt"
    assert destination.renamed == {"a.txt": "a (2).txt"}
    assert (tmp_path / "a.txt").read_bytes() == b"old"
    assert (tmp_path / "a (2).txt").read_bytes() == b"new"
    with pytest.raises(ValueError):
        Destination(tmp_path, rename=True, overwrite=True)


def test_rename_moves_a_whole_tree_and_never_picks_an_offered_name(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"mine")
    # The sender also offers "d (1)", so the renamed "d" must skip that name.
    offer = Offer([dir_entry("d"), file_entry("d/x", 3), dir_entry("d/empty"), file_entry("d (1)", 1)])
    destination = Destination(tmp_path, rename=True)
    paths = destination.plan(offer)
    assert paths[:3] == [tmp_path / "d (2)", tmp_path / "d (2)" / "x", tmp_path / "d (2)" / "empty"]
    assert paths[3] == tmp_path / "d (1)"
    receive(destination, offer.entries[1], b"new")
    receive(destination, offer.entries[3], b"1")
    destination.finish()
    assert (tmp_path / "d" / "x").read_bytes() == b"mine"
    assert (tmp_path / "d (2)" / "x").read_bytes() == b"new"
    assert (tmp_path / "d (2)" / "empty").is_dir()
    assert (tmp_path / "d (1)").read_bytes() == b"1"


def test_rename_takes_the_next_name_if_one_appears_during_the_transfer(tmp_path):
    offer = Offer([file_entry("a.txt", 3), dir_entry("d"), file_entry("d/f", 1)])
    destination = Destination(tmp_path, rename=True)
    destination.plan(offer)
    part = destination.open_part(offer.entries[0])
    part.write(b"new")
    (tmp_path / "a.txt").write_bytes(b"someone else's")
    (tmp_path / "d").mkdir()  # appears before our directory is created
    assert destination.commit(part, digest(b"new")) == tmp_path / "a (1).txt"
    assert receive(destination, offer.entries[2], b"f") == tmp_path / "d (1)" / "f"
    destination.finish()
    assert (tmp_path / "a.txt").read_bytes() == b"someone else's"
    assert os.listdir(tmp_path / "d") == []
    assert destination.renamed == {"a.txt": "a (1).txt", "d": "d (1)"}
    assert leftovers(tmp_path) == []


def test_refusal_names_both_ways_out(tmp_path):
    (tmp_path / "a").write_bytes(b"old")
    with pytest.raises(DestinationError, match="--overwrite replaces it, --rename saves beside it"):
        Destination(tmp_path).plan(Offer([file_entry("a", 1)]))
