"""When something dies: nobody blames the peer for a relay that went away, a kept partial
says how to resume it, and a receiver at the Accept? prompt learns at once that the sender
is gone."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time

from processes import finish, peer, start_relay, stop_relay

MiB = 1024 * 1024
CODE = "654-cobalt-lemon-unicycle"
LOST = "the connection through the relay was lost"


def journal_chunks(out) -> int:
    journals = list(out.glob("*.peer-journal")) if out.exists() else []
    return sum(line.startswith(b"chunk ") for line in journals[0].read_bytes().split(b"\n")) if journals else 0


def part_bytes(out) -> int:
    parts = list(out.glob("*.peer-part")) if out.exists() else []
    return parts[0].stat().st_size if parts else 0


def read_until(process: subprocess.Popen, pattern: bytes, timeout: float = 60.0) -> bytes:
    """The process's stderr so far, once it holds `pattern`; fails after `timeout`."""
    seen = b""
    deadline = time.monotonic() + timeout
    fd = process.stderr.fileno()
    while not re.search(pattern, seen):
        left = deadline - time.monotonic()
        assert left > 0 and process.poll() is None, f"never saw {pattern!r}: {seen!r}"
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"stderr closed before {pattern!r}: {seen!r}"
            seen += chunk
    return seen


def test_a_relay_killed_mid_transfer_is_blamed_and_the_partial_is_kept(tmp_path):
    (tmp_path / "big.bin").write_bytes(os.urandom(64 * MiB))
    out = tmp_path / "out"
    out.mkdir()
    relay = start_relay()
    try:
        sender = peer("send", *relay.peer_args(), "--password", CODE, "--limit-rate", "24M", "--no-compress",
                      "big.bin", cwd=tmp_path)
        receiver = peer("recv", *relay.peer_args(), "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
        deadline = time.monotonic() + 60
        # A verified chunk (16 MiB) is in the journal, or at least on its way to the disk.
        while journal_chunks(out) < 1 and part_bytes(out) < 24 * MiB:
            assert receiver.poll() is None and time.monotonic() < deadline, "no verified chunk"
            time.sleep(0.01)
        relay.process.kill()
        relay.process.wait(10)
        (s, _, s_err), (r, _, r_err) = finish(sender), finish(receiver)
    finally:
        if relay.process.poll() is None:
            stop_relay(relay)
        else:
            relay.process.stdout.close()
    assert (s, r) == (1, 1), s_err + r_err
    for err in (s_err, r_err):
        failure = [line for line in err.splitlines() if line.startswith("peer:")]
        assert len(failure) == 1 and LOST in failure[0], err
        assert "went away" not in err and "Traceback" not in err, err
    assert "partial download is kept: run the same command again to resume it" in r_err, r_err
    assert list(out.glob("*.peer-part"))  # it was kept indeed


def test_a_receiver_at_the_prompt_learns_at_once_that_the_sender_is_gone(relay_process, tmp_path):
    (tmp_path / "f.txt").write_text("unwanted")
    out = tmp_path / "out"
    out.mkdir()
    sender = peer("send", *relay_process.peer_args(), "--password", CODE, "f.txt", cwd=tmp_path)
    # Nobody answers the prompt: stdin is a pipe we never write to nor close.
    receiver = peer("recv", *relay_process.peer_args(), "-o", f"{out}/", CODE, cwd=tmp_path, stdin=subprocess.PIPE)
    try:
        seen = read_until(receiver, rb"Accept\? \[Y/n\]: ")
        sender.send_signal(signal.SIGKILL)
        sender.communicate()
        # Without watching the room the receiver would wait for an answer for ever; finish()
        # fails after its (generous) timeout.
        r, _, r_err = finish(receiver, timeout=60)
    finally:
        for process in (sender, receiver):
            if process.poll() is None:
                process.kill()
                process.communicate()
    r_err = seen.decode() + r_err
    assert r == 1, r_err
    # The relay ended the room with its close marker: the sender's side is what ended.
    # (One or two line ends after the prompt, depending on when the status line was cleared.)
    assert re.search(r"Accept\? \[Y/n\]: \n\n?peer: the sender went away while the offer was shown$", r_err), r_err
    assert not (out / "f.txt").exists()
