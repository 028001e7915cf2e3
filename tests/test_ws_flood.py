"""WebSocket ping floods against a real relay process (issue 16, finding 3).

A peer that stops reading leaves the relay's send to it blocked, holding that connection's
send lock; every ping the same connection sends meanwhile used to queue one more pong, so
memory grew with the flood (18 MiB of pings took the relay from 50 to 263 MiB). Both ends of
a room, and both peers of a handshake, are the attacker's here: nothing secret is needed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from peer import handshake
from peer.address import parse_relay
from peer.meeting import meet
from relay import frames, websocket, wire
from relay.limits import RoomMeter
from relay.pipe import STALLED, blind_pipe
from relay.transports import Endpoint, stream_pipe
from relay.websocket import WebSocketStream, connect

from transport_helpers import CODE, start_relay

needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")

PING = b"\x89\x80\x00\x00\x00\x00"
"""An empty masked ping: 6 bytes on the wire, the cheapest frame a client can send."""
FLOOD = 16 << 20
"""Bytes of pings sent at most (2.8 million pings)."""
BATCH = 64 * 1024 // len(PING) * PING
RSS_BOUND = 30 << 20
"""Bytes the relay may grow by while it is flooded."""
STALL = 30.0
"""Seconds a batch of pings may wait for the relay to read it (or to close the connection:
a handshake connection that cannot take its last packets gets a few seconds for them)."""


def rss(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} line")


async def settled_rss(pid: int, limit: float = 15.0) -> int:
    """The relay's largest RSS once it stopped growing (it may still be decoding the flood
    that sat in the socket buffers when the last write returned)."""
    largest, last, steady = 0, -1, 0
    with trio.move_on_after(limit):
        while steady < 4:
            await trio.sleep(0.25)
            now = rss(pid)
            largest = max(largest, now)
            steady = steady + 1 if abs(now - last) < (256 << 10) else 0
            last = now
    return max(largest, rss(pid))


async def flood(transport: trio.SocketStream) -> tuple[int, str]:
    """Send pings until FLOOD bytes went or the relay stops taking them; say how many went
    and how it ended ("" when all went)."""
    sent = 0
    while sent < FLOOD:
        with trio.move_on_after(STALL) as stalled:
            try:
                await transport.send_all(BATCH)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                return sent, f"cut: {error.__cause__ or error}"
        if stalled.cancelled_caught:
            return sent, "stalled"
        sent += len(BATCH)
    return sent, ""


def small_receive_buffer() -> socket.socket:
    """A client socket that holds little of what it does not read, so the relay's writes to
    it block soon."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    return sock


async def open_ws(port: int, path: str) -> WebSocketStream:
    sock = trio.socket.from_stdlib_socket(small_receive_buffer())
    await sock.connect(("127.0.0.1", port))
    return await connect(trio.SocketStream(sock), host=f"127.0.0.1:{port}", path=path)


@pytest.fixture
def ws_relay():
    # --max-outbox: the handshake test's own sender fills its receiver's socket; with the
    # default 64 KiB the attacker must pace that to the byte, here it need not.
    relay = start_relay("--ws-port", "0", "--max-outbox", str(32 << 20))
    try:
        yield relay
    finally:
        relay.stop()


