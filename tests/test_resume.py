"""Resume: CHECKs and resume points in the sessions, the receiver's journal, and real transfers
killed on either side and started again (byte for byte, without re-sending the done part)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import blake3
import pytest

from peer import destination as destination_module
from peer import transfer
from peer.destination import Destination, IntegrityError
from peer.errors import ProtocolError
from peer.journal import Journal, journal_key
from peer.messages import MAX_DATA_SIZE, Answer, Check, Data, FileStart, Hello
from peer.offer import FILE, Offer, OfferEntry
from peer.source import scan
from peer.transfer import ChunkChecked, FileFinished, FileStarted, ReceiverSession, SenderSession

from processes import finish, peer

MiB = 1024 * 1024
CODE = "789-cobalt-lemon-unicycle"


@pytest.fixture
def small_chunks(monkeypatch):
    """64 KiB resume chunks, so the in-memory tests stay small."""
    monkeypatch.setattr(transfer, "RESUME_CHUNK", 64 * 1024)
    monkeypatch.setattr(destination_module, "RESUME_CHUNK", 64 * 1024)
    return 64 * 1024


def entry(size: int, file_id: str = "ab12") -> OfferEntry:
    return OfferEntry(FILE, "big.bin", size, False, file_id)


# --- sessions ------------------------------------------------------------------------------


def negotiated(offer: Offer, points=None):
    sender = SenderSession(offer, features=["resume"])
    receiver = ReceiverSession(features=["resume"])
    sender.receive(receiver.hello())
    for message in sender.offer_messages():
        receiver.receive(message)
    sender.receive(receiver.accept(points))
    return sender, receiver


def test_checks_come_at_every_chunk_and_resume_points_are_honoured(small_chunks):
    chunk = small_chunks
    offer = Offer([entry(3 * chunk + 10)])
    assert b'"id":"ab12"' in offer.to_json(with_ids=True) and b'"id"' not in offer.to_json()
    sender, receiver = negotiated(offer, {0: chunk})
    assert receiver.offer.entries[0].file_id == "ab12"  # ids travel only under resume
    assert sender.start_offset(offer.entries[0]) == chunk
    assert receiver.receive(sender.begin_file(offer.entries[0])) == FileStarted(offer.entries[0], chunk)
    events = []
    while sender.file_remaining:
        buffer = sender.data_buffer()
        count = len(buffer)
        events.append(receiver.receive(sender.data_message(count)))
        if sender.check_due:
            events.append(receiver.receive(sender.check(bytes(32))))
    checks = [e for e in events if isinstance(e, ChunkChecked)]
    assert [c.offset for c in checks] == [2 * chunk, 3 * chunk]  # never across a boundary
    assert isinstance(receiver.receive(sender.end_file(bytes(32))), FileFinished)


def test_resume_rules_are_enforced_on_both_sides(small_chunks):
    chunk = small_chunks
    offer = Offer([entry(3 * chunk)])
    for points in ({0: 100}, {0: 4 * chunk}, {1: chunk}):
        sender = SenderSession(offer, features=["resume"])
        sender.receive(Hello(1, ("resume",)).encode())
        sender.offer_messages()
        with pytest.raises(ProtocolError, match="resume wrongly"):
            sender.receive(Answer(True, "", list(points.items())).encode())
    sender, receiver = negotiated(offer, {0: chunk})
    with pytest.raises(ProtocolError, match="at byte 0, not"):
        receiver.receive(FileStart(0, 0).encode())
    sender, receiver = negotiated(offer)
    receiver.receive(FileStart(0, 0).encode())
    with pytest.raises(ProtocolError, match="ran past a check point"):
        for _ in range(3):
            receiver.receive(Data(bytes(MAX_DATA_SIZE)).encode())
    sender, receiver = negotiated(offer)
    receiver.receive(FileStart(0, 0).encode())
    for size in (32766, 32766, chunk - 2 * 32766):
        receiver.receive(Data(bytes(size)).encode())
    with pytest.raises(ProtocolError, match="data where a check was due"):
        receiver.receive(Data(b"x").encode())
    plain = ReceiverSession()
    plain.hello()
    with pytest.raises(ProtocolError, match="unknown message type|check while"):
        plain.receive(Check(bytes(32)).encode())
    with pytest.raises(RuntimeError):
        ReceiverSession().accept({0: chunk})


# --- the journal and the destination ----------------------------------------------------------


def receive_chunks(destination: Destination, offer: Offer, data: bytes, start: int, stop: int, chunk: int):
    """Write data[start:stop] as the receiving driver would, checking every full chunk."""
    part = destination.open_part(offer.entries[0])
    position = start
    while position < stop:
        end = min(stop, (position // chunk + 1) * chunk)
        part.write(data[position:end])
        if end % chunk == 0:
            destination.check(part, blake3.blake3(data[end - chunk : end]).digest())
        position = end
    return part


def test_an_interrupted_file_resumes_after_its_last_verified_chunk(tmp_path, small_chunks):
    chunk = small_chunks
    data = os.urandom(5 * chunk + 123)
    offer = Offer([entry(len(data))])
    first = Destination(tmp_path)
    first.plan(offer, resume=True)
    assert first.resume_points(offer) == {}
    receive_chunks(first, offer, data, 0, 2 * chunk + 999, chunk)  # cut inside chunk 3
    first.abort()
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[0].endswith(".peer-journal") and names[1].endswith(".peer-part")

    second = Destination(tmp_path)
    second.plan(offer, resume=True)
    assert second.resume_points(offer) == {0: 2 * chunk}
    part = receive_chunks(second, offer, data, 2 * chunk, len(data), chunk)
    second.commit(part, blake3.blake3(data[5 * chunk :]).digest())  # the tail after the last check
    second.finish()
    assert os.listdir(tmp_path) == ["big.bin"]
    assert (tmp_path / "big.bin").read_bytes() == data


def test_what_cannot_be_resumed_is_not_kept(tmp_path, small_chunks):
    chunk = small_chunks
    data = os.urandom(3 * chunk)
    offer = Offer([entry(len(data))])
    destination = Destination(tmp_path)
    destination.plan(offer, resume=True)
    receive_chunks(destination, offer, data, 0, chunk - 1, chunk)  # nothing verified yet
    destination.abort()
    assert os.listdir(tmp_path) == []
    destination = Destination(tmp_path)
    destination.plan(offer, resume=True)
    part = destination.open_part(offer.entries[0])
    part.write(data[:chunk])
    with pytest.raises(IntegrityError, match="chunk's hash"):
        destination.check(part, bytes(32))
    destination.abort()
    assert os.listdir(tmp_path) == []  # a corrupted part is never kept


def test_a_changed_source_restarts_cleanly_and_a_damaged_part_is_not_trusted(tmp_path, small_chunks):
    chunk = small_chunks
    data = os.urandom(3 * chunk)
    old = Offer([entry(len(data), "01")])
    destination = Destination(tmp_path)
    destination.plan(old, resume=True)
    receive_chunks(destination, old, data, 0, 2 * chunk, chunk)
    destination.abort()
    new = Offer([entry(len(data), "02")])  # the sender's file changed: another id
    destination = Destination(tmp_path)
    destination.plan(new, resume=True)
    assert destination.resume_points(new) == {}
    part = destination.open_part(new.entries[0])
    assert os.listdir(tmp_path) == [part.part_path.name]  # the old version's part and journal are gone
    destination.abort()
    # A part file cut short here (not by us) is not resumed either.
    destination = Destination(tmp_path)
    destination.plan(old, resume=True)
    receive_chunks(destination, old, data, 0, 2 * chunk, chunk)
    destination.abort()
    (part_file,) = tmp_path.glob("*.peer-part")
    os.truncate(part_file, chunk + 5)
    destination = Destination(tmp_path)
    destination.plan(old, resume=True)
    assert destination.resume_points(old) == {}


def test_complete_files_of_an_interrupted_transfer_are_not_sent_again(tmp_path, small_chunks):
    a = OfferEntry(FILE, "a", 100, False, "0a")
    b = OfferEntry(FILE, "b", 100, False, "0b")
    offer = Offer([a, b])
    destination = Destination(tmp_path)
    destination.plan(offer, resume=True)
    part = destination.open_part(a)
    part.write(b"a" * 100)
    destination.commit(part, blake3.blake3(b"a" * 100).digest())
    destination.abort()  # killed before b: a is in place, its journal says so
    destination = Destination(tmp_path)
    destination.plan(offer, resume=True)  # "a exists" is no conflict: it is ours, complete
    assert destination.resume_points(offer) == {0: 100}
    part = destination.open_part(a)
    destination.commit(part, blake3.blake3(b"").digest())
    part = destination.open_part(b)
    part.write(b"b" * 100)
    destination.commit(part, blake3.blake3(b"b" * 100).digest())
    destination.finish()
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # and the journals are gone


def test_journal_reading_stops_at_a_torn_line(tmp_path):
    header = {"path": "x", "size": 1, "id": "1", "chunk": 4}
    journal = Journal.create(tmp_path / "j", header)
    journal.add_chunk(bytes(32))
    journal.close()
    with open(tmp_path / "j", "ab") as file:
        file.write(b"chunk 1 00ff")  # killed mid-line
    loaded = Journal.load(tmp_path / "j", header)
    assert loaded.chunks == [bytes(32)] and loaded.done is None
    assert Journal.load(tmp_path / "j", {**header, "id": "2"}) is None
    assert journal_key("x", 1, "1") != journal_key("x", 1, "2")


def test_the_sender_seeks_past_the_done_part(tmp_path):
    data = os.urandom(3 * MiB)
    (tmp_path / "f").write_bytes(data)
    selection = scan([tmp_path / "f"])
    file_entry = selection.offer.entries[0]
    assert file_entry.file_id and len(file_entry.file_id) == 32
    with selection.open(file_entry, start=2 * MiB, chunk=MiB) as reader:
        buffer = memoryview(bytearray(4 * MiB))
        assert reader.readinto(buffer) == MiB  # from 2 MiB, stopping at the chunk's end
        assert reader.chunk_digest() == blake3.blake3(data[2 * MiB :]).digest()
        assert reader.readinto(buffer) == 0
        assert reader.digest() == blake3.blake3(b"").digest()


# --- real processes, killed and started again ---------------------------------------------------


def journal_chunks(out: Path) -> int:
    journals = list(out.glob("*.peer-journal")) if out.exists() else []
    if not journals:
        return 0
    return sum(1 for line in journals[0].read_bytes().split(b"\n") if line.startswith(b"chunk "))


def wait_for_chunks(out: Path, count: int, process, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while journal_chunks(out) < count:
        assert process.poll() is None, "the transfer ended before the kill"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)


def run_pair(relay, tmp_path, out, *send_options):
    sender = peer("send", *relay.peer_args(), "--password", CODE, *send_options, "big.bin", cwd=tmp_path)
    receiver = peer("recv", *relay.peer_args(), "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
    return sender, receiver


@pytest.mark.parametrize("victim, chunks", [("sender", 1), ("receiver", 2)])
def test_a_transfer_killed_on_either_side_resumes_where_it_stopped(relay_process, tmp_path, victim, chunks):
    data = os.urandom(64 * MiB)
    (tmp_path / "big.bin").write_bytes(data)
    out = tmp_path / "out"
    sender, receiver = run_pair(relay_process, tmp_path, out, "--limit-rate", "24M", "--no-compress")
    wait_for_chunks(out, chunks, receiver)
    killed, survivor = (sender, receiver) if victim == "sender" else (receiver, sender)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    status, _, err = finish(survivor)
    assert status == 1 and "Traceback" not in err
    assert not (out / "big.bin").exists()
    done = journal_chunks(out)
    assert done >= chunks

    sender, receiver = run_pair(relay_process, tmp_path, out, "--no-compress")
    r, _, r_err = finish(receiver)
    s, _, s_err = finish(sender)
    assert (s, r) == (0, 0), s_err + r_err
    assert (out / "big.bin").read_bytes() == data
    assert os.listdir(out) == ["big.bin"]  # part and journal are gone
    # Both sides say where the file resumes (a line of its own off a terminal).
    resumed = f"Resuming big.bin at {16 * done:.1f} MiB of 64.0 MiB"
    assert resumed in r_err.splitlines() and resumed in s_err.splitlines(), r_err + s_err
    # Only what was missing crossed the wire (plus record overhead), so nothing done was sent.
    wire = float(s_err.split(", ")[1].split(" ")[0])
    assert wire <= 64 - 16 * done + 1, s_err


def test_a_source_changed_between_attempts_restarts_from_zero(relay_process, tmp_path):
    data = os.urandom(40 * MiB)
    (tmp_path / "big.bin").write_bytes(data)
    out = tmp_path / "out"
    sender, receiver = run_pair(relay_process, tmp_path, out, "--limit-rate", "24M", "--no-compress")
    wait_for_chunks(out, 1, receiver)
    sender.send_signal(signal.SIGKILL)
    sender.communicate()
    finish(receiver)
    changed = data[:-1] + bytes([data[-1] ^ 1])
    (tmp_path / "big.bin").write_bytes(changed)
    sender, receiver = run_pair(relay_process, tmp_path, out, "--no-compress")
    r, _, r_err = finish(receiver)
    s, _, s_err = finish(sender)
    assert (s, r) == (0, 0), s_err + r_err
    assert (out / "big.bin").read_bytes() == changed
    assert "on the wire" not in s_err  # everything was sent again
    assert os.listdir(out) == ["big.bin"]  # the stale part and journal were removed
