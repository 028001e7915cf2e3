"""The relay daemon end to end over loopback: scripted raw peers against a real ``serve``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from relay import wire
from relay.pipe import CLOSE_MARKER
from relay.server import BoundPorts, ListenError, RelayConfig, serve

from processes import first_line

PUBLIC = bytes.fromhex("00010002000000000000001000000002000400112233445566778899aabbccddeeff")
X = bytes(range(32))
Y = bytes(range(32, 64))
VALIDATOR_2 = bytes(range(64))
VALIDATOR_3 = bytes(range(64, 128))
MIB = 1 << 20
LIMIT = 15  # seconds: a bound on every test, whatever the relay does


def config(host: str = "127.0.0.1", **overrides) -> RelayConfig:
    return RelayConfig(hosts=(host,), port=0, secure_port=0, **overrides)


@contextlib.asynccontextmanager
async def running(cfg: RelayConfig):
    """A relay serving in the background; stopped (cleanly) on exit."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        ports: BoundPorts = await nursery.start(
            lambda task_status: serve(cfg, stop=stop, task_status=task_status))
        try:
            yield ports
        finally:
            stop.set()


class Peer:
    """A raw scripted connection to the handshake port."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = wire.Parser()
        host, port = stream.socket.getsockname()[:2]
        self.identity = wire.identity_of(host, port)

    @classmethod
    async def connect(cls, host: str, port: int) -> Peer:
        return cls(await trio.open_tcp_stream(host, port))

    async def send(self, uid: int, packet) -> None:
        await self.stream.send_all(wire.encode(uid, packet))

    async def frame(self) -> wire.Frame:
        while True:
            frame = self.parser.next_frame()
            if frame is not None:
                return frame
            data = await self.stream.receive_some(4096)
            if not data:
                raise EOFError("the relay closed the connection")
            self.parser.feed(data)

    async def expect(self, uid: int, packet) -> None:
        assert await self.frame() == wire.Frame(uid, packet)

    async def expect_eof(self) -> None:
        assert self.parser.pending() == 0
        assert self.parser.next_frame() is None
        try:
            data = await self.stream.receive_some(4096)
        except trio.BrokenResourceError:
            return  # a reset is an end too
        assert data == b"", f"expected the end, got {data!r}"

    async def close(self) -> None:
        await self.stream.aclose()


async def read_all(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(256 * 1024):
        data += chunk
    return bytes(data)


async def read_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(min(256 * 1024, size - len(data)))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


async def register(host: str, ports: BoundPorts) -> tuple[Peer, int, Peer, int]:
    """A server and a client registered; returns (server, server UID, client, client UID)."""
    server = await Peer.connect(host, ports.port)
    await server.send(0, wire.HelloServer(PUBLIC))
    await server.expect(0, wire.ServerIdentity(server.identity))
    client = await Peer.connect(host, ports.port)
    await client.send(0, wire.HelloClient())
    await client.expect(0, wire.ClientIdentity(client.identity))
    announce = await client.frame()
    assert announce.uid == 0
    assert announce.packet.public == PUBLIC and announce.packet.identity == server.identity
    server_uid = announce.packet.server_uid
    # The client's UID is learned from the first packet the relay forwards from it.
    await client.send(server_uid, wire.XAndClientIdentity(X, client.identity))
    x_frame = await server.frame()
    assert x_frame.packet == wire.XAndClientIdentity(X, client.identity)
    return server, server_uid, client, x_frame.uid


async def finish_handshake(server: Peer, server_uid: int, client: Peer, client_uid: int) -> None:
    """06, 05, 08 and 0a through the relay, each checked on arrival, up to the client's Done."""
    await server.send(client_uid, wire.YAndServerValidator(Y, VALIDATOR_2))
    await client.expect(server_uid, wire.YAndServerValidator(Y, VALIDATOR_2))
    await client.send(server_uid, wire.ClientValidator(VALIDATOR_3))
    await server.expect(client_uid, wire.ClientValidator(VALIDATOR_3))
    await server.send(client_uid, wire.Agreement())
    await client.expect(server_uid, wire.Agreement())
    await client.send(server_uid, wire.Accepted())
    await server.expect(client_uid, wire.Accepted())
    await client.expect(0, wire.Done())


async def agree(host: str, ports: BoundPorts) -> tuple[Peer, Peer]:
    """Run a whole handshake through the relay up to Accepted / Done and both closes."""
    server, server_uid, client, client_uid = await register(host, ports)
    await finish_handshake(server, server_uid, client, client_uid)
    await server.expect_eof()
    await client.expect_eof()
    await server.close()
    await client.close()
    return server, client


async def enter_room(host: str, port: int, ticket: bytes) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(ticket + b"\n")
    return stream


