"""Prometheus metrics: what a scrape says while peers register, handshake, fail, pair and
pipe bytes, and how the little HTTP server answers."""

from __future__ import annotations

import os

import trio
from prometheus_client.parser import text_string_to_metric_families

from relay import wire
from relay.limits import Limits
from relay.pipe import CLOSE_MARKER
from relay.server import RelayConfig

from test_relay_server import (PUBLIC, X, Peer, agree, enter_room, read_all, read_exactly,
                               register, running)

LIMIT = 15


def metrics_config(**overrides) -> RelayConfig:
    return RelayConfig(hosts=("127.0.0.1",), port=0, secure_port=0,
                       metrics=("127.0.0.1", 0), **overrides)


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(request)
    answer = await read_all(stream)
    await stream.aclose()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


async def scrape(port: int) -> dict[tuple[str, tuple], float]:
    status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_a_scrape_follows_peers_handshakes_rooms_and_bytes():
    payload = os.urandom(300_000)
    with trio.fail_after(LIMIT):
        async with running(metrics_config()) as ports:
            empty = await scrape(ports.metrics_port)
            assert value(empty, "peer_relay_peers", role="sender") == 0
            assert value(empty, "peer_relay_forwarded_bytes_total") == 0

            server, server_uid, client, client_uid = await register("127.0.0.1", ports)
            during = await scrape(ports.metrics_port)
            assert value(during, "peer_relay_peers", role="sender") == 1
            assert value(during, "peer_relay_peers", role="receiver") == 1
            assert value(during, "peer_relay_uids_in_use") == 2
            assert value(during, "peer_relay_connections", port="handshake", transport="tcp") == 2
            assert value(during, "peer_relay_handshakes_started_total") == 1
            # A wrong code: the server's check fails, and it says so.
            await client.send(server_uid, wire.ClientValidator(bytes(64)))
            await server.expect(client_uid, wire.ClientValidator(bytes(64)))
            await server.send(client_uid, wire.SpokeFailure(2))
            await client.expect(server_uid, wire.SpokeFailure(2))
            failed = await scrape(ports.metrics_port)
            assert value(failed, "peer_relay_handshakes_failed_total") == 1
            await server.close()
            await client.close()

            sender, receiver = await agree("127.0.0.1", ports)
            a = await enter_room("127.0.0.1", ports.secure_port, receiver.identity)
            b = await enter_room("127.0.0.1", ports.secure_port, sender.identity)
            assert await read_exactly(a, 2) == b"00"
            assert await read_exactly(b, 2) == b"00"
            await a.send_all(payload)
            assert await read_exactly(b, len(payload)) == payload
            live = await scrape(ports.metrics_port)
            assert value(live, "peer_relay_rooms_open") == 1
            assert value(live, "peer_relay_forwarded_bytes_total") == len(payload)  # counted live
            assert value(live, "peer_relay_connections", port="secure", transport="tcp") == 2
            await a.aclose()
            assert await read_all(b) == CLOSE_MARKER
            await b.aclose()
            await trio.sleep(0.1)
            after = await scrape(ports.metrics_port)
            assert value(after, "peer_relay_rooms_open") == 0
            assert value(after, "peer_relay_rooms_opened_total") == 1
            assert value(after, "peer_relay_rooms_booked_total") == 1
            assert value(after, "peer_relay_handshakes_started_total") == 2
            assert value(after, "peer_relay_handshakes_agreed_total") == 1
            assert value(after, "peer_relay_forwarded_bytes_total") == len(payload)
            assert value(after, "peer_relay_peers", role="sender") == 0
            assert value(after, "peer_relay_connections", port="secure", transport="tcp") == 0


async def test_refusals_are_counted_by_limit():
    config = metrics_config(limits=Limits(exempt=(), max_connections_per_address=1))
    with trio.fail_after(LIMIT):
        async with running(config) as ports:
            kept = await Peer.connect("127.0.0.1", ports.port)
            for _ in range(3):
                refused = await Peer.connect("127.0.0.1", ports.port)
                assert await read_all(refused.stream) == wire.encode(0, wire.Timeout())
                await refused.close()
            samples = await scrape(ports.metrics_port)
            assert value(samples, "peer_relay_refused_total", limit="connections_per_address") == 3
            assert value(samples, "peer_relay_refused_total", limit="hello_rate") == 0
            assert value(samples, "peer_relay_connections_admitted") == 1
            await kept.send(0, wire.HelloServer(PUBLIC))
            await kept.expect(0, wire.ServerIdentity(kept.identity))
            await kept.close()