@needs_proc
async def test_pings_into_a_room_whose_peer_does_not_read(ws_relay):
    """The attacker's sender fills the room towards its receiver, which stops reading and
    floods pings: the relay must not queue a pong per ping (and cuts the flooder)."""
    pid = ws_relay.process.pid
    with trio.fail_after(90):
        address = parse_relay(f"ws://127.0.0.1:{ws_relay.ws_port}/")
        password = CODE.encode()
        meetings = {}

        async def join(name, machine) -> None:
            if name == "receiver":
                await trio.sleep(0.05)
            meetings[name] = await meet(address, machine, notify=lambda event: None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(join, "sender", handshake.SenderHandshake(password))
            nursery.start_soon(join, "receiver", handshake.ReceiverHandshake(password))
        sending, receiving = meetings["sender"].stream, meetings["receiver"].stream
        assert isinstance(receiving, WebSocketStream)
        chunk = bytes(1 << 20)
        for _ in range(256):  # until the relay's send to the receiver blocks
            with trio.move_on_after(1.0) as stalled:
                await sending.send_all(chunk)
            if stalled.cancelled_caught:
                break
        assert stalled.cancelled_caught, "the room took 256 MiB nobody reads"
        before = await settled_rss(pid)
        sent, ended = await flood(receiving.transport)
        after = await settled_rss(pid)
        grown = after - before
        print(f"\nroom: {sent / 2**20:.1f} MiB of pings ({ended or 'all sent'}): relay RSS "
              f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB (+{grown / 2**20:.1f} MiB)")
        assert grown < RSS_BOUND, f"the relay grew by {grown / 2**20:.0f} MiB from pings"
        assert ended.startswith("cut"), f"the flooder was not cut off ({ended or 'all sent'})"
        # The room is over for its other side too: its stream ends (marker, then close).
        with trio.fail_after(30):
            while await _receive_or_end(sending):
                pass
        await trio.aclose_forcefully(sending)
        await trio.aclose_forcefully(receiving)


@needs_proc
async def test_pings_on_the_handshake_port_while_the_relay_cannot_write(ws_relay):
    """A receiver on /handshake stops reading while its own sender makes the relay write to
    it until that blocks; then it floods pings."""
    pid = ws_relay.process.pid
    with trio.fail_after(90):
        port = ws_relay.ws_port
        receiver = await open_ws(port, "/handshake")
        await receiver.send_all(wire.encode(0, wire.HelloClient()))
        sender = await open_ws(port, "/handshake")
        await sender.send_all(wire.encode(0, wire.HelloServer(os.urandom(wire.PUBLIC_SIZE))))
        # The receiver learns its sender's UID, then says 07 so the sender learns its UID.
        server_uid = (await _next_packet(receiver, wire.Parser(), wire.NewServer)).server_uid
        await receiver.send_all(wire.encode(server_uid, wire.XAndClientIdentity(
            os.urandom(wire.POINT_SIZE), b"127.0.0.1:1")))
        client_uid = (await _next_frame(sender, wire.Parser(), wire.XAndClientIdentity)).uid
        # From here the receiver reads nothing. Its sender makes the relay write 8 MiB to it:
        # far more than both socket buffers hold, so the relay's writer is left blocked.
        packet = wire.encode(client_uid, wire.YAndServerValidator(
            os.urandom(wire.POINT_SIZE), os.urandom(wire.VALIDATOR_SIZE)))
        burst = packet * (64 * 1024 // len(packet))
        for _ in range((8 << 20) // len(burst)):
            await sender.send_all(burst)
        before = await settled_rss(pid)
        sent, ended = await flood(receiver.transport)
        after = await settled_rss(pid)
        grown = after - before
        print(f"\nhandshake: {sent / 2**20:.1f} MiB of pings ({ended or 'all sent'}): relay RSS "
              f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB (+{grown / 2**20:.1f} MiB)")
        assert grown < RSS_BOUND, f"the relay grew by {grown / 2**20:.0f} MiB from pings"
        assert ended.startswith("cut"), f"the flooder was not cut off ({ended or 'all sent'})"
        await trio.aclose_forcefully(sender)
        await trio.aclose_forcefully(receiver)


async def _receive_or_end(stream: trio.abc.Stream) -> bytes:
    try:
        return await stream.receive_some(1 << 20)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""


async def _next_frame(stream: trio.abc.Stream, parser: wire.Parser, kind: type) -> wire.Frame:
    while True:
        while (frame := parser.next_frame()) is not None:
            if isinstance(frame.packet, kind):
                return frame
        data = await stream.receive_some(4096)
        assert data, f"the relay closed before sending {kind.__name__}"
        parser.feed(data)


async def _next_packet(stream: trio.abc.Stream, parser: wire.Parser, kind: type):
    return (await _next_frame(stream, parser, kind)).packet


# -- the rules, in process ------------------------------------------------------------------


def ping(payload: bytes = b"") -> bytes:
    """A client's (masked) ping; the zero key leaves the payload as it is."""
    return bytes([0x89, 0x80 | len(payload)]) + bytes(4) + payload


async def read_frames(stream: trio.abc.Stream, count: int) -> list[tuple[int, bytes]]:
    """``count`` server frames (opcode, payload) from raw bytes; small frames only."""
    data, found = b"", []
    while len(found) < count:
        data += await stream.receive_some(65536)
        while len(data) >= 2:
            size = data[1] & 0x7F
            head = 2 if size < 126 else 4
            if size == 126 and len(data) >= 4:
                size = int.from_bytes(data[2:4], "big")
            if len(data) < head + size:
                break
            found.append((data[0] & 0x0F, data[head:head + size]))
            data = data[head + size:]
    return found


async def test_a_later_ping_replaces_the_pending_pong(monkeypatch):
    """While a send holds the connection, 2000 pings leave one pong to send: the last."""
    monkeypatch.setattr(websocket, "EMPTY_FRAME_BURST", 10_000)
    with trio.fail_after(20):
        peer_side, relay_side = trio.testing.lockstep_stream_pair()
        server = WebSocketStream(relay_side, client=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, b"held")  # blocks: nobody reads yet
            nursery.start_soon(server.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            for n in range(2000):
                await peer_side.send_all(ping(b"%d" % n))
            got = await read_frames(peer_side, 2)  # the held message, then the pong
            with trio.move_on_after(0.5):
                got += await read_frames(peer_side, 1)
            nursery.cancel_scope.cancel()
        assert got == [(frames.BINARY, b"held"), (frames.PONG, b"1999")]


async def test_frames_without_data_beyond_the_rate_close_the_connection():
    with trio.fail_after(20):
        peer_side, relay_side = trio.testing.memory_stream_pair()
        server = WebSocketStream(relay_side, client=False)
        empty_binary = b"\x82\x80" + bytes(4)
        await peer_side.send_all((ping() + empty_binary) * websocket.EMPTY_FRAME_BURST)
        with pytest.raises(trio.BrokenResourceError, match="too many control or empty frames"):
            while True:
                await server.receive_some()
        answers = await read_frames(peer_side, 1)
        while answers[-1][0] == frames.PONG:
            answers += await read_frames(peer_side, 1)
        assert answers[-1][0] == frames.CLOSE
        assert int.from_bytes(answers[-1][1][:2], "big") == frames.POLICY_VIOLATION


def test_the_frame_reader_counts_frames_without_data():
    reader = frames.FrameReader(masked=True, max_message=1 << 20)
    empty_binary = b"\x82\x80" + bytes(4)
    pong = b"\x8a\x83" + bytes(4) + b"abc"
    data = b"\x82\x83" + bytes(4) + b"xyz"
    reader.feed(ping(b"12") + empty_binary + pong + data + ping())
    list(reader.events())
    assert (reader.empty_frames, reader.empty_bytes) == (4, 8 + 6 + 9 + 6)


async def test_pings_count_against_the_rooms_rate():
    """Ping bytes cost the room's budget like data."""
    with trio.fail_after(20):
        meter = RoomMeter(rate=1, now=trio.current_time())  # 64 KiB of burst, no refill
        a_peer, a_relay = trio.socket.socketpair()
        b_peer, b_relay = trio.socket.socketpair()
        a_ws = WebSocketStream(trio.SocketStream(a_relay), client=False)
        a = Endpoint(a_ws, b"a:1", "ws", a_relay)
        b = Endpoint(trio.SocketStream(b_relay), b"b:1", "tcp", b_relay)
        pings = 40
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: stream_pipe(a, b, meter=meter))
            a_stream, b_stream = trio.SocketStream(a_peer), trio.SocketStream(b_peer)
            await a_stream.send_all(ping(b"x" * 100) * pings + b"\x82\x85" + bytes(4) + b"hello")
            got = b""
            while len(got) < 5:
                got += await b_stream.receive_some(100)
            assert got == b"hello"
            spent = meter.bucket.burst - meter.bucket.available(trio.current_time())
            assert spent >= pings * 106
            await a_stream.aclose()
            await b_stream.aclose()


@pytest.mark.parametrize("kind", ["spliced", "streams"])
async def test_a_side_that_stops_reading_ends_the_room(kind):
    """Its partner keeps sending; past ``stall`` seconds without a byte taken, the room ends
    (before, the pipe waited for it for ever)."""
    with trio.fail_after(30):
        a_peer, a_relay = trio.socket.socketpair()
        b_peer, b_relay = trio.socket.socketpair()
        for sock in (a_relay, b_peer):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        result = []

        async def pipe() -> None:
            if kind == "spliced":
                result.append(await blind_pipe(a_relay, b_relay, stall=0.5))
            else:
                ends = [Endpoint(trio.SocketStream(s), name, "tcp", s)
                        for s, name in ((a_relay, b"a:1"), (b_relay, b"b:1"))]
                result.append(await stream_pipe(*ends, stall=0.5))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe)
            sender = trio.SocketStream(a_peer)
            try:
                for _ in range(1000):  # b never reads
                    await sender.send_all(bytes(1 << 20))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        assert result[0].ended_by == "b" and result[0].reason == STALLED
        a_peer.close()
        b_peer.close()
