"""Waiting is never silent: one status line on stderr says what each side waits for.

On a terminal (a pty here, read as a person would see it) the line is rewritten in place;
in a pipe each state is one line. The sender is asked to confirm only with --confirm.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

from processes import child_env, finish, peer

CODE = "321-cobalt-lemon-unicycle"
CHECK = r"[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}"


class Terminal:
    """A peer whose stdin and stderr are a pty (stdout a pipe): what a person would see."""

    def __init__(self, *args: str, cwd) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "peer", *args], cwd=cwd, stdin=slave, stdout=subprocess.PIPE,
            stderr=slave, env=child_env(COLUMNS="200"), close_fds=True,
        )
        os.close(slave)
        self.screen = b""

    def read_until(self, pattern: bytes, timeout: float = 60.0) -> bytes:
        """Everything read so far, once `pattern` (a regex) is in it; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.screen):
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {pattern!r} in {self.screen!r}"
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                assert chunk, f"the terminal closed before {pattern!r}: {self.screen!r}"
                self.screen += chunk
        return self.screen

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def finish(self, timeout: float = 60.0) -> int:
        """Wait for the exit, reading the screen to its end (what the child wrote last may
        still be in the pty after it exited); the status, or a failure after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.process.poll() is not None
            ready, _, _ = select.select([self.master], [], [], 0 if exited else 0.2)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: every writer is gone and all was read
                    chunk = b""
                self.screen += chunk
                if chunk:
                    continue
            if exited:
                break
        try:
            return self.process.wait(max(deadline - time.monotonic(), 1))
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.process.stdout.close()
            os.close(self.master)


def test_a_receiver_started_first_says_what_it_waits_for_on_one_updating_line(relay_process, tmp_path):
    (tmp_path / "hello.txt").write_text("hello\n")
    out = tmp_path / "out"
    out.mkdir()  # an existing directory: saved into it
    receiver = Terminal("recv", *relay_process.peer_args(), "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
    try:
        screen = receiver.read_until(rb"Waiting for the sender\.\.\.")
        # Nobody sends yet: the receiver says so, on one line rewritten in place.
        assert re.search(rb"\rConnecting to the relay at 127\.0\.0\.1:\d+\.\.\.\x1b\[K"
                         rb"\rWaiting for the sender\.\.\.\x1b\[K", screen), screen
        sender = peer("send", *relay_process.peer_args(), "--password", CODE, "hello.txt", cwd=tmp_path)
        s, _, s_err = finish(sender)
        assert receiver.finish() == 0, receiver.screen
    finally:
        if receiver.process.poll() is None:
            receiver.process.kill()
    assert s == 0, s_err
    screen = receiver.screen.decode(errors="replace")
    states = ["Connecting to the relay", "Waiting for the sender...",
              "Waiting for the sender to confirm (verification ", "Received 1 file"]
    positions = [screen.find(state) for state in states]
    assert -1 not in positions and positions == sorted(positions), screen
    # Every state before the end was on the same terminal line: no newline between them.
    assert "\n" not in screen[: screen.find("hello.txt (6 B)")], screen
    # The sender, writing to a pipe, printed one plain line per state, in order.
    lines = s_err.splitlines()
    wanted = [r"Connecting to the relay at 127\.0\.0\.1:\d+\.\.\.$", r"Waiting for the receiver\.\.\.$",
              rf"Waiting for the receiver to accept \(verification {CHECK}\)\.\.\.$", r"Sending hello\.txt \(6 B\)\.\.\.$"]
    found = [next((i for i, line in enumerate(lines) if re.match(pattern, line)), None) for pattern in wanted]
    assert None not in found and found == sorted(found), s_err
    assert (out / "hello.txt").read_text() == "hello\n"


def test_quiet_prints_no_status(relay_process, tmp_path):
    (tmp_path / "f.txt").write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    receiver = peer("recv", *relay_process.peer_args(), "-q", "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
    sender = peer("send", *relay_process.peer_args(), "-q", "--password", CODE, "f.txt", cwd=tmp_path)
    (r, _, r_err), (s, _, s_err) = finish(receiver), finish(sender)
    assert (r, s) == (0, 0), r_err + s_err
    assert r_err == "" and s_err == ""


def test_the_sender_is_asked_only_with_confirm(relay_process, tmp_path):
    (tmp_path / "f.txt").write_text("data")
    out = tmp_path / "out"
    out.mkdir()
    # On a terminal, without --confirm: nobody answers, and the transfer goes through.
    sender = Terminal("send", *relay_process.peer_args(), "--password", CODE, "f.txt", cwd=tmp_path)
    receiver = peer("recv", *relay_process.peer_args(), "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
    r, _, r_err = finish(receiver)
    assert sender.finish() == 0, sender.screen
    assert r == 0, r_err
    assert b"[Y/n]" not in sender.screen
    check = re.search(rb"Sending f\.txt \(4 B\) to \S+ \(verification (" + CHECK.encode() + rb")\)", sender.screen)
    assert check and check[1].decode() in r_err  # the verification string on both sides

    # With --confirm, the sender is asked, and the receiver waits for the answer, saying so.
    (out / "f.txt").unlink()
    sender = Terminal("send", *relay_process.peer_args(), "--confirm", "--password", CODE, "f.txt", cwd=tmp_path)
    receiver = peer("recv", *relay_process.peer_args(), "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
    try:
        sender.read_until(rb"Send f\.txt \(4 B\) to .*\? Verification " + CHECK.encode() + rb"\. \[Y/n\]: ")
        sender.type(b"y\n")
        r, _, r_err = finish(receiver)
        assert sender.finish() == 0, sender.screen
    finally:
        if sender.process.poll() is None:
            sender.process.kill()
    assert r == 0, r_err
    assert re.search(rf"Waiting for the sender to confirm \(verification {CHECK}\)", r_err), r_err
