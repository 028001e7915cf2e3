"""How connections reach the relay: plain TCP, TLS, WebSocket and WebSocket over TLS.

Whatever carries it, an accepted connection becomes an ``Endpoint``: a ``trio.abc.Stream`` of
the protocol's bytes plus the peer's identity, so the handshake core and the room pairing
never know the transport. Two things do differ and live here:

- ending politely (``Endpoint.goodbye``): TCP says FIN and drains, TLS does the same under
  its records, WebSocket sends a Close frame and waits for the answer; each so that our last
  bytes are not destroyed by a reset;
- the secure room's pipe: two plain TCP sockets are spliced by ``relay.pipe``; as soon as one
  side is TLS or WebSocket, the bytes must pass through Python, and ``stream_pipe`` copies
  them with the same end-of-room rules (marker, both closed).

Opening costs a deadline: a TLS handshake or an HTTP upgrade that does not finish within
``upgrade_timeout`` closes that connection, and nothing else waits on it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from typing import Callable, Iterable, Union

import attrs
import trio

from relay import wire
from relay.limits import RoomMeter
from relay.pipe import BUFFER_SIZE, CLOSE_MARKER, MARKER_LINGER, STALL_TIMEOUT, STALLED, PipeStats
from relay.webapp import WebApp
from relay.websocket import (
    PageRequest,
    UpgradeRequest,
    WebSocketError,
    WebSocketStream,
    http_error,
    read_request,
    read_upgrade_request,
)

log = logging.getLogger("relay.transports")

EARLY_LIMIT = 64 * 1024
"""Bytes kept from a waiting secure-room peer that talks before ``00`` (then it is not read)."""
HANDSHAKE_PATH = "/handshake"
ROOM_PATH = "/room"
ROUTES = {HANDSHAKE_PATH: "handshake", ROOM_PATH: "room"}
"""WebSocket paths of the two ports; a proxy may serve them under a prefix of its own and
strip it (see docs/websocket.md)."""
KEEP_ALIVE_IDLE = 5.0
"""Seconds a connection that was served a page waits for the browser's next request."""
MAX_PAGE_REQUESTS = 100
"""Page requests one connection may make; the answer to the last says Connection: close."""

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class CertificateError(ValueError):
    """The relay's TLS certificate or key cannot be used; the message is fit for the user."""


def server_tls_context(cert: str, key: str | None = None) -> ssl.SSLContext:
    """A server context with the system's defaults (TLS 1.2 and up, no client certificate)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as error:
        raise CertificateError(f"cannot read {error.filename}: no such file") from None
    except (OSError, ssl.SSLError) as error:
        what = cert if key is None else f"{cert} and {key}"
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or str(error)
        raise CertificateError(f"cannot use the TLS certificate {what}: {str(reason).lower()}") from None
    return context


def trusted_network(text: str) -> Network:
    """An address or a network (``10.0.0.0/8``) whose forwarded-for headers we believe."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or network: {text!r}") from None


