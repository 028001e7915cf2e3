"""A hostile relay against the bob fallback (issue 16, finding 6): real peers, a real relay.

A small TCP proxy stands in front of the real relay for one peer and plays the relay's
worst: it holds back what our receiver says in the room, or rewrites the cipher ids of
the sender's public in the 04 announcement. Whatever it does, our sender exits 0 only
after our receiver's authenticated ACK, or after a clean close following the whole PACK,
and then it says that the receiver could not confirm anything (the one thing a relay can
always fake, since a real bob receiver confirms nothing: see docs/security.md).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Awaitable, Callable

import pytest
import trio
import trio.testing

from peer import cli, sending, spoke
from relay import wire
from processes import finish, peer

CODE = "417-cobalt-lemon-unicycle"
CIPHER0, CIPHER1 = 12, 14  # offsets of the cipher ids in the 34-byte public (docs/protocol.md)
LATE = sending.BOB_WAIT + 4.0
"""How long the proxy holds our receiver's HELLO back: past the sender's wait for it."""

Relay = Callable[[trio.SocketStream, trio.SocketStream], Awaitable[None]]


async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    """Copy one direction until its end, then pass the end on."""
    try:
        async for data in source:
            await sink.send_all(data)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def serve_proxy(target: int, downstream: Relay, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on loopback; each client gets its own connection to ``target``. Client to relay
    goes through untouched; ``downstream`` decides what of relay to client gets through."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(client: trio.SocketStream) -> None:
        relay = await trio.open_tcp_stream("127.0.0.1", target)
        async with client, relay:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, relay)
                await downstream(relay, client)
                nursery.cancel_scope.cancel()

    await trio.serve_listeners(handle, listeners)


async def read_exactly(stream: trio.SocketStream, count: int, buffer: bytearray) -> bytes | None:
    while len(buffer) < count:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    taken = bytes(buffer[:count])
    del buffer[:count]
    return taken


async def drain(stream: trio.SocketStream) -> None:
    """Swallow what the relay says until it ends the room."""
    try:
        while await stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def reset(stream: trio.SocketStream) -> None:
    """Hang up with a TCP reset instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def room(*, hello_after: float | None, rest: bool, hang_up: str) -> Relay:
    """The relay-to-sender side of a secure room: the room's status goes through; our
    receiver's first record (its HELLO) after ``hello_after`` seconds, or never (None); the
    records after it too if ``rest``; then, once the real relay ended the room, the proxy
    hangs up on the sender with ``eof`` or ``reset``."""

    async def downstream(relay: trio.SocketStream, client: trio.SocketStream) -> None:
        buffer = bytearray()
        status = await read_exactly(relay, 2, buffer)
        if status is None:
            return
        await client.send_all(status)
        if hello_after is not None:
            with trio.move_on_after(hello_after):
                while data := await relay.receive_some(65536):
                    buffer += data
                await trio.sleep_forever()  # the room ended early: still hold the HELLO back
            first = 2 + int.from_bytes(buffer[:2], "big") + 16
            await client.send_all(bytes(buffer[:first]))
            if rest:
                await client.send_all(bytes(buffer[first:]))
                await pump(relay, client)
                return
        await drain(relay)
        if hang_up == "reset":
            reset(client)

    return downstream


def rewrite_public(offset: int, value: int) -> Relay:
    """The handshake port, relay to receiver: every 04 announces the sender's public with the
    cipher id at ``offset`` replaced by ``value`` (bob's cipher1 is ChaCha20, 2)."""

    async def downstream(relay: trio.SocketStream, client: trio.SocketStream) -> None:
        parser = wire.Parser()
        async for data in relay:
            parser.feed(data)
            out = []
            for frame in parser.frames():
                packet = frame.packet
                if isinstance(packet, wire.NewServer):
                    public = packet.public[:offset] + value.to_bytes(2, "big") + packet.public[offset + 2 :]
                    packet = wire.NewServer(packet.server_uid, public, packet.identity)
                out.append(wire.encode(frame.uid, packet))
            await client.send_all(b"".join(out))

    return downstream


