"""The relay daemon's I/O: sockets, timers and tasks around the sans-I/O core.

Everything the relay *decides* lives in ``relay.core`` (handshake port) and ``relay.rooms``
(secure-room pairing); this module only moves bytes and time into them and carries out
what they answer. One task per connection reads; on the handshake port a writer task runs
beside it whenever it has bytes to send, so that a peer which does not read cannot stall
anyone else: its outgoing bytes wait in a small outbox, and a peer whose outbox overflows
is cut off as too slow (bounded memory instead of unbounded buffering).

Both ports may also be reached over TLS (``tls_cert``) and over WebSocket (``ws_port``, one
port for both protocols, told apart by the request path); ``relay.transports`` turns each
accepted connection into an ``Endpoint`` (a byte stream and an identity), so everything
below serves every transport alike and rooms pair across transports.

Timers (all from the moment of connecting):
- TLS and WebSocket: ``upgrade_timeout`` to finish the TLS handshake and the HTTP upgrade;
- handshake port: ``hello_timeout`` to say Hello, then ``timeout`` in all (bob's 3600 s);
- secure port: ``room_timeout`` to send the ticket line (else ``01``), and a booked room
  must be joined by both peers within ``room_timeout`` of the receiver's Accepted (else the
  waiting half is closed without a status, as bob does).
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import socket
import ssl
from functools import partial
from typing import Awaitable, Callable, Iterable, TypeVar

import attrs
import trio

from relay import wire
from relay.core import Close, Output, Relay, Send
from relay.pipe import blind_pipe
from relay.rooms import Invalid, Paired, RoomBook, Waiting
from relay.transports import (
    Endpoint,
    Network,
    open_endpoint,
    open_websocket,
    server_tls_context,
    stream_pipe,
    trusted_network,
)

try:
    import resource
except ImportError:  # not POSIX
    resource = None  # type: ignore[assignment]

log = logging.getLogger("relay.server")

DEFAULT_HOSTS = ("0.0.0.0", "::")
"""Every IPv4 and every IPv6 interface, as two sockets (the IPv6 one is IPv6-only)."""
TICKET_LIMIT = 100
"""bob reads the secure-room line into 100 bytes; a line without ``\\n`` by then is invalid."""
RECEIVE_SIZE = 4096
"""Handshake packets are at most 408 bytes: small reads keep every peer's turn short."""
LINGER = 1.0
"""Seconds to read and drop what a peer still sends after the relay's last bytes to it.

Closing a socket that has unread input makes the kernel send a reset, and a reset can
destroy the last bytes (0f, ``02``...) in the peer's receive queue before it reads them.
So the relay shuts its side down first and drains the input until EOF, briefly.
"""
CLOSE_GRACE = 5.0
"""Seconds a closing handshake connection gets to take its last bytes (0e, 0f, 09...)."""
SHUTDOWN_GRACE = 2.0
"""Seconds the relay waits, when stopping, for peers to take their Closed 0000."""
STATUS_TIMEOUT = 5.0
"""Seconds to write a secure-port status (``00``, ``01``, ``02``): two bytes, normally instant."""

ACCEPT_PAUSE = 0.1
"""Seconds to wait before accepting again when the system is out of descriptors or memory."""
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

T = TypeVar("T")

ROOM_READY = b"00"
ROOM_TIMEOUT = b"01"
ROOM_INVALID = b"02"


def _host_tuple(hosts: str | Iterable[str]) -> tuple[str, ...]:
    return (hosts,) if isinstance(hosts, str) else tuple(hosts)


