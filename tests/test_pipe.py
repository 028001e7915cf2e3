"""The secure room's blind pipe over real loopback TCP: intact bytes, ordered close, no leaks."""

from __future__ import annotations

import os
import random

import pytest
import trio

from relay import pipe
from relay.pipe import CLOSE_MARKER, blind_pipe

MIB = 1 << 20
LIMIT = 20  # seconds: every test is bounded even if the pipe hangs


@pytest.fixture(params=["splice", "buffer"])
def carrier(request, monkeypatch):
    """Run each test through the kernel splice path and through the user-space fallback."""
    if request.param == "splice":
        if not pipe.splice_available():
            pytest.skip("no splice on this system")
    else:
        monkeypatch.setattr(pipe, "_splice_usable", False)
    return request.param


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of one loopback TCP connection: (the peer's, the relay's)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        peer = await trio.open_tcp_stream("127.0.0.1", port)
        relay_side = await listeners[0].accept()
    finally:
        await listeners[0].aclose()
    return peer, relay_side


async def read_all(stream: trio.SocketStream) -> bytes:
    """Everything up to EOF."""
    chunks = bytearray()
    while True:
        data = await stream.receive_some(256 * 1024)
        if not data:
            return bytes(chunks)
        chunks += data


async def read_exactly(stream: trio.SocketStream, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        data = await stream.receive_some(min(256 * 1024, size - len(chunks)))
        assert data, f"EOF after {len(chunks)} of {size} bytes"
        chunks += data
    return bytes(chunks)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Room:
    """Two peers joined by a blind_pipe running in the background."""

    def __init__(self) -> None:
        self.stats: pipe.PipeStats | None = None
        self.done = trio.Event()

    async def start(self, nursery: trio.Nursery) -> tuple[trio.SocketStream, trio.SocketStream]:
        peer_a, relay_a = await tcp_pair()
        peer_b, relay_b = await tcp_pair()
        nursery.start_soon(self._run, relay_a, relay_b)
        return peer_a, peer_b

    async def _run(self, relay_a, relay_b) -> None:
        self.stats = await blind_pipe(relay_a, relay_b)
        self.done.set()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count descriptors")
async def test_ten_mib_each_way_at_once_arrive_intact(carrier):
    fds_before = open_fds()
    rng = random.Random(1)
    a_data = rng.randbytes(10 * MIB)
    b_data = rng.randbytes(10 * MIB)
    received: dict[str, bytes] = {}
    room = Room()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            peer_a, peer_b = await room.start(nursery)

            async def receive(name, stream, size):
                received[name] = await read_exactly(stream, size)

            async with trio.open_nursery() as transfer:
                transfer.start_soon(peer_a.send_all, a_data)
                transfer.start_soon(peer_b.send_all, b_data)
                transfer.start_soon(receive, "a", peer_a, len(b_data))
                transfer.start_soon(receive, "b", peer_b, len(a_data))
            assert received["b"] == a_data
            assert received["a"] == b_data
            await peer_a.aclose()
            assert await read_all(peer_b) == CLOSE_MARKER
            await peer_b.aclose()
            await room.done.wait()
    assert room.stats == pipe.PipeStats(
        10 * MIB, 10 * MIB, "a", "EOF", spliced=(carrier == "splice")
    )
    assert open_fds() == fds_before  # the pipe closed both sockets and its kernel pipes


async def test_one_side_closing_marks_the_end_on_both(carrier):
    room = Room()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            peer_a, peer_b = await room.start(nursery)
            await peer_a.send_eof()  # half-close: a can still read what the relay sends it
            assert await read_all(peer_a) == CLOSE_MARKER
            assert await read_all(peer_b) == CLOSE_MARKER
            await peer_a.aclose()
            await peer_b.aclose()
            await room.done.wait()
    assert (room.stats.ended_by, room.stats.reason) == ("a", "EOF")


async def test_bytes_in_flight_are_flushed_before_the_marker(carrier):
    data = random.Random(2).randbytes(3 * MIB)
    room = Room()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            peer_a, peer_b = await room.start(nursery)

            async def send_then_close():
                await peer_a.send_all(data)
                await peer_a.aclose()

            nursery.start_soon(send_then_close)
            # b reads nothing until a has gone, so the end arrives while the relay holds bytes.
            await trio.sleep(0.3)
            assert await read_all(peer_b) == data + CLOSE_MARKER
            await peer_b.aclose()
    assert room.stats.a_to_b == len(data)


async def test_a_reset_destination_ends_the_room_and_the_other_side_is_told(carrier):
    room = Room()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            peer_a, peer_b = await room.start(nursery)
            # Close b with a reset (linger 0) while a keeps talking to it.
            peer_b.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            await peer_b.aclose()

            async def keep_sending():
                try:
                    for _ in range(200):
                        await peer_a.send_all(b"x" * 65536)
                except trio.BrokenResourceError:
                    pass

            async with trio.open_nursery() as sending:
                sending.start_soon(keep_sending)
                assert await read_all(peer_a) == CLOSE_MARKER
                sending.cancel_scope.cancel()
            await peer_a.aclose()
            await room.done.wait()
    assert room.stats.ended_by == "b"


async def test_cancelled_pipe_still_marks_the_end_and_closes(carrier):
    peer_a, relay_a = await tcp_pair()
    peer_b, relay_b = await tcp_pair()
    with trio.fail_after(LIMIT):
        with trio.move_on_after(0.2):
            await blind_pipe(relay_a, relay_b)
        assert relay_a.socket.fileno() == -1 and relay_b.socket.fileno() == -1
        assert await read_all(peer_a) == CLOSE_MARKER
        assert await read_all(peer_b) == CLOSE_MARKER
    await peer_a.aclose()
    await peer_b.aclose()


async def test_a_plain_trio_socket_is_accepted_too():
    peer_a, relay_a = await tcp_pair()
    peer_b, relay_b = await tcp_pair()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blind_pipe, relay_a.socket, relay_b.socket)
            await peer_a.send_all(b"hello")
            assert await read_exactly(peer_b, 5) == b"hello"
            await peer_b.aclose()
            assert await read_all(peer_a) == CLOSE_MARKER
            await peer_a.aclose()
