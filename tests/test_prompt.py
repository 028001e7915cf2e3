"""The receiver's ``Code:`` prompt, typed into through a pty as a person would (issue 15, item 3).

A misspelt code is questioned before it costs one of the sender's attempts; Tab completes a word
from the list; arrow keys move in the line instead of printing ``^[[D``. Each test ends with a
real transfer, which proves the code actually tried was the intended one.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from processes import child_env

CODE = "263-dizzy-finite-disparity"


class Terminal:
    """``peer recv`` with stdin, stdout and stderr on one pty: the screen a person reads."""

    def __init__(self, *args: str, cwd) -> None:
        self.master, slave = pty.openpty()
        self.screen = b""
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "peer", *args],
                stdin=slave, stdout=slave, stderr=slave, cwd=cwd, start_new_session=True,
                env=child_env(TERM="xterm", INPUTRC="/dev/null", COLUMNS="200"),
            )
        finally:
            os.close(slave)

    def read_until(self, text: bytes, timeout: float = 60.0, *, new: bool = False) -> bytes:
        """Read until ``text`` is on the screen (with ``new``: appears after what was read)."""
        start = len(self.screen) if new else 0
        deadline = time.monotonic() + timeout  # a bound, not a measurement
        while text not in self.screen[start:]:
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {text!r} in {self.screen!r}"
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the child closed the pty
                    chunk = b""
                assert chunk, f"the terminal closed before {text!r}: {self.screen!r}"
                self.screen += chunk
        return self.screen

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def finish(self, timeout: float = 60.0) -> int:
        try:
            # Drain what is left, so the child never blocks on a full pty.
            deadline = time.monotonic() + timeout
            while self.process.poll() is None and time.monotonic() < deadline:
                ready, _, _ = select.select([self.master], [], [], 0.5)
                if ready:
                    try:
                        self.screen += os.read(self.master, 4096)
                    except OSError:
                        pass
            return self.process.wait(5)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
            os.close(self.master)


@pytest.fixture
def sender(relay_process, tmp_path):
    """A sender of hello.txt waiting with CODE (as if chosen with --code)."""
    (tmp_path / "hello.txt").write_text("hello\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "peer", "send", *relay_process.peer_args(), "--code", CODE, "hello.txt"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=child_env(),
    )
    yield process
    if process.poll() is None:
        process.kill()
    process.wait(10)


def _receiver(relay_process, tmp_path) -> Terminal:
    return Terminal("recv", *relay_process.peer_args(), "-y", "-o", f"{tmp_path / 'out'}/", cwd=tmp_path)


def _received(tmp_path, terminal: Terminal, sender) -> None:
    status = terminal.finish()
    assert status == 0, terminal.screen.decode(errors="replace")
    assert (tmp_path / "out" / "hello.txt").read_text() == "hello\n"
    assert sender.wait(60) == 0


def test_a_misspelt_code_is_corrected_when_asked(relay_process, tmp_path, sender):
    terminal = _receiver(relay_process, tmp_path)
    terminal.read_until(b"Code: ")
    terminal.type(b"263-dizzy-finite-disparitx\r")
    terminal.read_until(f"Did you mean {CODE}? [Y/n]".encode())
    terminal.type(b"\r")
    _received(tmp_path, terminal, sender)
    assert b"'disparitx' is not in the word list" in terminal.screen


def test_refusing_the_correction_asks_for_the_code_again(relay_process, tmp_path, sender):
    terminal = _receiver(relay_process, tmp_path)
    terminal.read_until(b"Code: ")
    terminal.type(b"263-dizzy-finite-disparitx\r")
    terminal.read_until(b"[Y/n]")
    terminal.type(b"n\r")
    terminal.read_until(b"as typed?")
    terminal.type(b"\r")  # the default is no: type it again
    terminal.read_until(b"Code: ", new=True)
    terminal.type(CODE.encode() + b"\r")
    _received(tmp_path, terminal, sender)


def test_a_misspelt_code_on_the_command_line_is_questioned_too(relay_process, tmp_path, sender):
    terminal = Terminal("recv", *relay_process.peer_args(), "-y", "-o", f"{tmp_path / 'out'}/",
                        "263-dizzy-fnite-disparity", cwd=tmp_path)
    terminal.read_until(f"Did you mean {CODE}? [Y/n]".encode())
    terminal.type(b"y\r")
    _received(tmp_path, terminal, sender)


def test_tab_completes_a_word(relay_process, tmp_path, sender):
    terminal = _receiver(relay_process, tmp_path)
    terminal.read_until(b"Code: ")
    terminal.type(b"263-dizzy-finit\t")
    terminal.read_until(b"263-dizzy-finite-")
    terminal.type(b"dispari\t")
    terminal.read_until(b"disparity-")
    terminal.type(b"\r")
    _received(tmp_path, terminal, sender)
    assert b"\t" not in terminal.screen


def test_arrow_keys_edit_the_line(relay_process, tmp_path, sender):
    terminal = _receiver(relay_process, tmp_path)
    terminal.read_until(b"Code: ")
    terminal.type(b"263-dizzy-finite-dsparity")
    terminal.read_until(b"dsparity")
    terminal.type(b"\x1b[D" * 7 + b"i\r")  # back to after the d, insert the missing i
    _received(tmp_path, terminal, sender)
    assert b"^[[D" not in terminal.screen
