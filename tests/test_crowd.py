"""The real daemon in a crowd (issue 13): 5,000 idle senders wait; a scoped receiver is told
exactly its nameplate's senders, and a plain receiver that reads normally is told all 5,000
and is not cut off by the relay's own announcements."""

from __future__ import annotations

import resource

import pytest
import trio

from processes import start_relay, stop_relay
from relay import wire

from test_relay_server import Peer

CROWD = 5_000
NAMEPLATES = 100
"""50 senders each: under the default cap of 64 per nameplate."""
LIMIT = 120
"""Seconds for the whole test, however loaded the machine (it takes a few here)."""


def public_for(nameplate: int, n: int) -> bytes:
    return n.to_bytes(4, "big") + bytes(14) + nameplate.to_bytes(2, "big") + bytes(14)


@pytest.fixture
def descriptors():
    """Room for the crowd's sockets in this process (the relay raises its own limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = CROWD + 1000
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def crowd_of_senders(port: int, peers: list[Peer]) -> dict[bytes, int]:
    """CROWD registered senders (into ``peers``, for the caller to close): their identity →
    nameplate. Their sockets stay unread: the relay's packets to them wait in the kernel."""
    senders: dict[bytes, int] = {}
    for n in range(CROWD):
        peer = await Peer.connect("127.0.0.1", port)
        nameplate = n % NAMEPLATES
        await peer.send(0, wire.HelloServer(public_for(nameplate, n)))
        senders[peer.identity] = nameplate
        peers.append(peer)
    for peer in peers:  # every Hello answered: all registered
        await peer.expect(0, wire.ServerIdentity(peer.identity))
    return senders


async def announcements(receiver: Peer, count: int) -> list[wire.NewServer]:
    told = []
    while len(told) < count:
        frame = await receiver.frame()
        assert isinstance(frame.packet, wire.NewServer), frame
        told.append(frame.packet)
    return told


def test_a_crowd_of_5000_senders(descriptors):
    relay = start_relay()
    try:
        trio.run(_crowd, relay.port)
        assert relay.process.poll() is None
    finally:
        stop_relay(relay)


async def _crowd(port: int) -> None:
    peers: list[Peer] = []
    with trio.fail_after(LIMIT):
        try:
            senders = await crowd_of_senders(port, peers)
            for nameplate in (0, 42, NAMEPLATES - 1):
                receiver = await Peer.connect("127.0.0.1", port)
                await receiver.send(0, wire.HelloScopedClient(nameplate))
                await receiver.expect(0, wire.ClientIdentity(receiver.identity))
                mine = {identity for identity, n in senders.items() if n == nameplate}
                told = await announcements(receiver, len(mine))
                assert {packet.identity for packet in told} == mine
                assert all(packet.public[18:20] == nameplate.to_bytes(2, "big")
                           for packet in told)
                with trio.move_on_after(0.5):  # and nothing more
                    frame = await receiver.frame()
                    raise AssertionError(f"told more than its nameplate's senders: {frame}")
                await receiver.close()

            plain = await Peer.connect("127.0.0.1", port)
            await plain.send(0, wire.HelloClient())
            await plain.expect(0, wire.ClientIdentity(plain.identity))
            told = []
            while len(told) < CROWD:  # reads as a peer does, a packet at a time
                frame = await plain.frame()
                assert isinstance(frame.packet, wire.NewServer), frame
                told.append(frame.packet.identity)
            assert len(set(told)) == CROWD and set(told) == set(senders)
            # Still there: the relay answers a repeated Hello.
            await plain.send(0, wire.HelloScopedClient(3))
            await plain.expect(0, wire.ClientIdentity(plain.identity))
            await plain.close()
        finally:
            for peer in peers:
                await peer.close()


def test_a_cut_short_scoped_hello_closes_that_connection_only(relay_process):
    async def check(port: int) -> None:
        with trio.fail_after(30):
            sender = await Peer.connect("127.0.0.1", port)
            await sender.send(0, wire.HelloServer(public_for(9, 1)))
            await sender.expect(0, wire.ServerIdentity(sender.identity))
            broken = await Peer.connect("127.0.0.1", port)
            await broken.stream.send_all(b"000010\x00")  # one byte of its two
            await broken.stream.send_eof()
            await broken.expect_eof()
            await broken.close()
            receiver = await Peer.connect("127.0.0.1", port)
            await receiver.send(0, wire.HelloScopedClient(9))
            await receiver.expect(0, wire.ClientIdentity(receiver.identity))
            assert isinstance((await receiver.frame()).packet, wire.NewServer)
            for peer in (sender, receiver):
                await peer.close()

    trio.run(check, relay_process.port)