@attrs.define(eq=False)
class Endpoint:
    """One accepted connection, whatever carries it."""

    stream: trio.abc.Stream
    """The protocol's bytes: a ``trio.SocketStream``, a ``trio.SSLStream`` over one, or a
    ``WebSocketStream`` over either."""
    identity: bytes
    """``ip:port`` as the handshake announces it (docs/protocol.md §3.3)."""
    transport: str
    """``tcp``, ``tls``, ``ws`` or ``wss``: for logs."""
    socket: trio.socket.SocketType
    """The TCP socket underneath: closing it ends the connection at once."""
    early: bytearray = attrs.Factory(bytearray)
    """What a waiting secure-room peer sent before its room opened, kept for the pipe."""

    @property
    def plain(self) -> bool:
        """Plain TCP: the kernel can splice it and peek at it."""
        return isinstance(self.stream, trio.SocketStream)

    def abort(self) -> None:
        """Close now, without flushing (closing twice is harmless)."""
        self.socket.close()

    async def goodbye(self, linger: float = MARKER_LINGER, reason: str = "") -> None:
        """Close after our last bytes without a reset destroying them in the peer's queue.

        The peer learns the end in its transport's terms, then we read and drop what it still
        sends until its own end, for at most ``linger`` seconds.
        """
        try:
            with trio.move_on_after(linger):
                if isinstance(self.stream, WebSocketStream):
                    await self.stream.close_gracefully(reason=reason, wait=linger)
                    return
                if isinstance(self.stream, trio.SSLStream):
                    # No close_notify: every peer of ours reads a TCP end as the end.
                    await self.stream.transport_stream.send_eof()
                else:
                    await self.stream.send_eof()
                while await self.stream.receive_some(BUFFER_SIZE):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.abort()

    async def wait_hangup(self) -> None:
        """Return when a waiting peer hangs up; what it says early is left for the pipe."""
        if self.plain:
            try:
                data = await self.socket.recv(1, socket.MSG_PEEK)
            except OSError:
                return
            if data:
                await trio.sleep_forever()  # it talks before "00": its problem, not a hangup
            return
        # TLS and WebSocket cannot be peeked at: keep what arrives (bounded) for the pipe.
        while len(self.early) < EARLY_LIMIT:
            try:
                data = await self.stream.receive_some(EARLY_LIMIT - len(self.early))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            self.early += data
        await trio.sleep_forever()

    def __repr__(self) -> str:
        return f"<{self.transport} endpoint {self.identity.decode('ascii', 'replace')}>"


def socket_identity(tcp: trio.SocketStream) -> bytes:
    host, port = tcp.socket.getpeername()[:2]
    return wire.identity_of(host, port)


async def open_tls(tcp: trio.SocketStream, context: ssl.SSLContext) -> trio.SSLStream:
    """Run the server side of a TLS handshake (the caller bounds its time)."""
    stream = trio.SSLStream(tcp, context, server_side=True, https_compatible=True)
    await stream.do_handshake()
    return stream


async def open_endpoint(
    tcp: trio.SocketStream, tls: ssl.SSLContext | None, timeout: float
) -> Endpoint | None:
    """A TCP-port connection as an Endpoint, after its TLS handshake if the relay has TLS.

    None when it cannot be used (it is closed then, and the reason logged).
    """
    try:
        identity = socket_identity(tcp)
    except (OSError, ValueError) as error:
        log.info("connection lost before it could be named: %s", error)
        tcp.socket.close()
        return None
    if tls is None:
        return Endpoint(tcp, identity, "tcp", tcp.socket)
    who = identity.decode("ascii", "replace")
    try:
        with trio.fail_after(timeout):
            stream = await open_tls(tcp, tls)
    except trio.TooSlowError:
        log.info("closing %s: no TLS handshake within %g s", who, timeout)
    except trio.BrokenResourceError as error:
        log.info("closing %s: TLS handshake failed: %s", who, _tls_reason(error))
    else:
        return Endpoint(stream, identity, "tls", tcp.socket)
    tcp.socket.close()
    return None


def _tls_reason(error: BaseException) -> str:
    cause = error.__cause__
    if isinstance(cause, ssl.SSLError):
        return (cause.reason or str(cause)).lower()
    return str(cause or error) or type(error).__name__


@attrs.frozen
class WebSocketArrival:
    """A WebSocket connection that passed its upgrade: where it goes, and who it is."""

    route: str
    """``handshake`` or ``room``."""
    endpoint: Endpoint


