"""Issue 15, item 10 and 11: --version, --code, completions, the QR code, units, and ``-o FILE``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from processes import child_env

CODE = "417-cobalt-lemon-unicycle"


def peer(*args: str, cwd=None, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peer", *args], cwd=cwd, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, env=child_env(**env), timeout=timeout,
    )


def transfer(relay, cwd: Path, paths: list[str], *recv_args: str) -> subprocess.CompletedProcess:
    """Send ``paths`` (from ``cwd``) with CODE and receive them with ``recv_args``; the receiver's result."""
    sender = subprocess.Popen(
        [sys.executable, "-m", "peer", "send", *relay.peer_args(), "--code", CODE, *paths],
        cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=child_env(),
    )
    try:
        received = peer("recv", *relay.peer_args(), "-y", *recv_args, CODE, cwd=cwd)
        if received.returncode == 0:
            assert sender.wait(60) == 0, sender.stderr.read()
        return received
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
        sender.stderr.close()


# --- -o like magic-wormhole (item 11) ----------------------------------------------------


@pytest.fixture
def files(tmp_path):
    source = tmp_path / "src"
    (source / "folder").mkdir(parents=True)
    (source / "hello.txt").write_text("hello\n")
    (source / "folder" / "inner.txt").write_text("inner\n")
    return source


def test_o_names_the_one_file_offered(relay_process, files, tmp_path):
    result = transfer(relay_process, files, ["hello.txt"], "-o", str(tmp_path / "greeting.txt"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "greeting.txt").read_text() == "hello\n"
    assert f"as {tmp_path / 'greeting.txt'}" in result.stderr
    assert "existed already" not in result.stderr


def test_o_relative_name_in_the_current_directory(relay_process, files):
    result = transfer(relay_process, files, ["hello.txt"], "-o", "copy.txt")
    assert result.returncode == 0, result.stderr
    assert (files / "copy.txt").read_text() == "hello\n"


def test_o_with_a_directory_offer_creates_that_directory(relay_process, files, tmp_path):
    result = transfer(relay_process, files, ["folder"], "-o", str(tmp_path / "new"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "new" / "folder" / "inner.txt").read_text() == "inner\n"


def test_o_with_several_files_creates_that_directory(relay_process, files, tmp_path):
    result = transfer(relay_process, files, ["hello.txt", "folder"], "-o", str(tmp_path / "new"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "new" / "hello.txt").read_text() == "hello\n"
    assert (tmp_path / "new" / "folder" / "inner.txt").is_file()


def test_o_an_existing_directory_saves_into_it(relay_process, files, tmp_path):
    (tmp_path / "there").mkdir()
    result = transfer(relay_process, files, ["hello.txt"], "-o", str(tmp_path / "there"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "there" / "hello.txt").read_text() == "hello\n"


def test_o_with_a_trailing_slash_is_a_directory(relay_process, files, tmp_path):
    result = transfer(relay_process, files, ["hello.txt"], "-o", f"{tmp_path / 'made'}/")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "made" / "hello.txt").read_text() == "hello\n"


def test_o_an_existing_file_is_not_replaced(relay_process, files, tmp_path):
    (tmp_path / "taken.txt").write_text("mine\n")
    result = transfer(relay_process, files, ["hello.txt"], "-o", str(tmp_path / "taken.txt"))
    assert result.returncode == 1
    assert (tmp_path / "taken.txt").read_text() == "mine\n"
    assert "taken.txt" in result.stderr


def test_o_help_says_it():
    result = peer("recv", "--help")
    assert "saved as DEST" in " ".join(result.stdout.split())
