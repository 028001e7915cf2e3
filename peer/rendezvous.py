"""Reaching the relay: the handshake-port connection and the secure-room ticket exchange."""

from __future__ import annotations

import errno
import socket

import trio

from relay import wire

from .address import RelayAddress

CONNECT_TIMEOUT = 15.0
ROOM_STATUS = {
    b"00": None,
    b"01": "the relay timed out waiting for our room ticket",
    b"02": "the relay does not know our room (it expired, or the other side gave up)",
}


class RelayError(Exception):
    """The relay cannot be reached, refused us, or went away; the message is for the user."""


def _describe(error: BaseException) -> str:
    if isinstance(error, socket.gaierror):
        return "unknown host"
    if isinstance(error, OSError):
        if error.errno == errno.ECONNREFUSED:
            return "connection refused"
        if error.strerror:
            return error.strerror.lower()
        if error.__cause__ is not None:
            # trio's happy eyeballs: "all attempts failed", the real reasons are the cause.
            return _describe(error.__cause__)
    if isinstance(error, BaseExceptionGroup):
        return _describe(error.exceptions[0])
    return str(error) or type(error).__name__


async def connect(host: str, port: int, *, what: str = "the relay") -> trio.SocketStream:
    """A TCP connection with a bounded wait and a message a user understands on failure."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise RelayError(f"cannot reach {what} at {shown}: no answer in {CONNECT_TIMEOUT:.0f} s") from None
    except (OSError, BaseExceptionGroup) as error:
        raise RelayError(f"cannot reach {what} at {shown}: {_describe(error)}") from None
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return stream


class RelayLink:
    """The handshake-port connection: frames out, frames in, through the one wire codec."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._parser = wire.Parser()
        # The secure room must be reached at the very address the handshake used (bob does
        # the same): a host name could resolve to another relay behind a load balancer.
        self.peer_host: str = stream.socket.getpeername()[0]

    @classmethod
    async def open(cls, address: RelayAddress) -> RelayLink:
        return cls(await connect(address.host, address.port))

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
    host: str, secure_port: int, partner_identity: bytes, *, timeout: float = 120.0
) -> trio.SocketStream:
    """Present the partner's identity to the secure port and wait for the relay's ``00``.

    The ticket is the partner's identity, not ours: that is what bob's relay pairs on.
    """
    stream = await connect(host, secure_port, what="the relay's secure port")
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