async def test_a_whole_transfer_through_handshake_and_secure_room():
    sent_by_server = os.urandom(10 * MIB)
    sent_by_client = os.urandom(10 * MIB)
    with trio.fail_after(LIMIT):
        async with running(config()) as ports:
            server, client = await agree("127.0.0.1", ports)
            # Each names its partner, as bob's peers do.
            server_room = await enter_room("127.0.0.1", ports.secure_port, client.identity)
            client_room = await enter_room("127.0.0.1", ports.secure_port, server.identity)
            assert await read_exactly(server_room, 2) == b"00"
            assert await read_exactly(client_room, 2) == b"00"
            got: dict[str, bytes] = {}

            async def server_side():
                async with trio.open_nursery() as both:
                    both.start_soon(server_room.send_all, sent_by_server)
                    got["server"] = await read_exactly(server_room, len(sent_by_client))
                await server_room.aclose()  # the receiver still has bytes in flight

            async def client_side():
                async with trio.open_nursery() as both:
                    both.start_soon(client_room.send_all, sent_by_client)
                    got["client"] = await read_all(client_room)
                await client_room.aclose()

            async with trio.open_nursery() as peers:
                peers.start_soon(server_side)
                peers.start_soon(client_side)
            assert got["server"] == sent_by_client
            assert got["client"] == sent_by_server + CLOSE_MARKER


async def test_a_room_works_over_ipv6():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("::1 not available")
    with trio.fail_after(LIMIT):
        async with running(config("::1")) as ports:
            server, client = await agree("::1", ports)
            assert server.identity.startswith(b"[::1]:")
            server_room = await enter_room("::1", ports.secure_port, client.identity)
            client_room = await enter_room("::1", ports.secure_port, server.identity)
            assert await read_exactly(server_room, 2) == b"00"
            assert await read_exactly(client_room, 2) == b"00"
            await server_room.send_all(b"over six")
            await server_room.aclose()
            assert await read_all(client_room) == b"over six" + CLOSE_MARKER
            await client_room.aclose()


async def test_an_unknown_ticket_gets_02():
    with trio.fail_after(LIMIT):
        async with running(config()) as ports:
            room = await enter_room("127.0.0.1", ports.secure_port, b"127.0.0.1:1")
            assert await read_all(room) == b"02"
            # A line longer than bob's 100-byte buffer is refused the same way.
            long = await enter_room("127.0.0.1", ports.secure_port, b"9" * 120)
            assert await read_all(long) == b"02"


async def test_no_ticket_in_time_gets_01():
    with trio.fail_after(LIMIT):
        async with running(config(room_timeout=0.3)) as ports:
            room = await trio.open_tcp_stream("127.0.0.1", ports.secure_port)
            await room.send_all(b"127.0.0.1:")  # no newline: never a whole line
            assert await read_all(room) == b"01"


async def test_a_half_whose_partner_never_comes_is_closed_without_a_status():
    with trio.fail_after(LIMIT):
        async with running(config(room_timeout=0.5)) as ports:
            server, client = await agree("127.0.0.1", ports)
            client_room = await enter_room("127.0.0.1", ports.secure_port, server.identity)
            assert await read_all(client_room) == b""  # closed at the room's deadline
            # The booking is gone with it: the partner is now refused.
            late = await enter_room("127.0.0.1", ports.secure_port, client.identity)
            assert await read_all(late) == b"02"


async def test_a_half_that_hangs_up_while_waiting_ends_its_room():
    with trio.fail_after(LIMIT):
        async with running(config()) as ports:
            server, client = await agree("127.0.0.1", ports)
            client_room = await enter_room("127.0.0.1", ports.secure_port, server.identity)
            await trio.sleep(0.05)  # let the relay seat it
            await client_room.aclose()
            await trio.sleep(0.2)  # let the relay notice
            # As in bob, the pair is single-use: once a half is gone the room is dead.
            late = await enter_room("127.0.0.1", ports.secure_port, client.identity)
            assert await read_all(late) == b"02"


async def test_a_malformed_packet_cuts_off_only_its_sender():
    with trio.fail_after(LIMIT):
        async with running(config()) as ports:
            server, server_uid, client, client_uid = await register("127.0.0.1", ports)
            rogue = await Peer.connect("127.0.0.1", ports.port)
            await rogue.send(0, wire.HelloClient())
            await rogue.expect(0, wire.ClientIdentity(rogue.identity))
            assert (await rogue.frame()).packet.server_uid == server_uid
            await rogue.stream.send_all(b"zz")
            await rogue.expect_eof()
            await rogue.close()
            # The rogue never spoke to the server, so the server hears nothing of it (it
            # knows only the UIDs of receivers that wrote to it), and the honest pair is
            # unaffected: the server's next packet is the honest handshake's.
            await finish_handshake(server, server_uid, client, client_uid)
            await server.close()
            await client.close()


