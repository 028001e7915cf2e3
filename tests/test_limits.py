"""Abuse limits: the sans-I/O guard, then each limit refusing on a real relay while the
others (and other sources) keep being served.

The relay exempts its own host from per-address limits by default; these tests connect
from loopback, so they clear ``exempt`` and use 127.0.0.2 as "another address" (Linux
routes the whole 127.0.0.0/8 to loopback).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import wire
from relay.core import Close, Relay, Role, Send
from relay.limits import Guard, Limits, Refusal, RoomMeter, TokenBucket, host_of, source_of
from relay.pipe import CLOSE_MARKER
from relay.server import RelayConfig
from relay.websocket import WebSocketError, connect as websocket_connect

from test_relay_server import PUBLIC, Peer, agree, enter_room, read_all, read_exactly, running

LIMIT = 15  # seconds: a bound on every test, whatever the relay does
TIMEOUT_PACKET = wire.encode(wire.RELAY_UID, wire.Timeout())


# -- the guard, without I/O ---------------------------------------------------------------


def test_the_total_limit_refuses_past_it_and_frees_on_release():
    guard = Guard(Limits(max_connections=2, exempt=()))
    first, second = guard.admit("192.0.2.1"), guard.admit("192.0.2.2")
    assert guard.admit("192.0.2.3") is Refusal.CONNECTIONS
    guard.release(first)
    guard.release(first)  # twice is harmless
    assert not isinstance(guard.admit("192.0.2.3"), Refusal)
    assert guard.connections == 2
    assert guard.refused[Refusal.CONNECTIONS] == 1
    guard.release(second)
    assert guard.connections == 1


def test_per_address_counts_an_ipv4_address_and_an_ipv6_slash_64():
    guard = Guard(Limits(max_connections_per_address=2, exempt=()))
    assert not isinstance(guard.admit("192.0.2.1"), Refusal)
    assert not isinstance(guard.admit("::ffff:192.0.2.1"), Refusal)  # the same host
    assert guard.admit("192.0.2.1") is Refusal.CONNECTIONS_PER_ADDRESS
    assert not isinstance(guard.admit("192.0.2.2"), Refusal)  # another address is served
    assert not isinstance(guard.admit("2001:db8:1:2::1"), Refusal)
    assert not isinstance(guard.admit("2001:db8:1:2:ffff::9"), Refusal)  # same /64
    assert guard.admit("2001:db8:1:2::3") is Refusal.CONNECTIONS_PER_ADDRESS
    assert not isinstance(guard.admit("2001:db8:1:3::1"), Refusal)  # the next /64
    assert guard.refused[Refusal.CONNECTIONS_PER_ADDRESS] == 2


def test_exempt_addresses_are_not_counted_per_address_but_in_the_total():
    guard = Guard(Limits(max_connections=3, max_connections_per_address=1))
    for _ in range(3):
        assert not isinstance(guard.admit("127.0.0.1"), Refusal)
    assert guard.admit("::1") is Refusal.CONNECTIONS
    assert guard.sources == 0


def test_a_proxied_connection_is_charged_to_the_client_it_names():
    guard = Guard(Limits(max_connections_per_address=1, exempt=()))
    proxy = "10.0.0.1"
    one = guard.admit(proxy, per_source=False)
    two = guard.admit(proxy, per_source=False)
    assert guard.charge(one, "192.0.2.7") is None
    assert guard.charge(one, "192.0.2.7") is None  # charged once only
    assert guard.charge(two, "192.0.2.7") is Refusal.CONNECTIONS_PER_ADDRESS
    assert guard.charge(two, "192.0.2.8") is None
    # A connection changing hands counts until its last holder lets go.
    guard.share(one)
    guard.release(one)
    assert guard.admit("192.0.2.7") is Refusal.CONNECTIONS_PER_ADDRESS
    guard.release(one)
    assert not isinstance(guard.admit("192.0.2.7"), Refusal)


def test_hellos_are_refused_past_the_burst_until_the_rate_refills():
    guard = Guard(Limits(hello_rate=2.0, hello_burst=3, exempt=()))
    assert [guard.hello("192.0.2.1", 0.0) for _ in range(4)] == [None, None, None,
                                                                    Refusal.HELLO_RATE]
    assert guard.hello("192.0.2.2", 0.0) is None  # another source has its own bucket
    assert guard.hello("192.0.2.1", 0.4) is Refusal.HELLO_RATE  # 0.8 of a token back
    assert guard.hello("192.0.2.1", 0.5) is None  # one whole token
    assert guard.hello("127.0.0.1", 0.5) is None
    assert Guard(Limits(hello_rate=0, exempt=())).hello("192.0.2.1", 0.0) is None


def test_hello_buckets_are_forgotten_once_full_so_memory_follows_recent_sources():
    guard = Guard(Limits(hello_rate=10.0, hello_burst=5, exempt=()))
    for n in range(5000):
        guard.hello(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", n * 0.01)
    # Each bucket is full again 0.1 s after its Hello: only the recent ones can be kept.
    assert len(guard._hellos) < 2100


def test_rooms_open_up_to_the_limit():
    guard = Guard(Limits(max_rooms=1))
    assert guard.open_room() is None
    assert guard.open_room() is Refusal.ROOMS
    guard.close_room()
    assert guard.open_room() is None
    assert Guard(Limits(max_rooms=0)).open_room() is None  # 0: no limit


def test_sources_and_hosts():
    assert source_of("192.0.2.1") == "192.0.2.1"
    assert source_of("2001:db8::1") == "2001:db8::/64"
    assert source_of("::ffff:192.0.2.1") == "192.0.2.1"
    assert source_of("127.0.0.1", Limits().exempt) is None
    assert source_of("not an address") is None
    assert host_of(b"192.0.2.1:4000") == "192.0.2.1"
    assert host_of(b"[2001:db8::1]:4000") == "2001:db8::1"


def test_limits_reject_negative_values():
    with pytest.raises(ValueError):
        Limits(max_rooms=-1)
    with pytest.raises(ValueError):
        Limits(exempt=("not a network",))


@settings(max_examples=60, deadline=None)
@given(rate=st.integers(1000, 10_000_000),
       steps=st.lists(st.tuples(st.floats(0, 0.5), st.integers(1, 1 << 20)), max_size=40))
def test_a_room_never_gets_more_than_its_burst_plus_its_rate(rate, steps):
    meter = RoomMeter(rate, now=0.0)
    now, granted = 0.0, 0
    for pause, wanted in steps:
        now += pause
        allowance = meter.allowance(now)
        assert allowance is not None and allowance >= 0
        if allowance == 0:
            assert meter.wait(now) > 0
            continue
        took = min(allowance, wanted)
        meter.spend(took)
        granted += took
        assert granted <= meter.bucket.burst + rate * now + 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 2), max_size=50))
def test_a_bucket_never_holds_more_than_its_burst(pauses):
    bucket = TokenBucket.full(3.0, 5.0, 0.0)
    now = 0.0
    for pause in pauses:
        now += pause
        bucket.take(now)
        assert 0 <= bucket.available(now) <= 5.0


def test_an_unlimited_room_only_counts():
    meter = RoomMeter(0)
    assert meter.allowance(0.0) is None and meter.wait(0.0) == 0.0


def test_the_core_refuses_a_hello_its_gate_refuses_and_a_registered_peer_leaves():
    refused: set[str] = set()
    core = Relay(hello_gate=lambda conn: "too many Hellos" if conn in refused else None)
    identities = {"server": b"192.0.2.1:1000", "client": b"192.0.2.2:2000", "late": b"192.0.2.3:3"}
    for conn, identity in identities.items():
        core.connect(conn, identity)
    core.receive("server", wire.encode(0, wire.HelloServer(PUBLIC)))
    core.receive("client", wire.encode(0, wire.HelloClient()))
    server_uid = core.uid_of("server")
    refused.update({"late", "server"})
    assert core.receive("late", wire.encode(0, wire.HelloClient())) == [
        Send("late", TIMEOUT_PACKET), Close("late", "too many Hellos")]
    # A registered sender repeating its Hello when refused departs: its receiver is told.
    assert core.receive("server", wire.encode(0, wire.HelloServer(PUBLIC))) == [
        Send("server", TIMEOUT_PACKET), Close("server", "too many Hellos"),
        Send("client", wire.encode(0, wire.Closed(server_uid)))]
    assert core.peers == {Role.CLIENT: 1, Role.SERVER: 0}
    assert core.counts.hellos_refused == 2


# -- a real relay ---------------------------------------------------------------------------


def limited(**limits) -> RelayConfig:
    return RelayConfig(hosts=("127.0.0.1",), port=0, secure_port=0,
                       limits=Limits(exempt=(), **limits))


async def connect_from(source: str, port: int) -> Peer:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return Peer(trio.SocketStream(sock))


async def hello(peer: Peer) -> None:
    await peer.send(0, wire.HelloClient())
    await peer.expect(0, wire.ClientIdentity(peer.identity))


async def expect_refused(peer: Peer) -> None:
    """A handshake-port refusal: Timeout 0f, then the end."""
    assert await read_all(peer.stream) == TIMEOUT_PACKET


async def test_the_connection_limit_refuses_with_0f_and_keeps_serving_the_others():
    with trio.fail_after(LIMIT):
        async with running(limited(max_connections=2)) as ports:
            first = await connect_from("127.0.0.1", ports.port)
            second = await connect_from("127.0.0.2", ports.port)
            await hello(first)
            await hello(second)
            extra = await connect_from("127.0.0.3", ports.port)
            await expect_refused(extra)
            room = await trio.open_tcp_stream("127.0.0.1", ports.secure_port)
            assert await read_all(room) == b"01"  # the secure port says it its own way
            # The two admitted peers still talk to the relay...
            await first.send(0, wire.HelloClient())
            await first.expect(0, wire.ClientIdentity(first.identity))
            # ...and a place freed is a place taken again.
            await second.close()
            await trio.sleep(0.1)
            again = await connect_from("127.0.0.3", ports.port)
            await hello(again)
            for peer in (first, again, extra):
                await peer.close()
            await room.aclose()


async def test_the_per_address_limit_refuses_only_that_address():
    with trio.fail_after(LIMIT):
        async with running(limited(max_connections_per_address=2)) as ports:
            kept = [await connect_from("127.0.0.1", ports.port) for _ in range(2)]
            await expect_refused(await connect_from("127.0.0.1", ports.port))
            other = await connect_from("127.0.0.2", ports.port)
            await hello(other)
            for peer in kept:
                await hello(peer)
            for peer in (*kept, other):
                await peer.close()


async def test_the_per_address_limit_answers_websocket_with_503():
    config = RelayConfig(hosts=("127.0.0.1",), port=0, secure_port=0, ws_port=0,
                         limits=Limits(exempt=(), max_connections_per_address=1))
    with trio.fail_after(LIMIT):
        async with running(config) as ports:
            first = await trio.open_tcp_stream("127.0.0.1", ports.ws_port)
            websocket = await websocket_connect(first, host="127.0.0.1", path="/handshake")
            second = await trio.open_tcp_stream("127.0.0.1", ports.ws_port)
            with pytest.raises(WebSocketError, match=r"\(503\).*too many connections from this address"):
                await websocket_connect(second, host="127.0.0.1", path="/handshake")
            await second.aclose()
            await websocket.send_all(wire.encode(0, wire.HelloClient()))
            got = await websocket.receive_some(4096)
            assert got.startswith(b"000003")
            await websocket.aclose()


async def test_the_hello_rate_refuses_a_flooding_address_not_its_neighbours():
    with trio.fail_after(LIMIT):
        async with running(limited(hello_rate=0.01, hello_burst=2)) as ports:
            registered = [await connect_from("127.0.0.1", ports.port) for _ in range(2)]
            for peer in registered:
                await hello(peer)
            late = await connect_from("127.0.0.1", ports.port)
            await late.send(0, wire.HelloClient())
            await expect_refused(late)
            neighbour = await connect_from("127.0.0.2", ports.port)
            await hello(neighbour)
            # A registered peer repeating its Hello is refused (and leaves) like any other.
            await registered[0].send(0, wire.HelloClient())
            await expect_refused(registered[0])
            # The one that did not is still registered: a new sender is announced to it.
            server = await connect_from("127.0.0.4", ports.port)
            await server.send(0, wire.HelloServer(PUBLIC))
            await server.expect(0, wire.ServerIdentity(server.identity))
            announce = await registered[1].frame()
            assert isinstance(announce.packet, wire.NewServer)
            for peer in (*registered, late, neighbour, server):
                await peer.close()


async def test_the_rooms_limit_refuses_the_next_room_with_01_and_keeps_the_open_one():
    with trio.fail_after(LIMIT):
        async with running(limited(max_rooms=1)) as ports:
            server, client = await agree("127.0.0.1", ports)
            open_a = await enter_room("127.0.0.1", ports.secure_port, client.identity)
            open_b = await enter_room("127.0.0.1", ports.secure_port, server.identity)
            assert await read_exactly(open_a, 2) == b"00"
            assert await read_exactly(open_b, 2) == b"00"
            server2, client2 = await agree("127.0.0.1", ports)
            refused_a = await enter_room("127.0.0.1", ports.secure_port, client2.identity)
            refused_b = await enter_room("127.0.0.1", ports.secure_port, server2.identity)
            assert await read_all(refused_a) == b"01"
            assert await read_all(refused_b) == b"01"
            await refused_a.aclose()
            await refused_b.aclose()
            await open_a.send_all(b"still open")
            assert await read_exactly(open_b, 10) == b"still open"
            await open_a.aclose()
            assert await read_all(open_b) == CLOSE_MARKER
            await open_b.aclose()


async def test_a_room_rate_limit_slows_the_room_down_without_losing_a_byte():
    rate = 1_000_000
    data = os.urandom(1_500_000)
    with trio.fail_after(LIMIT):
        async with running(limited(room_rate=rate)) as ports:
            server, client = await agree("127.0.0.1", ports)
            a = await enter_room("127.0.0.1", ports.secure_port, client.identity)
            b = await enter_room("127.0.0.1", ports.secure_port, server.identity)
            assert await read_exactly(a, 2) == b"00"
            assert await read_exactly(b, 2) == b"00"
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                async def send() -> None:
                    await a.send_all(data)
                    await a.send_eof()
                nursery.start_soon(send)
                got = await read_all(b)
            elapsed = trio.current_time() - started
            assert got == data + CLOSE_MARKER
            burst = max(rate / 4, 64 * 1024)
            assert elapsed >= (len(data) - burst) / rate * 0.9
            with contextlib.suppress(trio.BrokenResourceError):
                await read_all(a)
            await a.aclose()
            await b.aclose()