async def open_websocket(
    tcp: trio.SocketStream,
    tls: ssl.SSLContext | None,
    timeout: float,
    trusted_proxies: Iterable[Network] = (),
    *,
    admit: Callable[[bytes], str | None] | None = None,
    refusal: str | None = None,
    webapp: WebApp | None = None,
) -> WebSocketArrival | None:
    """TLS (for wss), then the HTTP upgrade, within ``timeout``; route it by its path.

    None when it is refused or fails: the client was told why (HTTP status and a one-line
    body) where it could still hear it, the connection is closed and the reason logged.
    ``admit`` is asked about the client's identity before the upgrade is accepted (a reason
    refuses it with 503); ``refusal`` refuses every request with 503 and that reason.
    With ``webapp``, a plain request (no upgrade) is a page request: it passes the same
    admission, is answered by ``webapp`` within the same ``timeout``, and gives None.
    """
    try:
        peer_host, peer_port = tcp.socket.getpeername()[:2]
        identity = wire.identity_of(peer_host, peer_port)
    except (OSError, ValueError) as error:
        log.info("websocket connection lost before it could be named: %s", error)
        tcp.socket.close()
        return None
    who = identity.decode("ascii", "replace")
    kind = "ws" if tls is None else "wss"
    stream: trio.abc.Stream = tcp
    answered = False  # the client got an HTTP error saying why: let it read that
    problem: str | None = None
    try:
        with trio.fail_after(timeout):
            if tls is not None:
                stream = await open_tls(tcp, tls)
            try:
                request: UpgradeRequest | PageRequest | None
                if webapp is None:
                    request = await read_upgrade_request(stream)
                else:
                    request = await read_request(stream)
            except WebSocketError:
                answered = True
                raise
        pages = 0
        while request is not None:
            with trio.fail_after(timeout):
                route = ROUTES.get(request.path.rstrip("/") or "/")
                forwarded = _forwarded_identity(request, peer_host, peer_port, trusted_proxies)
                if refusal is None and admit is not None and not isinstance(forwarded, str):
                    refusal = admit(forwarded)  # charged once per connection, however asked
                if isinstance(request, PageRequest):
                    assert webapp is not None
                    answered = True
                    pages += 1
                    keep = KEEP_ALIVE_IDLE if request.keep_alive and pages < MAX_PAGE_REQUESTS else None
                    problem = await _serve_page(stream, request, route, webapp, refusal, forwarded,
                                                keep_alive=keep)
                    if problem is not None or keep is None:
                        break
                elif refusal is not None:
                    problem = refusal
                    answered = True
                    await request.refuse(503, refusal)
                    break
                elif route is None:
                    problem = f"no such endpoint {request.path!r} (use {HANDSHAKE_PATH} or {ROOM_PATH})"
                    answered = True
                    await request.refuse(404, problem)
                    break
                elif isinstance(forwarded, str):
                    problem = forwarded
                    answered = True
                    await request.refuse(400, problem)
                    break
                else:
                    websocket = await request.accept()
                    return WebSocketArrival(route, Endpoint(websocket, forwarded, kind, tcp.socket))
            # A page was served on a kept connection: the next request (a page, or even the
            # upgrade), unless the client leaves or stays silent for KEEP_ALIVE_IDLE.
            request = None
            with trio.move_on_after(min(KEEP_ALIVE_IDLE, timeout)):
                request = await read_request(stream, again=True)
    except trio.TooSlowError:
        step = "TLS handshake" if tls is not None and stream is tcp else "WebSocket upgrade"
        problem = f"no {step} within {timeout:g} s"
    except WebSocketError as error:
        problem = str(error)
    except trio.BrokenResourceError as error:
        step = "TLS handshake" if tls is not None and stream is tcp else "connection"
        problem = f"{step} failed: {_tls_reason(error)}"
    if problem is not None:
        log.info("closing %s connection from %s: %s", kind, who, problem)
    if answered:
        await Endpoint(stream, identity, kind, tcp.socket).goodbye(linger=1.0)
    tcp.socket.close()
    return None