async def test_a_silent_connection_is_closed_at_the_hello_deadline():
    with trio.fail_after(LIMIT):
        async with running(config(hello_timeout=0.3)) as ports:
            silent = await Peer.connect("127.0.0.1", ports.port)
            start = trio.current_time()
            await silent.expect_eof()
            assert trio.current_time() - start >= 0.25
            await silent.close()


async def test_the_handshake_timeout_sends_0f_and_tells_candidates():
    with trio.fail_after(LIMIT):
        async with running(config(timeout=1.0, hello_timeout=0.5)) as ports:
            server, server_uid, client, client_uid = await register("127.0.0.1", ports)
            # Both connected within a moment: both time out, each told of the other or
            # timed out first. Whatever the order, each ends with 0f and then EOF.
            for peer in (server, client):
                while (frame := await peer.frame()) != wire.Frame(0, wire.Timeout()):
                    assert isinstance(frame.packet, wire.Closed)
                await peer.expect_eof()
                await peer.close()


async def test_a_peer_that_never_reads_is_cut_off_when_its_outbox_overflows():
    with trio.fail_after(LIMIT):
        async with running(config(max_outbox=16384)) as ports:
            # A receiver with a tiny receive buffer that never reads what it is sent.
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", ports.port))
            sleeper = Peer(trio.SocketStream(sock))
            await sleeper.send(0, wire.HelloClient())
            server = await Peer.connect("127.0.0.1", ports.port)
            await server.send(0, wire.HelloServer(PUBLIC))
            await server.expect(0, wire.ServerIdentity(server.identity))
            # The receiver keeps repeating its Hello: each one earns it a 03 and the sender's
            # 04 again, which it never reads.
            hello = wire.encode(0, wire.HelloClient())

            async def flood() -> bool:
                try:
                    for _ in range(1000):  # 100 000 Hellos at most: far beyond any buffer
                        await sleeper.stream.send_all(hello * 100)
                except trio.BrokenResourceError:
                    return True  # the relay closed it
                return False

            assert await flood(), "the silent receiver was never cut off"
            # It never spoke to the sender, so the sender hears nothing of its departure.
            with trio.move_on_after(0.5):
                frame = await server.frame()
                raise AssertionError(f"the sender was told {frame!r}")
            # What the receiver can still read ends, and the sender is still served.
            with contextlib.suppress(trio.BrokenResourceError):
                await read_all(sleeper.stream)
            await server.send(0, wire.HelloServer(PUBLIC))
            await server.expect(0, wire.ServerIdentity(server.identity))
            await sleeper.close()
            await server.close()


async def test_shutdown_says_closed_0000_then_closes_everything():
    with trio.fail_after(LIMIT):
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(
                lambda task_status: serve(config(), stop=stop, task_status=task_status))
            server, server_uid, client, client_uid = await register("127.0.0.1", ports)
            newcomer = await Peer.connect("127.0.0.1", ports.port)  # never said Hello
            waiting = await trio.open_tcp_stream("127.0.0.1", ports.secure_port)
            await trio.sleep(0.05)  # let the relay accept the last two
            stop.set()
            for peer in (server, client):
                await peer.expect(0, wire.Closed(0))
                await peer.expect_eof()
            await newcomer.expect_eof()
            assert await read_all(waiting) == b"01"  # no room will open: told, not just cut
        # serve returned: the nursery could close. Nothing listens any more.
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", ports.port)


async def test_a_port_in_use_is_a_clear_error():
    with trio.fail_after(LIMIT):
        async with running(config()) as ports:
            busy = RelayConfig(hosts=("127.0.0.1",), port=ports.port, secure_port=0)
            message = r"cannot listen on 127\.0\.0\.1:\d+: address already in use"
            with pytest.raises(ListenError, match=message):
                await serve(busy)


async def test_the_cli_prints_its_ports_and_exits_0_on_sigterm():
    command = [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "0",
               "--secure-port", "0"]
    root = Path(__file__).resolve().parent.parent
    process = await trio.lowlevel.open_process(
        command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(LIMIT):
            text = (await first_line(process)).decode()
            assert text.startswith("peer-relay: listening on 127.0.0.1:")
            port = int(text.split("127.0.0.1:")[1].split()[0])
            peer = await Peer.connect("127.0.0.1", port)
            await peer.send(0, wire.HelloClient())
            await peer.expect(0, wire.ClientIdentity(peer.identity))
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            await peer.expect(0, wire.Closed(0))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
