"""Scoped rendezvous, peer side, with real processes: ``peer recv`` registers with 10 when its
code has a nameplate, falls back to 01 against a relay that drops or closes on 10, and both
peers put ``?nameplate=N`` on their WebSocket URLs (docs/protocol.md §10, docs/websocket.md).

The relays that do not know 10 are a small proxy in this process in front of a real
``peer-relay``: it passes every packet through the one codec and, on a 10, either stops
reading that connection without closing it (what bob's relay does at an unknown type) or
closes it (what our earlier relay did with a malformed packet).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from peer.address import parse_relay
from relay import wire

from processes import finish, peer
from transport_helpers import start_relay

CODE = "417-cobalt-lemon-unicycle"
LIMIT = 90.0
"""Seconds for a whole test on a loaded machine (a transfer takes well under 5)."""
PROCESS_LIMIT = 60.0


@attrs.define
class Seen:
    """What a proxy saw: each connection's scoped Hellos and first request line."""

    scoped: list[int] = attrs.Factory(list)
    hellos: list[str] = attrs.Factory(list)
    request_lines: list[bytes] = attrs.Factory(list)


async def _copy(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
    while data := await source.receive_some(65536):
        await sink.send_all(data)


async def _relay_filter(client: trio.SocketStream, port: int, mode: str, seen: Seen) -> None:
    """Client → relay frame by frame through ``relay.wire``; relay → client untouched."""
    upstream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        async with trio.open_nursery() as nursery:
            async def down() -> None:
                await _copy(upstream, client)
                nursery.cancel_scope.cancel()

            nursery.start_soon(down)
            parser, deaf = wire.Parser(), False
            while data := await client.receive_some(4096):
                if deaf:
                    continue  # bob's relay: no more reading, no answer, no close
                parser.feed(data)
                out = []
                for frame in parser.frames():
                    packet = frame.packet
                    if isinstance(packet, (wire.HelloClient, wire.HelloServer)):
                        seen.hellos.append(type(packet).__name__)
                    if isinstance(packet, wire.HelloScopedClient):
                        seen.scoped.append(packet.nameplate)
                        if mode == "translate":  # a scoped relay, as far as the peer can tell
                            frame = wire.Frame(frame.uid, wire.HelloClient())
                        if mode == "garble":
                            await client.send_all(b"0000ff")
                            deaf = True
                            break
                        if mode == "close":
                            nursery.cancel_scope.cancel()
                            return
                        if mode == "deaf":
                            deaf = True
                            break
                    out.append(frame.encode())
                if out:
                    await upstream.send_all(b"".join(out))
            nursery.cancel_scope.cancel()
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError, wire.WireError):
        pass
    finally:
        await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(client)


async def _log_requests(client: trio.SocketStream, port: int, seen: Seen) -> None:
    """A byte-for-byte proxy that notes the first line (the HTTP request line) of each one."""
    upstream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        head = b""
        while b"\r\n" not in head and len(head) < 8192:
            chunk = await client.receive_some(4096)
            if not chunk:
                return
            head += chunk
        seen.request_lines.append(head.split(b"\r\n", 1)[0])
        await upstream.send_all(head)
        async with trio.open_nursery() as nursery:
            async def down() -> None:
                await _copy(upstream, client)
                nursery.cancel_scope.cancel()

            nursery.start_soon(down)
            await _copy(client, upstream)
            nursery.cancel_scope.cancel()
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(client)


async def _serve(nursery: trio.Nursery, handler) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def _transfer(tmp_path: Path, relay_args: list[str], code: str = CODE) -> tuple:
    data = os.urandom(300_000)
    (tmp_path / "f.bin").write_bytes(data)
    out = tmp_path / "out"
    sender = peer("send", *relay_args, "--password", code, "f.bin", cwd=tmp_path)
    receiver = peer("recv", *relay_args, "-y", "-o", f"{out}/", code, cwd=tmp_path)
    r = await trio.to_thread.run_sync(finish, receiver, PROCESS_LIMIT)
    s = await trio.to_thread.run_sync(finish, sender, PROCESS_LIMIT)
    return s, r, data, out / "f.bin"


@pytest.fixture
def relay():
    process = start_relay("--ws-port", "0")
    try:
        yield process
    finally:
        process.stop()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["deaf", "close", "garble"])
async def test_a_relay_that_drops_or_closes_on_10_still_gets_the_transfer_done(relay, tmp_path, mode):
    seen = Seen()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, lambda c: _relay_filter(c, relay.port, mode, seen))
            args = ["--relay", f"127.0.0.1:{port}", "--secure-port", str(relay.secure_port)]
            (s, _, s_err), (r, _, r_err), data, received = await _transfer(tmp_path, args)
            nursery.cancel_scope.cancel()
    assert (s, r) == (0, 0), s_err + r_err
    assert received.read_bytes() == data
    assert seen.scoped == [417]  # one scoped try, then a plain Hello on a new connection
    assert sorted(seen.hellos) == ["HelloClient", "HelloServer"]
    assert "scoped" not in r_err and "Hello" not in r_err  # nothing new on stderr


