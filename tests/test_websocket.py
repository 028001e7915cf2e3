"""The relay over WebSocket: the byte-stream adapter, mixed TCP/WebSocket rooms, bad input."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time

import pytest
import trio
import trio.testing
import trio_websocket
from hypothesis import given, settings
from hypothesis import strategies as st

from peer import handshake
from peer.address import parse_relay
from peer.meeting import meet
from relay import wire
from relay.frames import binary_frame
from relay.websocket import MAX_MESSAGE, WebSocketStream, connect, read_upgrade_request

from processes import finish, peer
from transport_helpers import LIMIT, exchange, running, start_relay, tcp_address, ws_address

CODE = "123-cobalt-lemon-unicycle"
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


# -- the adapter, without a network ---------------------------------------------------------


async def websocket_pair() -> tuple[WebSocketStream, WebSocketStream]:
    """A client and a server WebSocketStream joined by an in-memory byte stream."""
    client_side, server_side = trio.testing.memory_stream_pair()
    accepted: list[WebSocketStream] = []

    async def serve_one() -> None:
        request = await read_upgrade_request(server_side)
        assert request.path == "/handshake"
        accepted.append(await request.accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one)
        client = await connect(client_side, host="relay.test", path="/handshake")
    return client, accepted[0]


async def read_until_end(stream: trio.abc.Stream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(7000):
        data += chunk
    return bytes(data)


async def check_pieces_arrive_as_one_stream(pieces: list[bytes]) -> None:
    with trio.fail_after(LIMIT):
        client, server = await websocket_pair()
        async with trio.open_nursery() as nursery:
            async def write() -> None:
                for piece in pieces:
                    await client.send_all(piece)
                await client.aclose()

            nursery.start_soon(write)
            assert await read_until_end(server) == b"".join(pieces)


@pytest.mark.parametrize("size", [1, 125, 126, 65535, 65536, 300_000])
@pytest.mark.parametrize("masked", [False, True], ids=["server", "client"])
def test_our_binary_frames_are_what_wsproto_reads(size, masked):
    # Frames are built here, not by wsproto: an independent decoder must agree.
    import wsproto
    from wsproto.frame_protocol import FrameDecoder, Opcode

    payload = os.urandom(size)
    header, body = binary_frame(memoryview(payload), masked)[:2]
    decoder = FrameDecoder(client=not masked)  # a server reads masked frames, a client not
    decoder.receive_bytes(bytes(header) + bytes(body))
    frame = decoder.process_buffer()
    assert frame.opcode is Opcode.BINARY and frame.frame_finished and frame.message_finished
    assert bytes(frame.payload) == payload
    assert (bytes(body) == payload) is (not masked)
    assert wsproto.__name__  # (imported for the decoder's package)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=12))
def test_message_boundaries_mean_nothing(pieces):
    trio.run(check_pieces_arrive_as_one_stream, pieces)


async def test_a_big_write_becomes_several_messages_and_arrives_whole():
    data = os.urandom(3 * MAX_MESSAGE + 12345)  # over the message cap: split by the sender
    await check_pieces_arrive_as_one_stream([data])


async def test_both_directions_at_once():
    with trio.fail_after(LIMIT):
        client, server = await websocket_pair()
        one, other = os.urandom(700_000), os.urandom(500_000)
        got: dict[str, bytes] = {}

        async def side(stream, data, name) -> None:
            async with trio.open_nursery() as nursery:
                async def send() -> None:
                    await stream.send_all(data)
                nursery.start_soon(send)
                got[name] = await read_exactly(stream, len(one) + len(other) - len(data))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, client, one, "client")
            nursery.start_soon(side, server, other, "server")
        assert got == {"client": other, "server": one}


async def test_every_read_yields_even_when_payload_is_waiting():
    # Without this one flooder of tiny packets held the relay's whole event loop for as long
    # as it took to parse a 256 KiB read, and other peers' upgrades timed out meanwhile.
    with trio.fail_after(LIMIT):
        client, server = await websocket_pair()
        await client.send_all(os.urandom(50_000))
        received = await server.receive_some(100)  # decodes the whole message
        while len(received) < 50_000:
            with trio.testing.assert_checkpoints():
                received += await server.receive_some(1000)


async def test_frames_sent_right_behind_the_upgrade_are_not_lost():
    """Bytes after an HTTP head in the same read are the first frames, on either side."""
    with trio.fail_after(LIMIT):
        client_side, server_side = trio.testing.memory_stream_pair()
        key = b"dGhlIHNhbXBsZSBub25jZQ=="
        request = (b"GET /room HTTP/1.1\r\nHost: relay\r\n" + UPGRADE_HEADERS.replace(
            b"dGhlIHNhbXBsZSBub25jZQ==", key) + b"\r\n")
        early = b"".join(bytes(piece) for piece in binary_frame(memoryview(b"ticket\n"), True))
        await client_side.send_all(request + early)  # an eager client: no wait for the 101
        upgrade = await read_upgrade_request(server_side)
        server = await upgrade.accept()
        assert await server.receive_some() == b"ticket\n"
        # The other way: the 101 and a frame in one read, to our client.
        client_side, server_side = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            async def serve() -> None:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await server_side.receive_some()
                key = re.search(rb"Sec-WebSocket-Key: (\S+)", head, re.IGNORECASE)[1]
                accept = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())
                frame = b"".join(bytes(piece) for piece in binary_frame(memoryview(b"00"), False))
                await server_side.send_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n" + frame)
            nursery.start_soon(serve)
            client = await connect(client_side, host="relay", path="/room")
        assert await client.receive_some() == b"00"


async def read_exactly(stream: trio.abc.Stream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, f"end after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


# -- an in-process relay with a WebSocket port ----------------------------------------------


@pytest.mark.parametrize("sender, receiver", [("tcp", "ws"), ("ws", "tcp"), ("ws", "ws")])
async def test_rooms_pair_across_transports_in_process(sender, receiver):
    with trio.fail_after(LIMIT):
        async with running() as ports:
            address = {"tcp": tcp_address(ports), "ws": ws_address(ports)}
            await exchange(address[sender], address[receiver])


async def test_bad_input_closes_only_that_connection_while_a_transfer_completes():
    with trio.fail_after(LIMIT):
        # Long enough that the honest pair's own upgrades finish on a loaded CI machine (0.5 s
        # did not), short enough to watch the silent connection be cut.
        async with running(upgrade_timeout=2.0) as ports:
            url = f"ws://127.0.0.1:{ports.ws_port}"
            outcomes: dict[str, object] = {}

            async def text_frame() -> None:
                async with trio_websocket.open_websocket_url(url + "/handshake") as ws:
                    await ws.send_message("0000 01")
                    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                        await ws.get_message()
                outcomes["text"] = closed.value.reason

            async def oversized() -> None:
                # Valid packets the relay reads and ignores (Done is relay-only), in one
                # message just over the cap: only the size is wrong.
                done = wire.encode(0, wire.Done())
                message = wire.encode(0, wire.HelloClient()) + done * (MAX_MESSAGE // len(done))
                async with trio_websocket.open_websocket_url(url + "/handshake") as ws:
                    # Refused from the frame's header, perhaps before all of it was sent.
                    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                        await ws.send_message(message)
                        while True:
                            await ws.get_message()  # the end
                outcomes["oversized"] = closed.value.reason

            async def plain_http() -> None:
                stream = await trio.open_tcp_stream("127.0.0.1", ports.ws_port)
                # Without an upgrade: an endpoint says what it wants (/ would serve the page).
                await stream.send_all(b"GET /handshake HTTP/1.1\r\nHost: relay\r\n\r\n")
                outcomes["http"] = await read_until_end(stream)
                await stream.aclose()

            async def unknown_path() -> None:
                with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                    async with trio_websocket.open_websocket_url(url + "/elsewhere"):
                        pass
                outcomes["path"] = (rejected.value.status_code, rejected.value.body)

            async def unmasked_frame() -> None:
                stream = await trio.open_tcp_stream("127.0.0.1", ports.ws_port)
                websocket = await connect(stream, host="relay", path="/handshake")
                await stream.send_all(b"\x82\x05hello")  # clients must mask their frames
                with pytest.raises(trio.BrokenResourceError) as broken:
                    await websocket.receive_some()
                outcomes["unmasked"] = str(broken.value)
                await websocket.aclose()

            async def ping() -> None:
                async with trio_websocket.open_websocket_url(url + "/handshake") as ws:
                    with trio.fail_after(5):
                        await ws.ping(b"still there?")
                    outcomes["ping"] = "pong"

            async def silent() -> None:
                stream = await trio.open_tcp_stream("127.0.0.1", ports.ws_port)
                started = trio.current_time()
                outcomes["silent"] = (await read_until_end(stream), trio.current_time() - started)

            async with trio.open_nursery() as nursery:
                for job in (text_frame, oversized, plain_http, unknown_path, unmasked_frame, ping, silent):
                    nursery.start_soon(job)
                await exchange(tcp_address(ports), ws_address(ports))

    text = outcomes["text"]
    assert (text.code, text.reason) == (1003, "only binary messages are accepted")
    big = outcomes["oversized"]
    assert big.code == 1009 and "larger than" in big.reason
    http = outcomes["http"]
    assert http.startswith(b"HTTP/1.1 426 ") and b"not a WebSocket upgrade request" in http
    assert b"\r\nUpgrade: websocket\r\n" in http
    assert outcomes["path"][0] == 404 and b"no such endpoint '/elsewhere'" in outcomes["path"][1]
    assert outcomes["unmasked"].startswith("the other side closed the WebSocket: 1002 ")
    assert outcomes["ping"] == "pong"
    data, waited = outcomes["silent"]
    assert data == b"" and 1.9 < waited < 10


UPGRADE_HEADERS = (b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


@pytest.mark.parametrize("request_head", [
    b"GET /\xff HTTP/1.1\r\nHost: relay\r\n" + UPGRADE_HEADERS,
    b"GET /handshake HTTP/1.1\r\nHost: \xff\xfe\r\n" + UPGRADE_HEADERS,
    b"GET /handshake HTTP/1.1\r\nHost: relay\r\nSec-WebSocket-Protocol: \xff\r\n" + UPGRADE_HEADERS,
    b"POST /handshake HTTP/1.1\r\nHost: relay\r\n" + UPGRADE_HEADERS,
    b"GET /handshake HTTP/1.1\r\nHost: relay\r\nX: " + b"y" * 100_000 + b"\r\n" + UPGRADE_HEADERS,
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # TLS to a plain port
], ids=["non-ascii path", "non-ascii host", "non-ascii header", "POST", "huge head", "TLS"])
async def test_hostile_upgrade_requests_get_400_and_the_relay_goes_on(request_head):
    with trio.fail_after(LIMIT):
        async with running() as ports:
            stream = await trio.open_tcp_stream("127.0.0.1", ports.ws_port)
            await stream.send_all(request_head + b"\r\n")
            answer = await read_until_end(stream)
            await stream.aclose()
            assert answer.startswith(b"HTTP/1.1 400 ") and b"not a WebSocket upgrade request" in answer
            url = f"ws://127.0.0.1:{ports.ws_port}/handshake"
            assert (await hello_identity(url, [])).startswith(b"127.0.0.1:")


async def test_a_room_never_holds_a_fast_stream_whole():
    """A TCP sender pushing into a room whose WebSocket receiver does not read is held back."""
    with trio.fail_after(LIMIT):
        async with running() as ports:
            password = CODE.encode()
            meetings = {}

            async def join(name, address, machine) -> None:
                if name == "receiver":
                    await trio.sleep(0.05)
                meetings[name] = await meet(address, machine, notify=lambda event: None)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(join, "sender", tcp_address(ports), handshake.SenderHandshake(password))
                nursery.start_soon(join, "receiver", ws_address(ports), handshake.ReceiverHandshake(password))
            sending = meetings["sender"].stream
            chunk = bytes(1 << 20)
            accepted = 0
            while accepted < (256 << 20):
                with trio.move_on_after(1.0) as stalled:
                    await sending.send_all(chunk)
                if stalled.cancelled_caught:
                    break
                accepted += len(chunk)
            assert stalled.cancelled_caught, "256 MiB went into a room nobody reads"
            # Socket buffers on both sides plus one pipe buffer: a few MiB, not the stream.
            assert accepted < (48 << 20), accepted
            await trio.aclose_forcefully(sending)
            await trio.aclose_forcefully(meetings["receiver"].stream)


async def hello_identity(url: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """Say Hello as a client over WebSocket and return the identity the relay gives us."""
    async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
        await ws.send_message(wire.encode(0, wire.HelloClient()))
        parser = wire.Parser()
        while (frame := parser.next_frame()) is None:
            parser.feed(await ws.get_message())
        assert isinstance(frame.packet, wire.ClientIdentity)
        return frame.packet.identity


async def test_forwarded_addresses_count_only_from_trusted_proxies():
    forwarded = [(b"X-Forwarded-For", b"198.51.100.7, 203.0.113.9")]
    real_ip = [(b"X-Real-IP", b"2001:db8::5"), (b"X-Forwarded-For", b"198.51.100.7")]
    with trio.fail_after(LIMIT):
        async with running() as ports:
            url = f"ws://127.0.0.1:{ports.ws_port}/handshake"
            assert (await hello_identity(url, forwarded)).startswith(b"127.0.0.1:")
        async with running(trusted_proxies=["127.0.0.0/8"]) as ports:
            url = f"ws://127.0.0.1:{ports.ws_port}/handshake"
            assert (await hello_identity(url, forwarded)).startswith(b"203.0.113.9:")
            assert (await hello_identity(url, real_ip)).startswith(b"[2001:db8::5]:")
            assert (await hello_identity(url, [])).startswith(b"127.0.0.1:")
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                await hello_identity(url, [(b"X-Real-IP", b"not-an-address")])
            assert rejected.value.status_code == 400
            assert b"invalid client address" in rejected.value.body


async def test_a_peer_pointed_at_a_websocket_address_of_a_tcp_port_fails_clearly():
    from peer.rendezvous import RelayError

    with trio.fail_after(LIMIT):
        async with running() as ports:
            wrong = parse_relay(f"ws://127.0.0.1:{ports.port}/")
            with pytest.raises(RelayError, match="closed the connection instead of upgrading"):
                await meet(wrong, handshake.ReceiverHandshake(CODE.encode()), notify=lambda e: None)


# -- real processes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws_relay():
    relay = start_relay("--ws-port", "0")
    try:
        yield relay
    finally:
        relay.stop()


@pytest.mark.parametrize("sender, receiver", [("tcp", "ws"), ("ws", "tcp")])
def test_peer_processes_across_transports(ws_relay, tmp_path, sender, receiver):
    data = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "data.bin").write_bytes(data)
    args = {"tcp": ws_relay.tcp_args(), "ws": ws_relay.ws_args(host="localhost")}
    out = tmp_path / "out"
    code = f"{ {'tcp': 4, 'ws': 5}[sender] }12-cobalt-lemon-unicycle".replace(" ", "")
    sending = peer("send", *args[sender], "--password", code, "data.bin", cwd=tmp_path)
    time.sleep(0.3)
    receiving = peer("recv", *args[receiver], "-y", "-o", f"{out}/", code, cwd=tmp_path)
    r, _, r_err = finish(receiving)
    s, _, s_err = finish(sending)
    assert (s, r) == (0, 0), s_err + r_err
    assert (out / "data.bin").read_bytes() == data
    assert "receiver confirmed every byte" in s_err