async def transfer(relay_process, tmp_path, nursery, *, sender_room: Relay | None = None,
                   receiver_handshake: Relay | None = None, size: int = 100_000):
    """One ``peer send`` of a file to one ``peer recv``, each through its proxy if given;
    returns both (status, stdout, stderr) and the data sent."""
    data = os.urandom(size)
    (tmp_path / "payload.bin").write_bytes(data)
    send_args = relay_process.peer_args()
    if sender_room is not None:
        port = await nursery.start(serve_proxy, relay_process.secure_port, sender_room)
        send_args = ["--relay", relay_process.address, "--secure-port", str(port)]
    recv_args = relay_process.peer_args()
    if receiver_handshake is not None:
        port = await nursery.start(serve_proxy, relay_process.port, receiver_handshake)
        recv_args = ["--relay", f"127.0.0.1:{port}", "--secure-port", str(relay_process.secure_port)]
    sender = peer("send", *send_args, "--password", CODE, "payload.bin", cwd=tmp_path)
    receiver = peer("recv", *recv_args, "-y", "-o", f"{tmp_path / 'out'}/", CODE, cwd=tmp_path)
    sent = await trio.to_thread.run_sync(finish, sender)
    received = await trio.to_thread.run_sync(finish, receiver)
    return sent, received, data


async def test_a_withheld_hello_then_a_reset_is_a_failure(relay_process, tmp_path):
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            (status, _, err), _, _ = await transfer(
                relay_process, tmp_path, nursery, sender_room=room(hello_after=None, rest=False, hang_up="reset"))
        nursery.cancel_scope.cancel()
    assert status == 1, err
    errors = [line for line in err.splitlines() if line.startswith("peer: ")]
    assert len(errors) == 1 and "connection" in errors[0], err
    assert "bob cannot confirm" not in err and "the receiver confirmed" not in err, err


async def test_a_late_hello_without_an_ack_is_a_failure(relay_process, tmp_path):
    # Our receiver greets, gets the PACK, verifies it, ACKs; the relay lets the sender see
    # only the late HELLO and then a clean close. The receiver is ours: that is not enough.
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            (status, _, err), (rstatus, _, rerr), data = await transfer(
                relay_process, tmp_path, nursery, sender_room=room(hello_after=LATE, rest=False, hang_up="eof"))
        nursery.cancel_scope.cancel()
    assert status == 1, err
    assert "confirm" in err, err
    assert rstatus == 0, rerr
    assert (tmp_path / "out" / "payload.bin").read_bytes() == data


async def test_a_late_hello_and_its_ack_confirm_the_pack(relay_process, tmp_path):
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            (status, _, err), (rstatus, _, rerr), data = await transfer(
                relay_process, tmp_path, nursery, sender_room=room(hello_after=LATE, rest=True, hang_up="eof"))
        nursery.cancel_scope.cancel()
    assert status == 0, err
    assert "the receiver confirmed every byte" in err, err
    assert rstatus == 0, rerr
    assert (tmp_path / "out" / "payload.bin").read_bytes() == data


async def test_a_late_hello_and_its_ack_confirm_a_directory_pack(relay_process, tmp_path):
    tree = tmp_path / "album"
    (tree / "sub" / "empty").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha\n" * 1000)
    (tree / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    (tree / "sub" / "zero").write_bytes(b"")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_proxy, relay_process.secure_port, room(hello_after=LATE, rest=True, hang_up="eof"))
        with trio.fail_after(60):
            sender = peer("send", "--relay", relay_process.address, "--secure-port", str(port),
                          "--password", CODE, "album", cwd=tmp_path)
            receiver = peer("recv", *relay_process.peer_args(), "-y", "-o", f"{tmp_path / 'out'}/", CODE, cwd=tmp_path)
            status, _, err = await trio.to_thread.run_sync(finish, sender)
            rstatus, _, rerr = await trio.to_thread.run_sync(finish, receiver)
        nursery.cancel_scope.cancel()
    assert status == 0 and "Sent 3 files" in err and "the receiver confirmed every byte" in err, err
    assert rstatus == 0, rerr
    assert (tmp_path / "out" / "album" / "sub" / "b.bin").read_bytes() == (tree / "sub" / "b.bin").read_bytes()
    assert (tmp_path / "out" / "album" / "sub" / "empty").is_dir()


