"""``peer send -`` and ``peer recv --stdout``: 50 MiB through real pipes, a slow producer,
and what --stdout refuses; plus the stream reader and the stream destination on their own."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time

import blake3
import pytest

from peer.destination import DestinationError, IntegrityError, StreamDestination
from peer.offer import DIRECTORY, FILE, Offer, OfferEntry
from peer.source import stdin_selection

from processes import finish, peer

CODE = "321-cobalt-lemon-unicycle"
SIZE = 50 * 1024 * 1024


def feed(process: subprocess.Popen, chunks, pause: float = 0.0) -> threading.Thread:
    """Write chunks to the process's stdin from a thread, then close it."""

    def run() -> None:
        try:
            for chunk in chunks:
                process.stdin.write(chunk)
                process.stdin.flush()
                if pause:
                    time.sleep(pause)
        except BrokenPipeError:
            pass
        finally:
            process.stdin.close()
            process.stdin = None  # so that communicate() leaves it alone

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_50_mib_from_stdin_to_stdout(relay_process, tmp_path):
    data = os.urandom(SIZE)
    sender = peer("send", *relay_process.peer_args(), "--password", CODE, "-", cwd=tmp_path, stdin=subprocess.PIPE)
    writer = feed(sender, (data[i : i + (1 << 20)] for i in range(0, SIZE, 1 << 20)))
    receiver = peer("recv", *relay_process.peer_args(), "-y", "--stdout", CODE, cwd=tmp_path)
    r_out, r_err = receiver.communicate(timeout=60)
    r, r_err = receiver.returncode, r_err.decode()
    writer.join(30)
    s, _, s_err = finish(sender)
    assert (s, r) == (0, 0), s_err + r_err
    assert hashlib.sha256(r_out).digest() == hashlib.sha256(data).digest()  # nothing else on stdout
    assert "stdin (size unknown)" in r_err and "to standard output" in r_err
    assert "50.0 MiB" in s_err and "receiver confirmed" in s_err
    assert os.listdir(tmp_path) == []


def test_a_slow_pipe_is_sent_as_it_comes_and_saved_under_its_name(relay_process, tmp_path):
    lines = [f"line {i}\n".encode() for i in range(20)]
    sender = peer("send", *relay_process.peer_args(), "--password", CODE, "--name", "log.txt", "-",
                  cwd=tmp_path, stdin=subprocess.PIPE)
    writer = feed(sender, lines, pause=0.05)
    out = tmp_path / "out"
    receiver = peer("recv", *relay_process.peer_args(), "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
    r, _, r_err = finish(receiver)
    writer.join(30)
    s, _, s_err = finish(sender)
    assert (s, r) == (0, 0), s_err + r_err
    assert (out / "log.txt").read_bytes() == b"".join(lines)


def test_stdout_refuses_several_files_and_option_mixes(relay_process, tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    sender = peer("send", *relay_process.peer_args(), "--password", CODE, "a", "b", cwd=tmp_path)
    receiver = peer("recv", *relay_process.peer_args(), "-y", "--stdout", CODE, cwd=tmp_path)
    r, r_out, r_err = finish(receiver)
    s, _, s_err = finish(sender)
    assert r == 1 and s == 1 and r_out == ""
    assert "--stdout takes a single file" in r_err and "--stdout takes a single file" in s_err
    r, _, r_err = finish(peer("recv", "--stdout", "-o", "x", CODE, cwd=tmp_path))
    assert r == 2 and "--stdout writes no file" in r_err
    s, _, s_err = finish(peer("send", "-", "a", cwd=tmp_path))
    assert s == 2 and "only path" in s_err


def test_stream_reader_gathers_what_is_waiting_and_hashes_it():
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"abc")
        os.write(write_end, b"def")
        reader = stdin_selection("x", fd=read_end).open(OfferEntry(FILE, "x", None))
        buffer = memoryview(bytearray(100))
        assert reader.readinto(buffer) == 6  # both writes, without waiting for more
        with pytest.raises(RuntimeError):
            reader.digest()
        os.close(write_end)
        write_end = None
        assert reader.readinto(buffer) == 0
        assert reader.digest() == blake3.blake3(b"abcdef").digest()
    finally:
        os.close(read_end)
        if write_end is not None:
            os.close(write_end)


def test_stream_destination_writes_through_and_reports_a_bad_digest():
    read_end, write_end = os.pipe()
    try:
        destination = StreamDestination(write_end, "the pipe")
        with pytest.raises(DestinationError, match="single file"):
            destination.plan(Offer([OfferEntry(DIRECTORY, "d"), OfferEntry(FILE, "d/a", 1)]))
        entry = OfferEntry(FILE, "a", 6)
        destination.plan(Offer([entry]))
        part = destination.open_part(entry)
        part.write(b"abc")
        assert os.read(read_end, 10) == b"abc"  # no temporary copy: the bytes are already out
        with pytest.raises(DestinationError, match="more data than the offered"):
            part.write(b"defg")
        part.write(b"def")
        with pytest.raises(IntegrityError, match="is not the file sent"):
            destination.commit(part, bytes(32))
        destination.commit(part, blake3.blake3(b"abcdef").digest())
    finally:
        os.close(read_end)
        os.close(write_end)