@pytest.mark.slow
async def test_a_transfer_with_a_nameplate_code_through_our_relay(relay, tmp_path):
    seen = Seen()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, lambda c: _relay_filter(c, relay.port, "pass", seen))
            args = ["--relay", f"127.0.0.1:{port}", "--secure-port", str(relay.secure_port)]
            (s, _, s_err), (r, _, r_err), data, received = await _transfer(tmp_path, args)
            nursery.cancel_scope.cancel()
    assert (s, r) == (0, 0), s_err + r_err
    assert received.read_bytes() == data
    assert seen.scoped == [417]
    # A relay that answers 10 keeps the receiver on it; one that does not yet gets a 01 after.
    assert seen.hellos in (["HelloServer"], ["HelloServer", "HelloClient"])


@pytest.mark.slow
async def test_a_transfer_without_a_nameplate_registers_plainly(relay, tmp_path):
    seen = Seen()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, lambda c: _relay_filter(c, relay.port, "pass", seen))
            args = ["--relay", f"127.0.0.1:{port}", "--secure-port", str(relay.secure_port)]
            (s, _, s_err), (r, _, r_err), data, received = await _transfer(
                tmp_path, args, code="revolucion-para-siempre")
            nursery.cancel_scope.cancel()
    assert (s, r) == (0, 0), s_err + r_err
    assert received.read_bytes() == data
    assert seen.scoped == [] and sorted(seen.hellos) == ["HelloClient", "HelloServer"]


@pytest.mark.slow
async def test_websocket_urls_carry_the_nameplate_on_all_four_connections(relay, tmp_path):
    seen = Seen()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, lambda c: _log_requests(c, relay.ws_port, seen))
            args = ["--relay", f"ws://127.0.0.1:{port}/"]
            (s, _, s_err), (r, _, r_err), data, received = await _transfer(tmp_path, args)
            nursery.cancel_scope.cancel()
    assert (s, r) == (0, 0), s_err + r_err
    assert received.read_bytes() == data
    lines = sorted(seen.request_lines)
    handshakes = [line for line in lines if line.startswith(b"GET /handshake")]
    rooms = [line for line in lines if line.startswith(b"GET /room")]
    # Sender and receiver, each one handshake (two if the receiver fell back) and one room.
    assert len(rooms) == 2 and len(handshakes) in (2, 3), lines
    assert all(line == b"GET /handshake?nameplate=417 HTTP/1.1" for line in handshakes), lines
    assert all(line == b"GET /room?nameplate=417 HTTP/1.1" for line in rooms), lines


@pytest.mark.slow
async def test_websocket_urls_without_a_nameplate_have_no_query(relay, tmp_path):
    seen = Seen()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, lambda c: _log_requests(c, relay.ws_port, seen))
            args = ["--relay", f"ws://127.0.0.1:{port}/"]
            (s, _, s_err), (r, _, r_err), data, received = await _transfer(
                tmp_path, args, code="revolucion-para-siempre")
            nursery.cancel_scope.cancel()
    assert (s, r) == (0, 0), s_err + r_err
    assert sorted(seen.request_lines) == [b"GET /handshake HTTP/1.1"] * 2 + [b"GET /room HTTP/1.1"] * 2


def test_the_nameplate_follows_any_prefix_in_both_paths():
    address = parse_relay("wss://relay.example/peer-relay/")
    assert address.endpoint_path("handshake", 417) == "/peer-relay/handshake?nameplate=417"
    assert address.endpoint_path("room", 0) == "/peer-relay/room?nameplate=0"
    assert address.endpoint_path("room", 65535) == "/peer-relay/room?nameplate=65535"
    assert address.endpoint_path("handshake") == "/peer-relay/handshake"


async def test_the_relay_ignores_the_query_string():
    from relay.websocket import connect, read_upgrade_request
    client_side, server_side = trio.testing.memory_stream_pair()
    paths = []

    async def serve_one() -> None:
        request = await read_upgrade_request(server_side)
        paths.append(request.path)
        await request.accept()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            await connect(client_side, host="relay.test", path="/room?nameplate=417")
    assert paths == ["/room"]


async def test_a_relay_that_answers_10_keeps_the_receiver_on_its_first_connection(relay):
    from peer import handshake
    from peer.address import RelayAddress
    from peer.meeting import meet

    seen = Seen()
    password = CODE.encode()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, lambda c: _relay_filter(c, relay.port, "translate", seen))
            address = RelayAddress("127.0.0.1", port, relay.secure_port)
            receiver = handshake.ReceiverHandshake(password)
            meetings = []

            async def join(machine) -> None:
                meetings.append(await meet(address, machine, notify=lambda event: None))

            async with trio.open_nursery() as peers:
                peers.start_soon(join, handshake.SenderHandshake(password))
                peers.start_soon(join, receiver)
            for meeting in meetings:
                await meeting.stream.aclose()
            nursery.cancel_scope.cancel()
    assert receiver.registration.scoped and not receiver.registration.fell_back
    assert seen.scoped == [417] and seen.hellos == ["HelloServer"]  # no 01 from the receiver
