"""peer send / peer recv as real processes through a real peer-relay process, on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio

from peer import handshake, messages
from peer.address import RelayAddress
from peer.channel import Channel
from peer.meeting import meet

from processes import finish, peer

CODE = "123-cobalt-lemon-unicycle"


def tree_files(root: Path) -> dict[str, bytes | None]:
    """Every path under root mapped to its bytes (None for directories)."""
    found = {}
    for path in sorted(root.rglob("*")):
        found[path.relative_to(root).as_posix()] = None if path.is_dir() else path.read_bytes()
    return found


def failure_lines(err: str) -> list[str]:
    """What a failure printed, without the status lines (one per state) that came before it."""
    return [line for line in err.splitlines() if line.startswith("peer:")]


def transfer_through(relay, tmp_path: Path, *paths: str, code: str = CODE, recv_extra=()):
    out = tmp_path / "out"
    sender = peer("send", *relay.peer_args(), "--password", code, *paths, cwd=tmp_path)
    receiver = peer("recv", *relay.peer_args(), "-y", "-o", f"{out}/", *recv_extra, code, cwd=tmp_path)
    return finish(sender), finish(receiver), out


def test_empty_file(relay_process, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (s, _, s_err), (r, _, r_err), out = transfer_through(relay_process, tmp_path, "empty.txt")
    assert (s, r) == (0, 0), s_err + r_err
    assert (out / "empty.txt").read_bytes() == b""
    assert "receiver confirmed" in s_err


def test_20_mib_random_file(relay_process, tmp_path):
    data = os.urandom(20 * 1024 * 1024)
    (tmp_path / "big.bin").write_bytes(data)
    (s, _, s_err), (r, _, r_err), out = transfer_through(relay_process, tmp_path, "big.bin")
    assert (s, r) == (0, 0), s_err + r_err
    assert (out / "big.bin").read_bytes() == data
    assert [p.name for p in out.iterdir()] == ["big.bin"]  # no temporary file left


def test_directory_tree_with_unicode_and_empty_directory(relay_process, tmp_path):
    src = tmp_path / "photos"
    (src / "été" / "深い").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a.txt").write_text("hello\n")
    (src / "été" / "naïve café.jpg").write_bytes(os.urandom(100_000))
    (src / "été" / "深い" / "ファイル").write_bytes(b"x" * 70_000)
    (src / ".hidden").write_bytes(b"dot files are sent")
    (s, _, s_err), (r, _, r_err), out = transfer_through(relay_process, tmp_path, "photos")
    assert (s, r) == (0, 0), s_err + r_err
    assert tree_files(out / "photos") == tree_files(src)
    assert (out / "photos" / "empty").is_dir()


def test_wrong_code_fails_on_both_sides_and_writes_nothing(relay_process, tmp_path):
    (tmp_path / "f.txt").write_text("secret")
    out = tmp_path / "out"
    sender = peer("send", *relay_process.peer_args(), "--max-attempts", "1", "--password", CODE, "f.txt", cwd=tmp_path)
    time.sleep(0.5)
    receiver = peer("recv", *relay_process.peer_args(), "-y", "-o", f"{out}/", "123-cobalt-lemon-walrus", cwd=tmp_path)
    r, _, r_err = finish(receiver)
    s, _, s_err = finish(sender)
    assert r == 1 and s == 1
    # One line says why; the others are the states the receiver went through.
    assert "wrong code" in r_err and len(failure_lines(r_err)) == 1, r_err
    assert "wrong code" in s_err and "guessing" in s_err
    assert not out.exists() or not any(out.iterdir())


def test_a_mistyped_code_can_be_retried(relay_process, tmp_path):
    (tmp_path / "f.txt").write_text("contents")
    out = tmp_path / "out"
    sender = peer("send", *relay_process.peer_args(), "--password", CODE, "f.txt", cwd=tmp_path)
    time.sleep(0.5)
    wrong = peer("recv", *relay_process.peer_args(), "-y", "-o", f"{out}/", "123-cobalt-lemon-walrus", cwd=tmp_path)
    assert finish(wrong)[0] == 1
    right = peer("recv", *relay_process.peer_args(), "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
    r, _, r_err = finish(right)
    s, _, s_err = finish(sender)
    assert (s, r) == (0, 0), s_err + r_err
    assert "1 of 3 attempts" in s_err
    assert (out / "f.txt").read_text() == "contents"


def test_receiver_declines(relay_process, tmp_path):
    (tmp_path / "f.txt").write_text("unwanted")
    out = tmp_path / "out"
    sender = peer("send", *relay_process.peer_args(), "--password", CODE, "f.txt", cwd=tmp_path)
    receiver = peer("recv", *relay_process.peer_args(), "-o", f"{out}/", CODE, cwd=tmp_path, stdin=subprocess.PIPE)
    receiver.stdin.write(b"n\n")
    receiver.stdin.flush()
    r, _, r_err = finish(receiver)
    s, _, s_err = finish(sender)
    assert r == 1 and "declined" in r_err
    assert s == 1 and "declined" in s_err
    assert "f.txt (8 B)" in r_err  # the offer was shown before the question
    assert not (out / "f.txt").exists()


def test_sender_killed_mid_transfer_leaves_nothing_without_resume(relay_process, tmp_path):
    (tmp_path / "huge.bin").write_bytes(os.urandom(64 * 1024 * 1024))
    out = tmp_path / "out"
    sender = peer("send", *relay_process.peer_args(), "--password", CODE, "huge.bin", cwd=tmp_path)
    # A slow reader: the receiver writes through a pipe we do not drain until the kill.
    receiver = peer("recv", *relay_process.peer_args(), "-y", "--no-resume", "-o", f"{out}/", CODE, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        parts = list(out.glob("*.peer-part")) if out.exists() else []
        if parts and parts[0].stat().st_size > 0:
            break
        if receiver.poll() is not None:
            break
        time.sleep(0.005)
    sender.send_signal(signal.SIGKILL)
    sender.communicate()
    r, _, r_err = finish(receiver)
    if r == 0:
        pytest.skip("the transfer finished before the kill landed (machine too fast)")
    assert r == 1
    assert "went away" in r_err or "connection" in r_err, r_err
    # The partial file was removed, and so was the output directory the receiver made.
    assert not out.exists()


def test_two_senders_one_receiver_gets_the_right_file(relay_process, tmp_path):
    (tmp_path / "a.txt").write_text("from A")
    (tmp_path / "b.txt").write_text("from B")
    out = tmp_path / "out"
    # Same nameplate, different words: the receiver has to run both handshakes.
    a = peer("send", *relay_process.peer_args(), "--password", "123-apple-grape-melon", "a.txt", cwd=tmp_path)
    b = peer("send", *relay_process.peer_args(), "--password", CODE, "b.txt", cwd=tmp_path)
    time.sleep(1.0)
    receiver = peer("recv", *relay_process.peer_args(), "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
    r, _, r_err = finish(receiver)
    s, _, s_err = finish(b)
    assert (r, s) == (0, 0), r_err + s_err
    assert [p.name for p in out.iterdir()] == ["b.txt"]
    assert (out / "b.txt").read_text() == "from B"
    assert a.poll() is None  # A is still waiting for its own receiver
    a.send_signal(signal.SIGTERM)
    finish(a)


def test_missing_path_and_unreachable_relay(tmp_path):
    s, _, err = finish(peer("send", "--relay", "127.0.0.1:1", "nope.txt", cwd=tmp_path))
    assert s == 1 and "nope.txt" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "f").write_text("x")
    s, _, err = finish(peer("send", "--relay", "127.0.0.1:1", "--password", CODE, "f", cwd=tmp_path))
    assert s == 1 and "cannot reach the relay at 127.0.0.1:1: connection refused" in err
    r, _, err = finish(peer("recv", "--relay", "127.0.0.1:1", CODE, cwd=tmp_path))
    assert r == 1 and "cannot reach the relay" in err
    r, _, err = finish(peer("recv", CODE, cwd=tmp_path))
    assert r == 1 and "no relay given" in err


def test_existing_file_is_not_overwritten(relay_process, tmp_path):
    (tmp_path / "f.txt").write_text("new")
    out = tmp_path / "out"
    out.mkdir()
    (out / "f.txt").write_text("old")
    (s, _, s_err), (r, _, r_err), _ = transfer_through(relay_process, tmp_path, "f.txt")
    assert r == 1 and "f.txt" in r_err and "exists" in r_err, r_err
    assert s == 1
    assert (out / "f.txt").read_text() == "old"
    (s, _, s_err), (r, _, r_err), _ = transfer_through(relay_process, tmp_path, "f.txt", recv_extra=["--rename"])
    assert (s, r) == (0, 0), s_err + r_err
    assert (out / "f.txt").read_text() == "old"
    assert (out / "f (1).txt").read_text() == "new"
    assert "f.txt existed already: saved as f (1).txt" in r_err
    (s, _, s_err), (r, _, r_err), _ = transfer_through(relay_process, tmp_path, "f.txt", recv_extra=["--overwrite"])
    assert (s, r) == (0, 0), s_err + r_err
    assert (out / "f.txt").read_text() == "new"
    r, _, r_err = finish(peer("recv", "--overwrite", "--rename", "x", cwd=tmp_path))
    assert r == 2 and "not allowed with" in r_err


def test_embedded_relay_prints_the_command_to_type(tmp_path):
    (tmp_path / "f.txt").write_text("lan")
    sender = peer("send", "--password", CODE, "f.txt", cwd=tmp_path)
    # Read the instruction line, then run exactly what it says (against loopback).
    line = b""
    deadline = time.monotonic() + 20
    while b"peer recv" not in line and time.monotonic() < deadline:
        line = sender.stderr.readline()
    words = line.decode().split("run: ", 1)[1].split()
    assert words[:3] == ["peer", "recv", "--relay"]
    port = words[3].rsplit(":", 1)[1]
    extra = words[4:6] if words[4] == "--secure-port" else []
    out = tmp_path / "out"
    receiver = peer("recv", "--relay", f"127.0.0.1:{port}", *extra, "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
    r, _, r_err = finish(receiver)
    s, _, s_err = finish(sender)
    assert (s, r) == (0, 0), s_err + r_err
    assert (out / "f.txt").read_text() == "lan"


@pytest.mark.parametrize("hostile", ["../x", "/tmp/peer-relay-absolute", "a/../../x"])
async def test_hostile_sender_names_are_refused(relay_process, tmp_path, hostile):
    """A scripted sender that bypasses our Offer checks and lists a name escaping the destination."""
    out = tmp_path / "dest" / "out"
    out.mkdir(parents=True)
    receiver = peer("recv", *relay_process.peer_args(), "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
    address = RelayAddress("127.0.0.1", relay_process.port, relay_process.secure_port)
    with trio.fail_after(30):
        meeting = await meet(address, handshake.SenderHandshake(CODE.encode()), notify=lambda e: None)
        keys = meeting.paired.keys
        channel = Channel(
            meeting.stream, send_key=keys.sender_to_receiver, receive_key=keys.receiver_to_sender
        )
        await channel.receive()  # the receiver's hello
        document = {
            "version": 1, "features": [], "file_count": 1, "total_bytes": 4,
            "entries": [{"kind": "file", "path": hostile, "size": 4, "executable": False}],
        }
        await channel.send(messages.OfferPart(False, json.dumps(document).encode()).encode())
        await channel.flush()
        reply = await channel.receive()
        await channel.abort()
    assert reply[0] == messages.Error.TYPE
    r, _, r_err = await trio.to_thread.run_sync(finish, receiver)
    assert r == 1 and len(failure_lines(r_err)) == 1, r_err
    assert list(out.iterdir()) == []
    assert not (tmp_path / "dest" / "x").exists() and not (tmp_path / "x").exists()
    assert not Path("/tmp/peer-relay-absolute").exists()


def test_text_message_is_printed_by_the_receiver_and_nothing_is_written(relay_process, tmp_path):
    message = "Meet at 10:30\nroom B\u00e9\t\x1b[31mred\x1b[0m"
    out = tmp_path / "out"
    sender = peer("send", *relay_process.peer_args(), "--password", CODE, "--text", message, cwd=tmp_path)
    receiver = peer("recv", *relay_process.peer_args(), "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
    r, r_out, r_err = finish(receiver)
    s, _, s_err = finish(sender)
    assert (s, r) == (0, 0), s_err + r_err
    assert r_out == message + "\n"  # a pipe gets the text exactly as sent
    assert "a text message (35 B)" in r_err
    assert "receiver confirmed" in s_err
    assert not out.exists()
    s, _, err = finish(peer("send", "--text", "x", "f.txt", cwd=tmp_path))
    assert s == 2 and "not both" in err
