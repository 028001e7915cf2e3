"""Reaching the relay over TCP, TLS, WebSocket or WebSocket over TLS, as a ``trio.abc.Stream``.

Above this module nothing knows the transport: the handshake and the secure room speak the
same bytes over every one of them. Each failure becomes a ``RelayError`` of one line, in
particular a certificate that does not verify ("certificate verify failed: ...").

The secure room must be reached at the very relay the handshake used (bob does the same: a
host name could resolve to another relay behind a load balancer), so the second connection
goes to the address the first one reached, while TLS still checks the certificate against
the name and WebSocket still sends it as the Host.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl

import attrs
import trio


from .address import RelayAddress

CONNECT_TIMEOUT = 15.0
"""Seconds for TCP, then TLS, then the WebSocket upgrade, together."""


class RelayError(Exception):
    """The relay cannot be reached, refused us, or went away; the message is for the user."""


@attrs.frozen
class Connected:
    """A connection to the relay, and the address it reached (for the second connection)."""

    stream: trio.abc.Stream
    peer_host: str


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


def shown_address(host: str, port: int) -> str:
    """``host:port`` as a user types it (brackets around an IPv6 address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_shown = shown_address


async def connect(host: str, port: int, *, what: str = "the relay") -> trio.SocketStream:
    """A TCP connection with a bounded wait and a message a user understands on failure."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise RelayError(
            f"cannot reach {what} at {_shown(host, port)}: no answer in {CONNECT_TIMEOUT:.0f} s"
        ) from None
    except (OSError, BaseExceptionGroup) as error:
        raise RelayError(f"cannot reach {what} at {_shown(host, port)}: {_describe(error)}") from None
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return stream


def client_tls_context(cacert: str | None = None) -> ssl.SSLContext:
    """Verify the relay against the system's authorities, or only against ``cacert``."""
    try:
        return ssl.create_default_context(cafile=cacert)
    except FileNotFoundError:
        raise RelayError(f"cannot read the CA certificate {cacert}: no such file") from None
    except (OSError, ssl.SSLError) as error:
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or str(error)
        raise RelayError(f"cannot use the CA certificate {cacert}: {str(reason).lower()}") from None


async def open_relay(
    address: RelayAddress, *, room: bool = False, peer_host: str | None = None,
    nameplate: int | None = None,
) -> Connected:
    """Connect to the relay's handshake endpoint, or with ``room`` to its secure room.

    ``peer_host`` is where to connect (the address the handshake reached); the name in
    ``address`` is still the one TLS verifies and the Host header carries. ``nameplate``
    (the code's) goes into WebSocket URLs for balancers; TCP and TLS have nowhere to put it.
    """
    port = address.secure_port if room and not address.websocket else address.port
    what = "the relay" if not room else (
        "the relay's secure room" if address.websocket else "the relay's secure port")
    host = peer_host or address.host
    context = client_tls_context(address.cacert) if address.tls else None
    tcp = await connect(host, port, what=what)
    reached = tcp.socket.getpeername()[0]
    stream: trio.abc.Stream = tcp
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            if context is not None:
                stream = trio.SSLStream(tcp, context, server_hostname=address.host,
                                        https_compatible=True)
                await stream.do_handshake()
            if address.websocket:
                stream = await _upgrade(stream, address, room, nameplate,
                                        f"{what} at {_shown(host, port)}")
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        step = "the TLS handshake" if address.tls and stream is tcp else "the WebSocket upgrade"
        raise RelayError(f"{what} at {_shown(host, port)} did not finish {step} "
                         f"within {CONNECT_TIMEOUT:.0f} s") from None
    except trio.BrokenResourceError as error:
        await trio.aclose_forcefully(stream)
        raise RelayError(f"cannot reach {what} at {_shown(host, port)}: {_tls_failure(error)}") from None
    return Connected(stream, reached)


async def _upgrade(stream: trio.abc.Stream, address: RelayAddress, room: bool,
                   nameplate: int | None, where: str) -> trio.abc.Stream:
    # Imported here: only WebSocket relays need wsproto, and every peer start pays for imports.
    from relay.websocket import WebSocketError, connect as websocket_connect

    endpoint = address.endpoint_path("room" if room else "handshake", nameplate)
    try:
        return await websocket_connect(stream, host=address.host_header(), path=endpoint)
    except WebSocketError as error:
        await trio.aclose_forcefully(stream)
        answer = _web_page(str(error))
        if answer is not None:
            raise RelayError(f"{address} is not a peer-relay relay (it answered the WebSocket "
                             f"upgrade with {answer})") from None
        raise RelayError(f"{where}: {error}") from None


_REFUSAL = re.compile(r"refused the WebSocket upgrade \((\d+)\)(?:: (.*))?$")


def _web_page(refusal: str) -> str | None:
    """``HTTP 404: Not Found`` when an upgrade was answered the way a web server answers a
    page (a success, a redirect, or a 404 that is not our relay's "no such endpoint"); None
    for the refusals a relay (or a proxy in front of one) sends: those say why themselves."""
    match = _REFUSAL.search(refusal)
    if match is None:
        return None
    status, body = int(match[1]), match[2] or ""
    if status >= 400 and not (status == 404 and "no such endpoint" not in body):
        return None
    return f"HTTP {status}: {body}" if body else f"HTTP {status}"


def _tls_failure(error: BaseException) -> str:
    cause = error.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return f"TLS handshake failed: {(cause.reason or str(cause)).lower().replace('_', ' ')}"
    if cause is not None and not isinstance(cause, ssl.SSLError) and isinstance(cause, OSError):
        return _describe(cause)
    return "the connection broke during the TLS handshake"
