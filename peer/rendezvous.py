"""Reaching the relay: the handshake-port connection and the secure-room ticket exchange."""

from __future__ import annotations

import trio

from relay import wire

from .address import RelayAddress
from .transport import CONNECT_TIMEOUT, RelayError, connect, open_relay, shown_address

__all__ = [
    "CONNECT_TIMEOUT", "HELLO_PATIENCE", "ROOM_STATUS", "RelayError", "RelayLink", "connect", "open_room",
]

HELLO_PATIENCE = 10.0
"""Seconds for the relay's first answer to our Hello (a relay sends 02 or 03 at once): past
it, the address is another service that accepted the connection and said nothing of ours.
Longer than ``nameplates.SCOPED_PATIENCE``, so a receiver's scoped Hello falls back first."""

_SHOWN_BYTES = 40
"""How much of another service's answer the error quotes."""

ROOM_STATUS = {
    b"00": None,
    b"01": "the relay timed out waiting for our room ticket",
    b"02": "the relay does not know our room (it expired, or the other side gave up)",
}


class RelayLink:
    """The handshake-port connection: frames out, frames in, through the one wire codec."""

    def __init__(self, stream: trio.abc.Stream, peer_host: str, where: str = "the relay") -> None:
        self.stream = stream
        self._parser = wire.Parser()
        # The secure room must be reached at the very address the handshake used (bob does
        # the same): a host name could resolve to another relay behind a load balancer.
        self.peer_host = peer_host
        self.where = where
        self.answered = False
        """True once the relay answered our Hello as a relay does (02, 03, or its goodbye)."""
        self._first = bytearray()
        """The first bytes it sent, to quote when they were not a relay's answer."""

    @classmethod
    async def open(cls, address: RelayAddress, *, nameplate: int | None = None) -> RelayLink:
        """Over whichever transport the address names (TCP, TLS, WebSocket); ``nameplate``
        goes into a WebSocket URL."""
        connected = await open_relay(address, nameplate=nameplate)
        where = str(address) if address.websocket else shown_address(address.host, address.port)
        return cls(connected.stream, connected.peer_host, where)

    def not_a_relay(self, why: str) -> RelayError:
        return RelayError(f"{self.where} is not a peer-relay relay ({why})")

    def unanswered(self, waited: float) -> RelayError:
        """The verdict when no answer to our Hello came within ``waited`` seconds."""
        if self._first:
            return self.not_a_relay(f"it answered with something else: {_quote(self._first)}")
        return self.not_a_relay(f"no answer to Hello within {waited:g} s")

    def _closed_unanswered(self) -> RelayError:
        # Our relay answers every Hello, even a refusal (0f); only a flood of connections
        # is closed without a word.
        if self._first:
            return self.not_a_relay(f"it answered with something else: {_quote(self._first)}")
        return RelayError(f"{self.where} closed the connection without answering Hello: it is "
                          "not a peer-relay relay, or it is turning connections away")

    async def send(self, frames: list[wire.Frame]) -> None:
        if not frames:
            return
        try:
            await self.stream.send_all(b"".join(f.encode() for f in frames))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if not self.answered:
                raise self._closed_unanswered() from None
            raise RelayError("the relay closed the connection") from None

    async def receive(self) -> list[wire.Frame]:
        """The frames of the next read; RelayError when the relay ends or garbles the stream."""
        while True:
            try:
                data = await self.stream.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                if not self.answered:
                    raise self._closed_unanswered() from None
                raise RelayError("lost the connection to the relay") from None
            if not data:
                if not self.answered:
                    raise self._closed_unanswered()
                raise RelayError("the relay closed the connection")
            if not self.answered and len(self._first) < _SHOWN_BYTES:
                self._first += data[: _SHOWN_BYTES - len(self._first)]
            try:
                self._parser.feed(data)
                frames = list(self._parser.frames())
            except wire.WireError as error:
                if not self.answered:
                    raise self.not_a_relay(
                        f"it answered with something else: {_quote(self._first)}") from None
                raise RelayError(f"the relay sent something invalid: {error}") from None
            if not self.answered:
                self.answered = any(_answers_hello(frame) for frame in frames)
            if frames:
                return frames

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


def _answers_hello(frame: wire.Frame) -> bool:
    """What a relay sends first: our identity (02, 03), or its goodbye (0f, 09 0000)."""
    return frame.uid == wire.RELAY_UID and isinstance(
        frame.packet, (wire.ServerIdentity, wire.ClientIdentity, wire.Timeout, wire.Closed))


def _quote(data: bytes | bytearray) -> str:
    """Another service's first bytes, on one printable line."""
    lines = bytes(data).decode("ascii", "replace").strip().splitlines() or [""]
    return repr("".join(c if c.isprintable() else "." for c in lines[0]))


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
        where = "secure room" if address.websocket else f"secure port {address.secure_port}"
        raise RelayError(f"the relay's {where} is not a peer-relay secure room (it answered "
                         f"our ticket with something else: {_quote(status)})")
    problem = ROOM_STATUS[status]
    if problem is not None:
        await trio.aclose_forcefully(stream)
        raise RelayError(problem)
    return stream