async def _serve_page(stream: trio.abc.Stream, request: PageRequest, route: str | None,
                      webapp: WebApp, refusal: str | None, forwarded: bytes | str,
                      keep_alive: float | None = None) -> str | None:
    """Answer a plain request; return why it was refused (None when it was served, even
    with a 404: a page that does not exist is an answer, not a problem of the relay).
    ``keep_alive``: the seconds the connection then waits for another request, if served."""
    head = request.method == "HEAD"
    if refusal is not None:
        problem: str | None = refusal
        response = webapp.error(503, refusal, head=head).encode()
    elif isinstance(forwarded, str):
        problem = forwarded
        response = webapp.error(400, forwarded, head=head).encode()
    elif route is not None:
        # An endpoint asked for without the upgrade: say what it is (not counted as a page).
        problem = f"not a WebSocket upgrade request: {request.path} takes WebSocket upgrades only"
        response = http_error(426, problem, upgrade=True)
    else:
        problem = None
        answer = webapp.respond(request.method, request.target, request.headers)
        log.debug("page %s %s: %d", request.method, request.target[:200], answer.status)
        response = answer.encode(keep_alive=keep_alive)
    await stream.send_all(response)
    return problem


def _forwarded_identity(request: UpgradeRequest | PageRequest, peer_host: str, peer_port: int,
                        trusted: Iterable[Network]) -> bytes | str:
    """The identity of a WebSocket peer, or why its proxy headers cannot be used.

    Only a connection from a trusted proxy may name the client, with ``X-Real-IP`` or else
    the last ``X-Forwarded-For`` entry (the one that proxy added). Proxies do not forward
    the client's port, so the port is that of the proxy's connection to us: unique per
    connection, which is what a room ticket needs.
    """
    try:
        peer = ipaddress.ip_address(peer_host.split("%", 1)[0])
    except ValueError:
        return wire.identity_of(peer_host, peer_port)
    if peer.version == 6 and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    if not any(peer in network for network in trusted):
        return wire.identity_of(peer_host, peer_port)
    real = request.header(b"x-real-ip")
    chain = b",".join(request.header(b"x-forwarded-for"))
    if real:
        claimed = real[-1]
    elif chain:
        claimed = chain.split(b",")[-1]
    else:
        return wire.identity_of(peer_host, peer_port)  # a direct client on the proxy's host
    text = claimed.decode("ascii", "replace").strip()
    if text.startswith("[") and "]" in text:  # [v6] or [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        return wire.identity_of(str(ipaddress.ip_address(text)), peer_port)
    except ValueError:
        return f"the proxy forwarded an invalid client address {text[:60]!r}"


# -- the secure room over streams ----------------------------------------------------------


@attrs.define(eq=False)
class _Flow:
    """One direction of a room."""

    src: Endpoint
    dst: Endpoint
    name: str
    meter: RoomMeter | None = None
    stall: float = STALL_TIMEOUT
    delivered: int = 0
    stopped: bool = False
    reading: trio.CancelScope | None = None
    writing: trio.CancelScope | None = None
    dst_broken: bool = False
    empty_paid: int = 0
    """Bytes of the source's frames without data already counted by the meter."""

    def stop(self) -> None:
        """Read no more (bytes already read are still delivered)."""
        self.stopped = True
        if self.reading is not None:
            self.reading.cancel()

    def abandon(self) -> None:
        """The destination failed as a source: write nothing more to it."""
        self.dst_broken = True
        if self.writing is not None:
            self.writing.cancel()


@attrs.define(eq=False)
class _Ending:
    side: str = ""
    reason: str = "cancelled"


