"""Many small files: durability is paid once per transfer, not once per file (issue 15, item 4).

What is asserted is behaviour and counts (syncs per transfer, what is named when, the order
of the sync and the ACK), never seconds: the figures are bench/small_files.py's.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest
import trio

from peer import durable, transfer
from peer.destination import Destination, DestinationError
from peer.offer import DIRECTORY, FILE, Offer, OfferEntry
from processes import finish, peer
from inprocess import run_pair, running_relay, tree

CODE = "4242-small-files"


@pytest.fixture
def syncs(monkeypatch):
    """Every fsync, fdatasync and syncfs call, in order, by name (each still runs)."""
    calls: list[str] = []

    def counting(name, real):
        def call(*args):
            calls.append(name)
            return real(*args)
        return call

    monkeypatch.setattr(os, "fsync", counting("fsync", os.fsync))
    if hasattr(os, "fdatasync"):
        monkeypatch.setattr(os, "fdatasync", counting("fdatasync", os.fdatasync))
    monkeypatch.setattr(durable, "syncfs", counting("syncfs", durable.syncfs))
    return calls


def small_offer(count: int, *, ids: bool = True) -> tuple[Offer, dict[str, bytes]]:
    contents = {f"d/f{i:05}.txt": f"file {i}\n".encode() for i in range(count)}
    entries = [OfferEntry(DIRECTORY, "d")] + [
        OfferEntry(FILE, path, len(data), False, f"{i:032x}" if ids else None)
        for i, (path, data) in enumerate(contents.items())
    ]
    return Offer(entries), contents


def receive(destination: Destination, offer: Offer, contents: dict[str, bytes], *, resume=True) -> None:
    destination.plan(offer, resume=resume)
    for entry in offer.entries:
        if entry.is_file:
            part = destination.open_part(entry)
            part.write(contents[entry.path])
            destination.commit(part, blake3.blake3(contents[entry.path]).digest())
    destination.finish()


@pytest.mark.parametrize("resume", [True, False])
def test_the_syncs_of_a_transfer_do_not_grow_with_its_file_count(tmp_path, syncs, resume):
    counts = []
    for count in (5, 300):
        offer, contents = small_offer(count)
        out = tmp_path / f"out{count}"
        out.mkdir()
        syncs.clear()
        receive(Destination(out), offer, contents, resume=resume)
        counts.append(len(syncs))
        assert {path: (out / path).read_bytes() for path in contents} == contents
        assert sorted(os.listdir(out / "d")) == sorted(Path(path).name for path in contents)
    assert counts[0] == counts[1] <= 4, counts


def test_files_get_their_names_only_after_their_bytes_are_synced(tmp_path, monkeypatch):
    """The data is made durable before any name appears, and the names before finish returns
    (the receiver ACKs after finish): a crash can never leave a name on missing bytes."""
    offer, contents = small_offer(50)
    seen: list[tuple[str, int]] = []
    real = durable.syncfs

    def watching(fd):
        named = sum(1 for path in contents if (tmp_path / path).exists())
        seen.append(("sync", named))
        return real(fd)

    monkeypatch.setattr(durable, "syncfs", watching)
    if not durable.syncfs_available():
        pytest.skip("no syncfs here: files are flushed one by one")
    receive(Destination(tmp_path), offer, contents)
    assert seen[0] == ("sync", 0)  # nothing named before the bytes are on disk
    assert seen[-1] == ("sync", len(contents))  # the names made durable last
    assert all((tmp_path / path).read_bytes() == data for path, data in contents.items())


def test_verified_files_of_an_interrupted_transfer_stay_and_resume(tmp_path):
    """A transfer stopped after some small files were verified keeps them, in place and
    marked done, so the next attempt neither refuses nor re-sends them."""
    offer, contents = small_offer(20)
    destination = Destination(tmp_path)
    destination.plan(offer, resume=True)
    files = [entry for entry in offer.entries if entry.is_file]
    for entry in files[:12]:
        part = destination.open_part(entry)
        part.write(contents[entry.path])
        destination.commit(part, blake3.blake3(contents[entry.path]).digest())
    part = destination.open_part(files[12])
    part.write(contents[files[12].path][:3])
    destination.abort()
    names = os.listdir(tmp_path / "d")
    placed = sorted(name for name in names if not name.endswith(".peer-journal"))
    assert placed == sorted(Path(e.path).name for e in files[:12])  # the partial 13th is gone
    assert len(names) == 2 * len(placed)  # each with a journal saying it is done
    again = Destination(tmp_path)  # its own journals let it resume into "d" without --merge
    again.plan(offer, resume=True)
    done = again.resume_points(offer)
    assert sorted(done) == [offer.entries.index(e) for e in files[:12]]
    # Another offer naming the same directory (other file ids) finds no journal of its own
    # there: writing into "d" needs --merge, as for any existing directory.
    other = Offer([OfferEntry(DIRECTORY, "d")] + [
        OfferEntry(FILE, e.path, e.size, False, f"{99:032x}") for e in files])
    with pytest.raises(DestinationError, match="--merge"):
        Destination(tmp_path).plan(other, resume=True)


def test_a_failed_sync_names_nothing_and_says_so(tmp_path, monkeypatch):
    offer, contents = small_offer(10)
    if not durable.syncfs_available():
        pytest.skip("no syncfs here")

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable, "syncfs", failing)
    destination = Destination(tmp_path)
    with pytest.raises(Exception, match="cannot flush"):
        with destination.all_or_nothing():
            receive(destination, offer, contents)
    assert not any((tmp_path / path).exists() for path in contents)
    assert not list(tmp_path.rglob("*.peer-part"))


def test_the_receiver_acknowledges_only_after_the_last_sync(tmp_path, monkeypatch):
    """Through a relay in this process: the ACK leaves after every sync of the transfer."""
    order: list[str] = []
    real_sync, real_fsync = durable.syncfs, os.fsync
    real_ack = transfer.ReceiverSession.acknowledge

    def syncing(fd):
        order.append("sync")
        return real_sync(fd)

    def fsyncing(fd):
        order.append("sync")
        return real_fsync(fd)

    def acknowledging(self):
        order.append("ack")
        return real_ack(self)

    monkeypatch.setattr(durable, "syncfs", syncing)
    monkeypatch.setattr(os, "fsync", fsyncing)
    monkeypatch.setattr(transfer.ReceiverSession, "acknowledge", acknowledging)
    source = tmp_path / "src"
    source.mkdir()
    for i in range(200):
        (source / f"f{i}.txt").write_bytes(b"x" * (i % 10))
    for i in range(5):  # small but compressible: one zstd frame each, made inline
        (source / f"text{i}.log").write_bytes(b"".join(b"line %d of a log\n" % n for n in range(3000))[:60000])
    out = tmp_path / "out"

    async def main():
        async with running_relay() as address:
            return await run_pair(address, CODE, source, out, timeout=120)

    result = trio.run(main)
    assert result.ok, result.error
    assert tree(out / "src") == tree(source)
    assert order[-1] == "ack" and order.count("ack") == 1
    assert 1 <= order.count("sync") <= 4, order


def test_two_thousand_small_files_through_a_real_relay(relay_process, tmp_path):
    source = tmp_path / "many"
    for i in range(2000):
        folder = source / f"d{i // 500}"
        if i % 500 == 0:
            folder.mkdir(parents=True)
        (folder / f"f{i:04}.txt").write_bytes(f"{i:09}".encode())
    out = tmp_path / "out"
    out.mkdir()
    sender = peer("send", *relay_process.peer_args(), "-q", "--password", CODE, str(source), cwd=tmp_path)
    receiver = peer("recv", *relay_process.peer_args(), "-q", "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
    r, _, r_err = finish(receiver, timeout=300)
    s, _, s_err = finish(sender, timeout=60)
    assert (s, r) == (0, 0), s_err + r_err
    assert tree(out / "many") == tree(source)
    assert not list(out.rglob("*.peer-*"))  # no part file or journal left