def _positive(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


def _port(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be 0-65535, not {value!r}")


def _optional_port(instance: object, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None:
        _port(instance, attribute, value)


def _networks(values: Iterable[str | Network]) -> tuple[Network, ...]:
    return tuple(v if not isinstance(v, str) else trusted_network(v) for v in values)


def _outbox(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value < wire.MAX_PACKET:
        raise ValueError(f"max_outbox must hold at least one packet ({wire.MAX_PACKET} bytes)")


@attrs.frozen
class RelayConfig:
    """How the relay listens and how long it waits (seconds)."""

    hosts: tuple[str, ...] = attrs.field(default=DEFAULT_HOSTS, converter=_host_tuple)
    """Addresses to listen on. With the default, IPv6 is skipped if the system has none."""
    port: int = attrs.field(default=9000, validator=_port)
    """Handshake port (0: any free port)."""
    secure_port: int = attrs.field(default=9001, validator=_port)
    """Secure-room port (0: any free port)."""
    timeout: float = attrs.field(default=3600.0, validator=_positive)
    """A handshake connection's whole life, from connect (bob's ``--timeout``)."""
    hello_timeout: float = attrs.field(default=30.0, validator=_positive)
    """Time to say Hello after connecting; bob waits forever, which lets idle sockets pile up."""
    room_timeout: float = attrs.field(default=60.0, validator=_positive)
    """Time to send the secure-room line, and for both peers to join a booked room.

    bob uses ``--timeout`` (an hour) here too, but its peers connect to the secure port right
    after 0a/0e, so a minute is plenty and stale bookings go away sooner.
    """
    max_outbox: int = attrs.field(default=64 * 1024, validator=_outbox)
    """Unsent bytes a handshake peer may have queued before it is cut off as too slow.

    Keep it well above one burst: a single 4 KiB read from a sender repeating its Hello can
    queue about 6 KB of announcements for each receiver before their writers get to run.
    """
    ws_port: int | None = attrs.field(default=None, validator=_optional_port)
    """WebSocket port for both protocols (paths ``/handshake`` and ``/room``); None: off."""
    tls_cert: str | None = None
    """PEM certificate chain: with it, every port speaks TLS (the WebSocket port wss)."""
    tls_key: str | None = None
    """PEM private key, if not in ``tls_cert``."""
    trusted_proxies: tuple[Network, ...] = attrs.field(default=(), converter=_networks)
    """Reverse proxies (addresses or networks) whose ``X-Real-IP`` / ``X-Forwarded-For`` name
    a WebSocket peer; from anyone else those headers are ignored."""
    upgrade_timeout: float = attrs.field(default=10.0, validator=_positive)
    """Time for a new connection to finish its TLS handshake and its WebSocket upgrade."""

    def __attrs_post_init__(self) -> None:
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("a TLS key needs a TLS certificate (tls_cert)")


@attrs.frozen
class BoundPorts:
    """The addresses actually listened on (the real ports, when 0 was asked for)."""

    handshake: tuple[tuple[str, int], ...]
    secure: tuple[tuple[str, int], ...]
    websocket: tuple[tuple[str, int], ...] = ()
    tls: bool = False

    @property
    def port(self) -> int:
        return self.handshake[0][1]

    @property
    def secure_port(self) -> int:
        return self.secure[0][1]

    @property
    def ws_port(self) -> int | None:
        return self.websocket[0][1] if self.websocket else None

    def describe(self) -> str:
        def addresses(pairs: Iterable[tuple[str, int]]) -> str:
            return ", ".join(_show_address(host, port) for host, port in pairs)

        text = f"{addresses(self.handshake)} (handshake) and {addresses(self.secure)} (secure room)"
        if self.websocket:
            text += f", {addresses(self.websocket)} (websocket)"
        return text + (", with TLS" if self.tls else "")


class ListenError(OSError):
    """A port could not be bound; the message is fit for the user as it is."""


def _show_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def raise_open_file_limit() -> int | None:
    """Lift the soft limit on open files to the hard one: each peer costs a descriptor or two."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, error)
    return soft


async def serve(
    config: RelayConfig,
    *,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[BoundPorts] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the relay until ``stop`` is set, then shut down cleanly and return.

    ``task_status.started`` receives the ``BoundPorts`` once every port listens. A port that
    cannot be bound raises ``ListenError`` before that, an unusable certificate
    ``relay.transports.CertificateError``. Cancelling ``serve`` instead of setting ``stop`` drops every
    connection at once, without telling peers.
    """
    tls = None if config.tls_cert is None else server_tls_context(config.tls_cert, config.tls_key)
    limit = raise_open_file_limit()
    if limit is not None:
        log.info("open-file limit: %d", limit)
    listening: list[trio.SocketListener] = []
    try:
        handshake_listeners = await _listen(config.hosts, config.port)
        listening += handshake_listeners
        secure_listeners = await _listen(config.hosts, config.secure_port)
        listening += secure_listeners
        websocket_listeners: list[trio.SocketListener] = []
        if config.ws_port is not None:
            websocket_listeners = await _listen(config.hosts, config.ws_port)
            listening += websocket_listeners
        ports = BoundPorts(_bound(handshake_listeners), _bound(secure_listeners),
                           _bound(websocket_listeners), tls is not None)
        server = _Server(config, tls)
        await server.run(handshake_listeners, secure_listeners, websocket_listeners, stop, ports,
                         task_status)
    finally:
        for listener in listening:  # closing twice is harmless
            await trio.aclose_forcefully(listener)


async def _listen(hosts: tuple[str, ...], port: int) -> list[trio.SocketListener]:
    """Listen on every host; with port 0 they all share the first ephemeral port they get."""
    listeners: list[trio.SocketListener] = []
    try:
        for host in hosts:
            want = port if port or not listeners else _bound(listeners)[0][1]
            try:
                listeners.extend(await trio.open_tcp_listeners(want, host=host))
            except OSError as error:
                if hosts == DEFAULT_HOSTS and ":" in host and _no_ipv6(error):
                    log.info("no IPv6 on this system: listening on IPv4 only")
                    continue
                reason = (error.strerror or str(error)).lower()
                raise ListenError(
                    error.errno or 0, f"cannot listen on {_show_address(host, want)}: {reason}"
                ) from error
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    return listeners


def _no_ipv6(error: OSError) -> bool:
    return error.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT) or (
        isinstance(error, socket.gaierror)
    )


def _bound(listeners: list[trio.SocketListener]) -> tuple[tuple[str, int], ...]:
    return tuple(listener.socket.getsockname()[:2] for listener in listeners)


def _text(identity: bytes) -> str:
    return identity.decode("ascii", "replace")


@attrs.define(eq=False)
class _HandshakeConnection:
    """One handshake-port peer as the driver sees it; the core knows it by this object."""

    endpoint: Endpoint
    identity: bytes
    connected_at: float
    tasks: trio.Nursery | None = None
    """The connection's own nursery: its writer runs there, and cancelling it drops the peer."""
    reading: trio.CancelScope = attrs.Factory(trio.CancelScope)
    """Cancelled when the core closes the connection; its deadline is the peer's timer."""
    outbox: bytearray = attrs.Factory(bytearray)
    in_flight: int = 0
    """Bytes handed to the socket by the writer and not yet accepted by the kernel."""
    writing: bool = False
    """A writer task is running. It is started on demand and ends when the outbox is empty,
    so an idle peer costs no writer task (memory per connection is the relay's limit)."""
    closing: str | None = None
    """Why the connection is closing, once it is; nothing more is sent to it then."""
    broken: bool = False
    """A write failed: the peer cannot be told anything more."""

    @property
    def stream(self) -> trio.abc.Stream:
        return self.endpoint.stream

    def unsent(self) -> int:
        return len(self.outbox) + self.in_flight

    def drop(self) -> None:
        """Abandon the connection now, without flushing."""
        assert self.tasks is not None
        self.tasks.cancel_scope.cancel()

    def __repr__(self) -> str:
        return f"<handshake connection {_text(self.identity)}>"


@attrs.define(eq=False)
class _Seat:
    """A secure-port connection that sent a good ticket and waits for its partner."""

    endpoint: Endpoint
    identity: bytes
    waiting: trio.CancelScope = attrs.Factory(trio.CancelScope)
    outcome: str | None = None
    """``"paired"`` (the partner's task took the socket), ``"expired"`` (the room timed out)
    or ``"left"`` (the peer hung up first)."""
    released: trio.Event = attrs.Factory(trio.Event)
    """Set once this seat's own task no longer touches the socket."""

    def end_wait(self, outcome: str) -> None:
        self.outcome = outcome
        self.waiting.cancel()

    def __repr__(self) -> str:
        return f"<secure-port seat {_text(self.identity)}>"


class _Server:
    """The running relay: one core, its connections, and who owns which task."""

    def __init__(self, config: RelayConfig, tls: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.tls = tls
        self.rooms = RoomBook(ttl=config.room_timeout)
        self.relay = Relay(self.rooms)
        self._janitor_wake = trio.Event()
        self._janitor_until = math.inf
        self._stopping = False

    async def run(
        self,
        handshake_listeners: list[trio.SocketListener],
        secure_listeners: list[trio.SocketListener],
        websocket_listeners: list[trio.SocketListener],
        stop: trio.Event | None,
        ports: BoundPorts,
        task_status: trio.TaskStatus[BoundPorts],
    ) -> None:
        async with trio.open_nursery() as everything:
            everything.start_soon(self._expire_rooms)
            # One nursery per kind of task, so that shutdown can end them in order: stop
            # accepting, end rooms and pipes at once, give handshake peers a moment to read
            # their Closed 0000.
            async with trio.open_nursery() as handshake_tasks:
                async with trio.open_nursery() as secure_tasks:
                    async with trio.open_nursery() as acceptors:
                        for listener in handshake_listeners:
                            acceptors.start_soon(
                                self._accept, listener, handshake_tasks, self._accept_handshake)
                        for listener in secure_listeners:
                            acceptors.start_soon(
                                self._accept, listener, secure_tasks, self._accept_secure)
                        # A WebSocket's port is known after its upgrade: it is upgraded among
                        # the handshake tasks, and a room connection moves to the secure ones.
                        for listener in websocket_listeners:
                            acceptors.start_soon(
                                self._accept, listener, handshake_tasks,
                                partial(self._accept_websocket, secure_tasks))
                        log.info("listening on %s", ports.describe())
                        task_status.started(ports)
                        if stop is None:
                            await trio.sleep_forever()
                        await stop.wait()
                        log.info("shutting down")
                        self._stopping = True
                        acceptors.cancel_scope.cancel()
                    secure_tasks.cancel_scope.cancel()
                    self._deliver(self.relay.shutdown())
                handshake_tasks.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
            everything.cancel_scope.cancel()
        log.info("stopped")

    async def _accept(
        self,
        listener: trio.SocketListener,
        tasks: trio.Nursery,
        handler: Callable[[trio.SocketStream], Awaitable[None]],
    ) -> None:
        """Hand each new connection to its own task; the handler owns (and closes) the stream."""
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as error:
                    if error.errno not in _OUT_OF_RESOURCES:
                        raise
                    # Out of descriptors or memory: refuse nobody, just let some peers go first.
                    log.warning("cannot accept a connection: %s; pausing", error)
                    await trio.sleep(ACCEPT_PAUSE)
                    continue
                tasks.start_soon(handler, stream)

    # -- handshake port -------------------------------------------------------------------

    async def _accept_handshake(self, tcp: trio.SocketStream) -> None:
        endpoint = await _opened(open_endpoint(tcp, self.tls, self.config.upgrade_timeout), tcp)
        if endpoint is not None:
            await self._serve_handshake(endpoint)

    async def _accept_websocket(self, secure_tasks: trio.Nursery, tcp: trio.SocketStream) -> None:
        arrival = await _opened(open_websocket(
            tcp, self.tls, self.config.upgrade_timeout, self.config.trusted_proxies), tcp)
        if arrival is None:
            return
        if self._stopping:
            arrival.endpoint.abort()
        elif arrival.route == "handshake":
            await self._serve_handshake(arrival.endpoint)
        else:
            # Nothing of a WebSocket runs in this task, so the connection can change hands.
            secure_tasks.start_soon(self._serve_secure, arrival.endpoint)

    async def _serve_handshake(self, endpoint: Endpoint) -> None:
        identity = endpoint.identity
        if self._stopping:
            endpoint.abort()
            return
        conn = _HandshakeConnection(endpoint, identity, trio.current_time())
        log.info("handshake connection from %s (%s)", _text(identity), endpoint.transport)
        try:
            async with trio.open_nursery() as tasks:
                conn.tasks = tasks
                self._deliver(self.relay.connect(conn, identity))
                await self._read(conn)
                if conn.closing is None:  # a bug in the core; do not leave the peer hanging
                    conn.closing = "closed by the relay"
                # Leaving the nursery waits for the writer to deliver the last packets.
                tasks.cancel_scope.deadline = trio.current_time() + CLOSE_GRACE
            if not tasks.cancel_scope.cancelled_caught and not conn.broken:
                await endpoint.goodbye(LINGER, reason=conn.closing or "")
        except Exception:
            log.exception("handshake connection %s failed", _text(identity))
        finally:
            # Whatever happened, the core must not keep a peer we no longer serve (a no-op
            # when the core closed it itself).
            try:
                self._deliver(self.relay.disconnect(conn))
            except Exception:
                log.exception("forgetting %s failed", _text(identity))
            endpoint.abort()
            log.info("closed %s: %s", _text(identity), conn.closing or "dropped")

    async def _read(self, conn: _HandshakeConnection) -> None:
        config = self.config
        conn.reading.deadline = conn.connected_at + min(config.hello_timeout, config.timeout)
        registered = False
        with conn.reading:
            while True:
                try:
                    data = await conn.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                    if str(error):  # a WebSocket says why it ended (a text message...)
                        log.info("%s: %s", _text(conn.identity), error)
                    data = b""
                if not data:
                    self._deliver(self.relay.disconnect(conn))
                    return
                self._deliver(self.relay.receive(conn, data))
                self._rooms_changed()
                if not registered and self.relay.registered(conn) is not None:
                    registered = True
                    conn.reading.deadline = conn.connected_at + config.timeout
        if conn.closing is None:  # the deadline, not the core, ended the reading
            self._deliver(self.relay.expire(conn))

    async def _write(self, conn: _HandshakeConnection) -> None:
        """Empty the outbox into the socket, then end (a new burst starts a new writer)."""
        try:
            while conn.outbox:
                data = bytes(conn.outbox)
                conn.outbox.clear()
                conn.in_flight = len(data)
                try:
                    await conn.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    conn.broken = True
                    conn.outbox.clear()
                    if conn.closing is None:
                        self._deliver(self.relay.disconnect(conn))
                    conn.reading.cancel()
                    return
                finally:
                    conn.in_flight = 0
        finally:
            conn.writing = False

    def _deliver(self, outputs: list[Output]) -> None:
        """Carry out the core's outputs, and those of any peer cut off along the way."""
        queue = collections.deque(outputs)
        while queue:
            output = queue.popleft()
            conn = output.conn
            if isinstance(output, Send):
                if conn.closing is not None:
                    continue
                if conn.unsent() + len(output.data) > self.config.max_outbox:
                    log.info("cutting off %s: it reads too slowly (%d bytes unsent)",
                             _text(conn.identity), conn.unsent())
                    conn.closing = "too slow to read"
                    conn.drop()
                    queue.extend(self.relay.disconnect(conn))
                    continue
                conn.outbox += output.data
                if not conn.writing:
                    conn.writing = True
                    conn.tasks.start_soon(self._write, conn)
            elif isinstance(output, Close):
                if conn.closing is None:
                    conn.closing = output.reason
                conn.reading.cancel()

    # -- secure port ----------------------------------------------------------------------

    async def _accept_secure(self, tcp: trio.SocketStream) -> None:
        endpoint = await _opened(open_endpoint(tcp, self.tls, self.config.upgrade_timeout), tcp)
        if endpoint is not None:
            await self._serve_secure(endpoint)

    async def _serve_secure(self, endpoint: Endpoint) -> None:
        identity = endpoint.identity
        who = _text(identity)
        owned = [endpoint]
        try:
            with trio.move_on_after(self.config.room_timeout) as line_timer:
                ticket = await _read_ticket(endpoint.stream)
            if line_timer.cancelled_caught:
                log.info("secure port %s: no ticket in time", who)
                await _send_status(endpoint, ROOM_TIMEOUT)
                return
            if ticket is None:
                log.info("secure port %s: no valid ticket line", who)
                await _send_status(endpoint, ROOM_INVALID)
                return
            seat = _Seat(endpoint, identity)
            arrival = self.rooms.arrive(seat, ticket, trio.current_time())
            self._rooms_changed()
            if isinstance(arrival, Invalid):
                log.info("secure port %s: ticket %s refused (%s)", who, _text(ticket),
                         arrival.reason)
                await _send_status(endpoint, ROOM_INVALID)
            elif isinstance(arrival, Waiting):
                log.info("secure port %s: waiting for %s", who, _text(ticket))
                owned = await self._wait_for_partner(seat)
            elif isinstance(arrival, Paired):
                partner: _Seat = arrival.partner
                partner.end_wait("paired")
                owned.append(partner.endpoint)
                await partner.released.wait()
                await self._open_room(partner, seat)
                owned = []  # blind_pipe closed both
        except Exception:
            log.exception("secure-port connection %s failed", who)
        finally:
            for owned_endpoint in owned:
                owned_endpoint.abort()

    async def _wait_for_partner(self, seat: _Seat) -> list[Endpoint]:
        """Hold the connection until the partner's task takes it; return what is still ours."""
        try:
            with seat.waiting:
                await seat.endpoint.wait_hangup()
            if seat.outcome == "paired":
                return []
            if seat.outcome == "expired":
                log.info("secure port %s: partner never came; closing", _text(seat.identity))
            else:
                seat.outcome = "left"
                log.info("secure port %s: left before its partner came", _text(seat.identity))
                self.rooms.leave(seat)
            return [seat.endpoint]
        finally:
            if seat.outcome is None:  # cancelled (shutdown): the seat must not be paired later
                self.rooms.leave(seat)
            seat.released.set()

    async def _open_room(self, first: _Seat, second: _Seat) -> None:
        a, b = first.endpoint, second.endpoint
        names = f"{_text(first.identity)} and {_text(second.identity)}"
        for seat in (first, second):
            if not await _send_status(seat.endpoint, ROOM_READY, close=False):
                log.info("room for %s not opened: a peer is gone", names)
                a.abort()
                b.abort()
                return
        log.info("room open between %s (%s to %s)", names, a.transport, b.transport)
        if a.plain and b.plain:
            stats = await blind_pipe(a.stream, b.stream)  # kernel splice: bytes stay in the kernel
        else:
            stats = await stream_pipe(a, b)
        log.info("room closed between %s: %d bytes one way, %d the other, ended by %s (%s)",
                 names, stats.a_to_b, stats.b_to_a,
                 {"a": _text(first.identity), "b": _text(second.identity)}.get(
                     stats.ended_by, "the relay"), stats.reason)

    # -- room expiry ----------------------------------------------------------------------

    def _rooms_changed(self) -> None:
        """Wake the janitor if the book now has a deadline earlier than the one it sleeps on."""
        deadline = self.rooms.next_deadline()
        if deadline is not None and deadline < self._janitor_until:
            self._janitor_wake.set()

    async def _expire_rooms(self) -> None:
        """Close waiting halves whose room was not joined in time (and forget stale bookings)."""
        while True:
            self._janitor_wake = trio.Event()
            deadline = self.rooms.next_deadline()
            self._janitor_until = math.inf if deadline is None else deadline
            with trio.move_on_at(self._janitor_until):
                await self._janitor_wake.wait()
            for seat in self.rooms.expire(trio.current_time()):
                seat.end_wait("expired")


async def _opened(opening: Awaitable[T], tcp: trio.SocketStream) -> T | None:
    """Run a connection's opening (TLS, upgrade); a bug there must not take the relay down."""
    try:
        return await opening
    except Exception:
        log.exception("opening a connection failed")
        tcp.socket.close()
        return None


async def _read_ticket(stream: trio.abc.Stream) -> bytes | None:
    """The partner identity line, or None for EOF or no ``\\n`` within the first 100 bytes.

    Reads never go past those 100 bytes, so whatever a peer sends later waits in the socket
    and enters the pipe; bytes after the ``\\n`` within them are dropped, as bob does.
    """
    line = bytearray()
    while len(line) < TICKET_LIMIT:
        try:
            data = await stream.receive_some(TICKET_LIMIT - len(line))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not data:
            return None
        line += data
        end = line.find(b"\n")
        if end >= 0:
            return bytes(line[:end])
    return None


async def _send_status(endpoint: Endpoint, status: bytes, *, close: bool = True) -> bool:
    """Write a two-byte secure-port status; say whether it went out."""
    sent = False
    with trio.move_on_after(STATUS_TIMEOUT):
        try:
            await endpoint.stream.send_all(status)
            sent = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    if close:
        if sent:
            await endpoint.goodbye(LINGER)
        endpoint.abort()
    return sent
