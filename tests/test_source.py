"""The sender's disk side: what `scan` offers, what it refuses, and reading each file once."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import blake3
import pytest

from peer import source as source_module
from peer.messages import MAX_DATA_SIZE
from peer.offer import DIRECTORY, FILE, OfferEntry
from peer.source import SourceError, scan


def read_all(selection, entry) -> tuple[bytes, bytes]:
    """Content and digest, read the way the sender reads it."""
    buffer = bytearray(MAX_DATA_SIZE)
    view = memoryview(buffer)
    chunks = []
    with selection.open(entry) as reader:
        while reader.remaining:
            count = reader.readinto(view)
            chunks.append(bytes(view[:count]))
        return b"".join(chunks), reader.digest()


@pytest.fixture
def tree(tmp_path):
    photos = tmp_path / "photos"
    (photos / "2024" / "summer").mkdir(parents=True)
    (photos / "empty").mkdir()
    (photos / "a.jpg").write_bytes(b"A" * 10)
    (photos / "2024" / "b.jpg").write_bytes(b"B" * 20)
    (photos / "2024" / "summer" / "c.jpg").write_bytes(b"")
    (photos / "tool.sh").write_bytes(b"#!/bin/sh\n")
    (photos / "tool.sh").chmod(0o755)
    return photos


def test_scan_of_a_tree(tree, monkeypatch):
    selection = scan([str(tree) + "/"])
    assert selection.offer.entries == (
        OfferEntry(DIRECTORY, "photos"),
        OfferEntry(FILE, "photos/a.jpg", 10, False),
        OfferEntry(FILE, "photos/tool.sh", 10, True),
        OfferEntry(DIRECTORY, "photos/2024"),
        OfferEntry(FILE, "photos/2024/b.jpg", 20, False),
        OfferEntry(DIRECTORY, "photos/2024/summer"),
        OfferEntry(FILE, "photos/2024/summer/c.jpg", 0, False),
        OfferEntry(DIRECTORY, "photos/empty"),
    )
    assert selection.warnings == ()
    assert (selection.offer.file_count, selection.offer.total_bytes) == (4, 40)
    monkeypatch.chdir(tree)
    assert scan(["."]).offer.entries[0] == OfferEntry(DIRECTORY, "photos")
    monkeypatch.chdir(tree / "2024")
    assert [e.path for e in scan(["b.jpg", "../a.jpg"]).offer.entries] == ["b.jpg", "a.jpg"]


def test_files_are_read_once_and_hashed_while_read(tree):
    selection = scan([str(tree)])
    for entry in selection.offer.files:
        content, digest = read_all(selection, entry)
        assert content == (tree.parent / entry.path).read_bytes()
        assert digest == blake3.blake3(content).digest()


def test_a_large_file_streams_in_record_sized_pieces(tmp_path):
    content = os.urandom(3 * MAX_DATA_SIZE + 5)
    (tmp_path / "big").write_bytes(content)
    selection = scan([str(tmp_path / "big")])
    entry = selection.offer.entries[0]
    with selection.open(entry) as reader:
        view = memoryview(bytearray(MAX_DATA_SIZE))
        sizes = []
        while reader.remaining:
            sizes.append(reader.readinto(view))
        assert reader.readinto(view) == 0
        assert reader.digest() == blake3.blake3(content).digest()
    assert sizes == [MAX_DATA_SIZE] * 3 + [5]


def test_missing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match="^cannot read photos/nope.jpg: no such file or directory$"):
        scan(["photos/nope.jpg"])
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(SourceError, match="^cannot read dangling: it is a broken symbolic link$"):
        scan(["dangling"])


def test_unreadable_file_is_reported_before_anything_is_sent(tree, monkeypatch):
    # We may be root, for whom chmod 000 changes nothing, so make the open fail instead.
    real_open = os.open
    target = str(tree / "2024" / "b.jpg")

    def refusing_open(path, flags, *args, **kwargs):
        if os.fspath(path) == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(source_module.os, "open", refusing_open)
    monkeypatch.chdir(tree.parent)
    with pytest.raises(SourceError, match="^cannot read photos/2024/b.jpg: permission denied$"):
        scan(["photos"])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_chmod_000_file_for_a_normal_user(tree, monkeypatch):
    (tree / "a.jpg").chmod(0)
    monkeypatch.chdir(tree.parent)
    with pytest.raises(SourceError, match="^cannot read photos/a.jpg: permission denied$"):
        scan(["photos"])


def test_unreadable_directory(tree, monkeypatch):
    real_scandir = os.scandir

    def refusing_scandir(path):
        if os.fspath(path).endswith("summer"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_scandir(path)

    monkeypatch.setattr(source_module.os, "scandir", refusing_scandir)
    monkeypatch.chdir(tree.parent)
    with pytest.raises(SourceError, match="^cannot read photos/2024/summer: permission denied$"):
        scan(["photos"])


def test_symlinks_on_the_command_line_are_followed(tree, tmp_path):
    (tmp_path / "alias.jpg").symlink_to(tree / "a.jpg")
    (tmp_path / "album").symlink_to(tree)
    selection = scan([str(tmp_path / "alias.jpg"), str(tmp_path / "album")])
    paths = [entry.path for entry in selection.offer.entries]
    assert paths[:3] == ["alias.jpg", "album", "album/a.jpg"]
    assert "album/2024/summer/c.jpg" in paths
    assert read_all(selection, selection.offer.entries[0])[0] == b"A" * 10


def test_symlinks_inside_directories_are_skipped_with_a_warning(tree):
    (tree / "loop").symlink_to(tree)
    (tree / "2024" / "link.jpg").symlink_to(tree / "a.jpg")
    (tree / "broken").symlink_to(tree / "nowhere")
    selection = scan([str(tree)])
    paths = {entry.path for entry in selection.offer.entries}
    assert not {"photos/loop", "photos/2024/link.jpg", "photos/broken"} & paths
    assert len(selection.warnings) == 3
    assert all("symbolic link" in warning for warning in selection.warnings)
    assert any(warning.startswith(f"skipped {tree / 'loop'}") for warning in selection.warnings)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files(tree):
    os.mkfifo(tree / "pipe")
    selection = scan([str(tree)])
    assert "photos/pipe" not in {entry.path for entry in selection.offer.entries}
    assert selection.warnings == (f"skipped {tree / 'pipe'}: it is a named pipe",)
    with pytest.raises(SourceError, match="it is a named pipe"):
        scan([str(tree / "pipe")])
    with pytest.raises(SourceError, match="it is a device"):
        scan(["/dev/null"])


def test_duplicate_top_level_names(tmp_path):
    (tmp_path / "x" / "photos").mkdir(parents=True)
    (tmp_path / "y" / "photos").mkdir(parents=True)
    with pytest.raises(SourceError, match="cannot send two items named 'photos'"):
        scan([str(tmp_path / "x" / "photos"), str(tmp_path / "y" / "photos")])
    with pytest.raises(SourceError, match="two items named 'x'"):
        scan([str(tmp_path / "x"), str(tmp_path / "x") + "/"])


def test_names_the_receiver_would_refuse_are_refused_up_front(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "back\\slash").write_bytes(b"")
    with pytest.raises(SourceError, match=r"cannot send .*back\\slash: its name contains a backslash"):
        scan([str(tmp_path / "d")])
    with pytest.raises(SourceError, match="no name"):
        scan(["/"])
    with pytest.raises(SourceError, match="nothing to send"):
        scan([])


def test_a_file_that_changed_after_the_scan(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"12345")
    selection = scan([str(path)])
    path.write_bytes(b"123")
    with pytest.raises(SourceError, match="changed after it was offered: 5 bytes then, 3 now"):
        selection.open(selection.offer.entries[0])


def test_a_file_that_shrinks_while_sent(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    selection = scan([str(path)])
    with selection.open(selection.offer.entries[0]) as reader:
        view = memoryview(bytearray(40))
        reader.readinto(view)
        os.truncate(path, 50)
        reader.readinto(view)
        with pytest.raises(SourceError, match="shrank while it was being sent"):
            reader.readinto(view)


def test_a_file_that_grows_while_sent(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    selection = scan([str(path)])
    with selection.open(selection.offer.entries[0]) as reader:
        reader.readinto(memoryview(bytearray(10)))
        with open(path, "ab") as more:
            more.write(b"y")
        with pytest.raises(SourceError, match="grew while it was being sent"):
            reader.digest()


def test_a_file_rewritten_in_place_while_sent(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    selection = scan([str(path)])
    with selection.open(selection.offer.entries[0]) as reader:
        reader.readinto(memoryview(bytearray(10)))
        with open(path, "r+b") as same_size:
            same_size.write(b"z")
        stat_now = os.stat(path)
        os.utime(path, ns=(stat_now.st_atime_ns, stat_now.st_mtime_ns + 10**9))
        with pytest.raises(SourceError, match="changed while it was being sent"):
            reader.digest()


def test_a_file_replaced_by_a_symlink_inside_a_tree_is_not_followed(tmp_path):
    (tmp_path / "d").mkdir()
    inner = tmp_path / "d" / "f"
    inner.write_bytes(b"hello")
    (tmp_path / "secret").write_bytes(b"s3cr3")
    selection = scan([str(tmp_path / "d")])
    inner.unlink()
    inner.symlink_to(tmp_path / "secret")
    with pytest.raises(SourceError, match="replaced by a symbolic link"):
        selection.open(selection.offer.entries[1])


def test_path_objects_are_accepted(tree):
    assert scan([Path(tree)]).offer == scan([str(tree)]).offer


def test_an_offer_too_large_to_send_is_refused_up_front(tree, monkeypatch):
    monkeypatch.setattr(source_module, "MAX_OFFER_BYTES", 100)
    with pytest.raises(SourceError, match="list of 8 names takes .* over the 100 B limit"):
        scan([str(tree)])
