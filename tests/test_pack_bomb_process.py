"""Issue 16, finding 2, end to end: a pack bomb sent to a real ``peer recv`` through a real relay.

Two hostile senders: one of ours that switches to bob's payload by starting its stream
with ``PACK`` (the receiver then asks, and end of input declines), and a bob sender
accepted with ``-y`` whose pack hides a 960 MiB delta that no tree names (under the
old reader's 1 GiB budget, which spooled it all to ``$TMPDIR``). The receiver
runs with ``TMPDIR`` and ``-o`` pointed at fresh directories; a watcher polls both and
every regular file the receiver holds open (an anonymous spool has no name to list).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from peer import handshake, spoke
from peer.address import RelayAddress
from peer.channel import Channel, ChannelBroken, ChannelClosed
from peer.meeting import meet
from processes import finish, peer
from test_pack_bomb import SMALL, delta_bomb

PASSWORD = "wei-widwagamboostu"
RECORD = 32 * 1024

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")


def stored(pid: int, *directories: Path) -> int:
    """Bytes in files under `directories` plus in the spool files process `pid` has open."""
    total = 0
    for directory in directories:
        for root, _, files in os.walk(directory):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:
                    pass
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return total
    places = tuple(str(directory) for directory in directories)
    for fd in descriptors:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        # Its spools (unnamed or unlinked), anywhere; not the modules Python reads at start.
        spool = target.endswith("(deleted)") or target.startswith(places)
        if spool and (info.st_mode & 0o170000) == 0o100000:
            total += info.st_size
    return total


async def hostile_sender(relay, data: bytes, *, bob: bool) -> None:
    """Pair with the receiver, then send `data` as records (after its HELLO, when it is ours)."""
    ciphers = (spoke.CIPHER_AES256_GCM, spoke.CIPHER_CHACHA20_POLY1305 if bob else spoke.CIPHER_AES256_GCM)
    machine = handshake.SenderHandshake(PASSWORD.encode(), iterations=16, ciphers=ciphers)
    address = RelayAddress("127.0.0.1", relay.port, relay.secure_port)
    meeting = await meet(address, machine, notify=lambda event: None)
    keys = meeting.paired.keys
    channel = Channel(meeting.stream, send_key=keys.sender_to_receiver, receive_key=keys.receiver_to_sender)
    try:
        if not bob:
            await channel.receive()  # the receiver's HELLO: answered with a PACK, not an offer
        for start in range(0, len(data), RECORD):
            await channel.send(data[start : start + RECORD])
        await channel.flush()
        while True:
            await channel.receive()
    except (ChannelClosed, ChannelBroken):
        pass
    finally:
        await channel.abort()


async def run(relay, tmp_path: Path, data: bytes, *, bob: bool) -> tuple[int, str, int, Path, Path]:
    temp, out = tmp_path / "tmp", tmp_path / "out"
    temp.mkdir()
    out.mkdir()
    options = ["-y"] if bob else []  # ours asks, and end of input (stdin is /dev/null) declines
    receiver = peer("recv", *relay.peer_args(), *options, "-o", f"{out}/", PASSWORD, cwd=tmp_path, TMPDIR=str(temp))
    peak = 0
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal peak
                    for _ in range(60_000):  # 0.01 s apart: bounded by the deadline above
                        peak = max(peak, stored(receiver.pid, temp, out))
                        if receiver.poll() is not None:
                            break
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                await hostile_sender(relay, data, bob=bob)
                await trio.to_thread.run_sync(receiver.wait, 30)
    finally:
        status, _, err = await trio.to_thread.run_sync(finish, receiver)
    return status, err, peak, temp, out


async def test_a_pack_bomb_from_our_sender_is_declined_having_stored_nothing(relay_process, tmp_path):
    data = delta_bomb(960 << 20)  # one file, 960 MiB of zeros by delta, in a few hundred bytes
    assert len(data) < 4096
    status, err, peak, temp, out = await run(relay_process, tmp_path, data, bob=False)
    assert peak < SMALL, f"the receiver stored {peak} bytes"
    assert status != 0 and "declined" in err, err
    assert list(temp.iterdir()) == [] and list(out.iterdir()) == []


async def test_a_bob_pack_with_a_hidden_bomb_writes_only_what_it_showed(relay_process, tmp_path):
    data = delta_bomb(960 << 20, named=False)  # the tree names the 64 KiB base, not the 960 MiB delta
    status, err, peak, temp, out = await run(relay_process, tmp_path, data, bob=True)
    assert peak < SMALL, f"the receiver stored {peak} bytes"
    assert status == 0, err
    assert list(temp.iterdir()) == []
    assert [p.relative_to(out).as_posix() for p in sorted(out.rglob("*"))] == ["bomb", "bomb/big"]
    assert (out / "bomb" / "big").read_bytes() == bytes(0x10000)