async def stream_pipe(a: Endpoint, b: Endpoint, *, meter: RoomMeter | None = None,
                      stall: float = STALL_TIMEOUT) -> PipeStats:
    """The secure room's blind pipe when either side is TLS or WebSocket.

    Same rules as ``relay.pipe.blind_pipe``: bytes are copied as they come, one buffer per
    direction (a slow reader slows its writer down, nothing grows); when either side ends,
    both stop reading, deliver what they hold, write the close marker ``ff ff ff ff`` to
    their destination and say goodbye; both are closed when this returns, whatever happens.
    ``meter`` counts the bytes as they go and may limit the room's rate (a WebSocket's
    frames without data count too). A side that has not taken a whole write (up to one
    buffer, 256 KiB) within ``stall`` seconds ends the room, as does a side that fails:
    nothing waits on it any more. Unlike the spliced pipe, which times each step of
    progress, a stream's ``send_all`` shows none until it is done, so a side reading under
    about 2 KiB/s is taken for one that stopped.
    """
    a_to_b, b_to_a = _Flow(a, b, "a", meter, stall), _Flow(b, a, "b", meter, stall)
    ending = _Ending()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_carry, a_to_b, b_to_a, ending)
            nursery.start_soon(_carry, b_to_a, a_to_b, ending)
        async with trio.open_nursery() as nursery:
            for flow in (a_to_b, b_to_a):
                if not flow.dst_broken:
                    nursery.start_soon(flow.dst.goodbye)
    finally:
        a.abort()
        b.abort()
    return PipeStats(a_to_b.delivered, b_to_a.delivered, ending.side, ending.reason, False)


async def _carry(flow: _Flow, other: _Flow, ending: _Ending) -> None:
    side, reason = flow.name, "EOF"
    try:
        if flow.src.early:
            early, flow.src.early = bytes(flow.src.early), bytearray()
            await _deliver(flow, early)
        while True:
            data = b""
            with trio.CancelScope() as flow.reading:
                if flow.stopped:
                    break
                data = await _read(flow)
            flow.reading = None
            if flow.stopped or not data:
                break  # told to stop (nothing was read then), or the source ended
            await _deliver(flow, data)
    except _SideFailed as failure:
        side, reason = failure.side, failure.reason
        if side == flow.name:
            other.abandon()  # our source broke: the other way may be stuck writing to it
    if not ending.side and not flow.stopped:
        ending.side, ending.reason = side, reason
    other.stop()
    if not flow.dst_broken:
        try:
            await _write(flow, CLOSE_MARKER)
        except _SideFailed:
            pass


async def _write(flow: _Flow, data: bytes) -> None:
    """Write to the flow's destination; a failure, or ``stall`` seconds without the write
    going through (the peer does not read), is that side's end."""
    other_side = "b" if flow.name == "a" else "a"
    if flow.dst_broken:
        raise _SideFailed(other_side, "gone")
    with trio.move_on_after(flow.stall) as writing:
        flow.writing = writing
        try:
            await flow.dst.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            flow.dst_broken = True
            raise _SideFailed(other_side, str(error) or type(error).__name__) from None
        finally:
            flow.writing = None
    if writing.cancelled_caught:
        if flow.dst_broken:  # abandoned: its own failure as a source says why
            raise _SideFailed(other_side, "gone")
        flow.dst_broken = True
        raise _SideFailed(other_side, STALLED)


class _SideFailed(Exception):
    def __init__(self, side: str, reason: str) -> None:
        super().__init__(side, reason)
        self.side, self.reason = side, reason


async def _read(flow: _Flow) -> bytes:
    size = BUFFER_SIZE
    meter = flow.meter
    if meter is not None:
        while (budget := meter.allowance(trio.current_time())) == 0:
            await trio.sleep(meter.wait(trio.current_time()))  # the room's rate limit
        if budget is not None:
            size = min(size, budget)
    try:
        data = await flow.src.stream.receive_some(size)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
        raise _SideFailed(flow.name, str(error) or type(error).__name__) from None
    finally:
        if meter is not None:
            meter.spend(_empty_unpaid(flow))
    if meter is not None:
        meter.spend(len(data))
    return data


def _empty_unpaid(flow: _Flow) -> int:
    """Bytes of frames without data (pings...) the source sent since last counted: they
    cost the relay like data, so a room's rate limit counts them."""
    seen = getattr(flow.src.stream, "empty_bytes", 0)
    unpaid, flow.empty_paid = seen - flow.empty_paid, seen
    return unpaid


async def _deliver(flow: _Flow, data: bytes) -> None:
    await _write(flow, data)
    flow.delivered += len(data)
    if flow.meter is not None:
        flow.meter.delivered += len(data)
