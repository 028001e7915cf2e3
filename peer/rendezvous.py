"""Reaching the relay: the handshake-port connection and the secure-room ticket exchange."""

from __future__ import annotations

import trio

from relay import wire

from .address import RelayAddress
from .transport import CONNECT_TIMEOUT, RelayError, connect, open_relay

__all__ = ["CONNECT_TIMEOUT", "ROOM_STATUS", "RelayError", "RelayLink", "connect", "open_room"]

ROOM_STATUS = {
    b"00": None,
    b"01": "the relay timed out waiting for our room ticket",
    b"02": "the relay does not know our room (it expired, or the other side gave up)",
}


class RelayLink:
    """The handshake-port connection: frames out, frames in, through the one wire codec."""

    def __init__(self, stream: trio.abc.Stream, peer_host: str) -> None:
        self.stream = stream
        self._parser = wire.Parser()
        # The secure room must be reached at the very address the handshake used (bob does
        # the same): a host name could resolve to another relay behind a load balancer.
        self.peer_host = peer_host

    @classmethod
    async def open(cls, address: RelayAddress, *, nameplate: int | None = None) -> RelayLink:
        """Over whichever transport the address names (TCP, TLS, WebSocket); ``nameplate``
        goes into a WebSocket URL."""
        connected = await open_relay(address, nameplate=nameplate)
        return cls(connected.stream, connected.peer_host)

    async def send(self, frames: list[wire.Frame]) -> None:
        if not frames:
            return
        try:
            await self.stream.send_all(b"".join(f.encode() for f in frames))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise RelayError("the relay closed the connection") from None

    async def receive(self) -> list[wire.Frame]:
        """The frames of the next read; RelayError when the relay ends or garbles the stream."""
        while True:
            try:
                data = await self.stream.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise RelayError("lost the connection to the relay") from None
            if not data:
                raise RelayError("the relay closed the connection")
            try:
                self._parser.feed(data)
                frames = list(self._parser.frames())
            except wire.WireError as error:
                raise RelayError(f"the relay sent something invalid: {error}") from None
            if frames:
                return frames

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


async def open_room(
    address: RelayAddress, host: str, partner_identity: bytes, *, timeout: float = 120.0,
    nameplate: int | None = None,
) -> trio.abc.Stream:
    """Present the partner's identity to the secure room and wait for the relay's ``00``.

    ``host`` is the address the handshake reached. The ticket is the partner's identity,
    not ours: that is what bob's relay pairs on.
    """
    stream = (await open_relay(address, room=True, peer_host=host, nameplate=nameplate)).stream
    try:
        with trio.fail_after(timeout):
            await stream.send_all(partner_identity + b"\n")
            status = b""
            while len(status) < 2:
                chunk = await stream.receive_some(2 - len(status))
                if not chunk:
                    raise RelayError("the relay closed the room before the other side arrived")
                status += chunk
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise RelayError(f"the other side did not reach the secure room within {timeout:.0f} s") from None
    except (trio.BrokenResourceError, OSError):
        await trio.aclose_forcefully(stream)
        raise RelayError("lost the connection to the relay's secure port") from None
    except RelayError:
        await trio.aclose_forcefully(stream)
        raise
    if status not in ROOM_STATUS:
        await trio.aclose_forcefully(stream)
        raise RelayError(f"the relay answered {status!r} on the secure port")
    problem = ROOM_STATUS[status]
    if problem is not None:
        await trio.aclose_forcefully(stream)
        raise RelayError(problem)
    return stream