async def test_failed_handshakes_and_the_ones_refused_for_them_are_counted():
    config = metrics_config(limits=Limits(exempt=(), max_failed_handshakes_per_address=1))
    with trio.fail_after(LIMIT):
        async with running(config) as ports:
            server, server_uid, client, client_uid = await register("127.0.0.1", ports)
            await client.send(server_uid, wire.SpokeFailure(1))  # a wrong code
            await server.expect(client_uid, wire.SpokeFailure(1))
            second = await Peer.connect("127.0.0.1", ports.port)
            await second.send(0, wire.HelloClient())
            await second.expect(0, wire.ClientIdentity(second.identity))
            await second.expect(0, wire.NewServer(server_uid, PUBLIC, server.identity))
            await second.send(server_uid, wire.XAndClientIdentity(X, second.identity))
            await second.expect(0, wire.Closed(server_uid))  # refused: one failure is the limit
            samples = await scrape(ports.metrics_port)
            assert value(samples, "peer_relay_handshake_attempts_failed_total") == 1
            assert value(samples, "peer_relay_handshakes_started_total") == 1
            assert value(samples, "peer_relay_refused_total",
                         limit="failed_handshakes_per_address") == 1
            assert value(samples, "peer_relay_refused_total",
                         limit="failed_handshakes_per_sender") == 0
            for peer in (server, client, second):
                await peer.close()


async def test_only_get_and_head_of_metrics_are_answered():
    with trio.fail_after(LIMIT):
        async with running(metrics_config()) as ports:
            port = ports.metrics_port
            status, _, body = await http(port, b"GET / HTTP/1.1\r\n\r\n")
            assert status == 404 and b"/metrics" in body
            status, headers, _ = await http(port, b"POST /metrics HTTP/1.1\r\n\r\n")
            assert status == 405 and headers["Allow"] == "GET, HEAD"
            status, headers, body = await http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
            assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
            status, _, _ = await http(port, b"nonsense\r\n\r\n")
            assert status == 400
            status, _, _ = await http(port, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 2000)
            assert status == 431
            # Still serving after all that.
            assert value(await scrape(port), "peer_relay_stopping") == 0


async def test_metrics_are_off_unless_asked_for():
    with trio.fail_after(LIMIT):
        async with running(RelayConfig(hosts=("127.0.0.1",), port=0, secure_port=0)) as ports:
            assert ports.metrics == () and ports.metrics_port is None
            assert "metrics" not in ports.describe()


def _public(nameplate: int, n: int) -> bytes:
    return bytes([n]) + bytes(17) + nameplate.to_bytes(2, "big") + bytes(14)


async def test_waiting_peers_by_kind_announcements_and_the_nameplate_cap():
    config = metrics_config(limits=Limits(max_senders_per_nameplate=2))
    with trio.fail_after(LIMIT):
        async with running(config) as ports:
            senders = []
            for n in range(2):
                sender = await Peer.connect("127.0.0.1", ports.port)
                await sender.send(0, wire.HelloServer(_public(5, n)))
                await sender.expect(0, wire.ServerIdentity(sender.identity))
                senders.append(sender)
            third = await Peer.connect("127.0.0.1", ports.port)
            await third.send(0, wire.HelloServer(_public(5, 9)))
            assert await read_all(third.stream) == wire.encode(0, wire.Timeout())
            scoped = await Peer.connect("127.0.0.1", ports.port)
            await scoped.send(0, wire.HelloScopedClient(5))
            await scoped.expect(0, wire.ClientIdentity(scoped.identity))
            plain = await Peer.connect("127.0.0.1", ports.port)
            await plain.send(0, wire.HelloClient())
            await plain.expect(0, wire.ClientIdentity(plain.identity))
            for receiver in (scoped, plain):
                for n in range(2):
                    frame = await receiver.frame()
                    assert isinstance(frame.packet, wire.NewServer)
            samples = await scrape(ports.metrics_port)
            assert value(samples, "peer_relay_waiting", kind="sender") == 2
            assert value(samples, "peer_relay_waiting", kind="scoped") == 1
            assert value(samples, "peer_relay_waiting", kind="plain") == 1
            assert value(samples, "peer_relay_announcements_total") == 4
            assert value(samples, "peer_relay_refused_total", limit="senders_per_nameplate") == 1
            for peer in (*senders, third, scoped, plain):
                await peer.close()
