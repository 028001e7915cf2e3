"""Our peers against scripted bob peers, through a real peer-relay process.

The bob stand-ins below do what bob's own peers do on the wire (bob-behaviour.md): the
sender advertises ciphers (0, 2) and PBKDF2 count 16 and sends a PACK cut the way bob cuts
it (2047-byte zlib pieces at level 4); the receiver sends nothing in the room, reads the
pack to its trailer and hangs up.
"""

from __future__ import annotations

import os
import socket
import struct

import trio

from peer import handshake, pack, spoke
from peer.address import RelayAddress
from peer.channel import Channel, ChannelClosed
from peer.meeting import meet
from processes import finish, peer

BOB_PASSWORD = "wei-widwagamboostu"  # the shape of bob's generated passwords: no nameplate


def relay_address(relay) -> RelayAddress:
    return RelayAddress("127.0.0.1", relay.port, relay.secure_port)


async def bob_sender(relay, password: str, records) -> None:
    machine = handshake.SenderHandshake(
        password.encode(), iterations=16, ciphers=(spoke.CIPHER_AES256_GCM, spoke.CIPHER_CHACHA20_POLY1305)
    )
    meeting = await meet(relay_address(relay), machine, notify=lambda event: None)
    keys = meeting.paired.keys
    # bob would open the other direction with ChaCha20; it only ever reads the close marker.
    channel = Channel(meeting.stream, send_key=keys.sender_to_receiver, receive_key=keys.receiver_to_sender)
    for record in records:
        await channel.send(record)
    await channel.flush()
    try:
        await channel.receive()
        raise AssertionError("our receiver sent a record to a bob sender")
    except ChannelClosed:
        pass
    await channel.abort()


async def bob_receiver(relay, password: str) -> dict[str, bytes | None]:
    machine = handshake.ReceiverHandshake(password.encode())
    meeting = await meet(relay_address(relay), machine, notify=lambda event: None)
    keys = meeting.paired.keys
    channel = Channel(meeting.stream, send_key=keys.receiver_to_sender, receive_key=keys.sender_to_receiver)
    got: dict[str, bytes | None] = {}
    with pack.PackReader() as reader:
        name = None
        while not reader.finished:
            reader.feed(await channel.receive())
            while (event := reader.next_event()) is not None:
                if isinstance(event, pack.SingleFile):
                    name = event.name
                    got[name] = b""
                elif isinstance(event, pack.FileData):
                    got[name] += event.data
                elif isinstance(event, pack.TreeEntry):
                    got[event.path] = (
                        b"".join(reader.iter_blob(event.id)) if event.kind == "file" else None
                    )
    await channel.abort()  # bob's receiver just exits: the relay tells the sender
    return got


async def bob_receiver_resetting(relay, password: str, after: int) -> int:
    """A bob receiver that breaks down once ``after`` bytes of the PACK arrived: it resets the
    connection (the relay turns that into a close towards the sender). Returns what it read."""
    machine = handshake.ReceiverHandshake(password.encode())
    meeting = await meet(relay_address(relay), machine, notify=lambda event: None)
    keys = meeting.paired.keys
    channel = Channel(meeting.stream, send_key=keys.receiver_to_sender, receive_key=keys.sender_to_receiver)
    got = 0
    while got < after:
        got += len(await channel.receive())
    meeting.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await channel.abort()
    return got


def single_file_pack(name: str, data: bytes):
    return pack.single_file_records(name, len(data), [data[i : i + 2047] for i in range(0, len(data), 2047)], 4, record_size=2047)


async def test_receive_a_file_from_bob(relay_process, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 7)
    out = tmp_path / "out"
    receiver = peer("recv", *relay_process.peer_args(), "-y", "-o", f"{out}/", BOB_PASSWORD, cwd=tmp_path)
    with trio.fail_after(60):
        await bob_sender(relay_process, BOB_PASSWORD, single_file_pack("photo.jpg", data))
    status, _, err = await trio.to_thread.run_sync(finish, receiver)
    assert status == 0, err
    assert (out / "photo.jpg").read_bytes() == data
    assert list(out.iterdir()) == [out / "photo.jpg"]