async def test_a_withheld_hello_then_a_clean_close_claims_no_confirmation(relay_process, tmp_path):
    # The residual risk: silence then a clean close is all a real bob receiver ever says,
    # so a relay can fake it. The sender then says that nothing was confirmed.
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            (status, _, err), _, _ = await transfer(
                relay_process, tmp_path, nursery, sender_room=room(hello_after=None, rest=False, hang_up="eof"))
        nursery.cancel_scope.cancel()
    assert status == 0, err
    assert "bob cannot confirm" in err and "the receiver confirmed" not in err, err


@pytest.mark.parametrize("offset, cipher", [
    (CIPHER1, spoke.CIPHER_CHACHA20_POLY1305), (CIPHER1, spoke.CIPHER_AES_CCM16), (CIPHER0, spoke.CIPHER_AES_CCM16),
])
async def test_a_rewritten_cipher_id_cannot_force_the_bob_fallback(relay_process, tmp_path, offset, cipher):
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            (status, _, err), (rstatus, _, rerr), _ = await transfer(
                relay_process, tmp_path, nursery, receiver_handshake=rewrite_public(offset, cipher))
        nursery.cancel_scope.cancel()
    # Never a claim of success that nobody confirmed: either the full ACK or a clear failure.
    assert status == 1, err
    assert "the relay altered the handshake" in err, err
    assert rstatus == 1 and "the relay altered the handshake" in rerr, rerr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


class _Keys:
    def __init__(self, cipher1: int) -> None:
        self.ciphers = (0, cipher1)


def _agreed(iterations: int, cipher1: int):
    public = spoke.Public(iterations=iterations, cipher0=0, cipher1=cipher1, salt=bytes(16))
    return _Paired(public, _Keys(cipher1))


class _Paired:
    def __init__(self, public, keys) -> None:
        self.public, self.keys = public, keys


def test_only_bob_parameters_make_a_bob_sender():
    """bob is told by what the keys are bound to (its 16 iterations), not by the cipher ids
    alone, which the handshake does not bind."""
    assert cli._is_bob(_agreed(16, spoke.CIPHER_CHACHA20_POLY1305))
    assert not cli._is_bob(_agreed(spoke.DEFAULT_ITERATIONS, spoke.CIPHER_CHACHA20_POLY1305))
    assert not cli._is_bob(_agreed(spoke.DEFAULT_ITERATIONS, 0))
    assert not cli._is_bob(_agreed(16, 0))


async def test_no_bob_turns_a_silent_receiver_into_a_failure():
    # `peer send --no-bob` gives send_selection no bob fallback: the withheld HELLO that
    # the tests above turn into "bob cannot confirm" is then a plain failure.
    from peer.channel import Channel
    from peer.source import text_selection
    from peer.errors import TransferFailed

    assert cli.build_parser().parse_args(["send", "--no-bob", "x"]).no_bob
    ours, silent = trio.testing.memory_stream_pair()
    channel = Channel(ours, send_key=os.urandom(64), receive_key=os.urandom(64))
    fell_back = []

    async def to_bob(session):
        fell_back.append(session)

    with trio.fail_after(20):
        with pytest.raises(TransferFailed, match="did not greet us"):
            await sending.send_selection(channel, text_selection("hi"), to_bob=None, bob_wait=0.2)
        assert fell_back == []
    await silent.aclose()