async def test_receive_a_directory_from_bob(relay_process, tmp_path):
    src = tmp_path / "album"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a.txt").write_text("alpha\n" * 1000)
    (src / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    (src / "sub" / "deeper" / "c").write_bytes(b"")
    directory = pack.directory_pack(src)
    out = tmp_path / "out"
    receiver = peer("recv", *relay_process.peer_args(), "-y", "-o", f"{out}/", BOB_PASSWORD, cwd=tmp_path)
    with trio.fail_after(60):
        await bob_sender(relay_process, BOB_PASSWORD, directory.records(4))
    status, _, err = await trio.to_thread.run_sync(finish, receiver)
    assert status == 0, err
    for path in src.rglob("*"):
        twin = out / "album" / path.relative_to(src)
        assert twin.is_dir() if path.is_dir() else twin.read_bytes() == path.read_bytes()
    assert (out / "album" / "empty").is_dir()


async def test_a_corrupted_bob_pack_writes_nothing(relay_process, tmp_path):
    records = list(single_file_pack("x.bin", os.urandom(100_000)))
    records[-1] = bytes(20)  # a wrong SHA-1 trailer
    out = tmp_path / "out"
    receiver = peer("recv", *relay_process.peer_args(), "-y", "-o", f"{out}/", BOB_PASSWORD, cwd=tmp_path)
    with trio.fail_after(60):
        await bob_sender(relay_process, BOB_PASSWORD, records)
    status, _, err = await trio.to_thread.run_sync(finish, receiver)
    assert status == 1, err
    errors = [line for line in err.splitlines() if line.startswith("peer: ")]
    assert len(errors) == 1 and "SHA-1 trailer does not match" in errors[0], err
    assert not out.exists()


async def test_send_a_file_to_bob(relay_process, tmp_path):
    data = os.urandom(2 * 1024 * 1024 + 3)
    (tmp_path / "notes.bin").write_bytes(data)
    sender = peer("send", *relay_process.peer_args(), "--password", BOB_PASSWORD, "notes.bin", cwd=tmp_path)
    with trio.fail_after(60):
        got = await bob_receiver(relay_process, BOB_PASSWORD)
    status, _, err = await trio.to_thread.run_sync(finish, sender)
    assert status == 0, err
    assert "bob cannot confirm" in err and "the receiver confirmed" not in err, err
    assert got == {"notes.bin": data}


async def test_a_bob_receiver_that_breaks_mid_pack_is_a_failure(relay_process, tmp_path):
    # Big enough that the sender is still sending when the close reaches it (the relay goes
    # on reading for a while after the close, so a sender that only looks once it is done
    # would take the close for bob's "done").
    (tmp_path / "big.bin").write_bytes(os.urandom(64 * 1024 * 1024))
    sender = peer("send", *relay_process.peer_args(), "--password", BOB_PASSWORD, "big.bin", cwd=tmp_path)
    with trio.fail_after(60):
        await bob_receiver_resetting(relay_process, BOB_PASSWORD, after=256 * 1024)
    status, _, err = await trio.to_thread.run_sync(finish, sender)
    assert status == 1, err
    errors = [line for line in err.splitlines() if line.startswith("peer: ")]
    assert len(errors) == 1 and "before the end" in errors[0], err


async def test_send_a_directory_to_bob(relay_process, tmp_path):
    src = tmp_path / "docs"
    (src / "nested").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "one.txt").write_text("one")
    (src / "nested" / "two.bin").write_bytes(os.urandom(70_000))
    sender = peer("send", *relay_process.peer_args(), "--password", BOB_PASSWORD, "docs", cwd=tmp_path)
    with trio.fail_after(60):
        got = await bob_receiver(relay_process, BOB_PASSWORD)
    status, _, err = await trio.to_thread.run_sync(finish, sender)
    assert status == 0, err
    assert got == {
        "docs/empty": None,
        "docs/nested": None,
        "docs/nested/two.bin": (src / "nested" / "two.bin").read_bytes(),
        "docs/one.txt": b"one",
    }


async def test_several_paths_cannot_go_to_bob(relay_process, tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    sender = peer("send", *relay_process.peer_args(), "--password", BOB_PASSWORD, "a", "b", cwd=tmp_path)
    with trio.move_on_after(30):
        try:
            await bob_receiver(relay_process, BOB_PASSWORD)
        except ChannelClosed:
            pass
    status, _, err = await trio.to_thread.run_sync(finish, sender)
    assert status == 1 and "one file or one directory" in err, err

