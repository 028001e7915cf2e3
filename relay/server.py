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

Abuse limits (``relay.limits``) are asked before a connection is served, before each Hello
and before a room opens; a refusal is said in the protocol's terms (``0f`` on the handshake
port, ``01`` on the secure port, HTTP 503 on the WebSocket port) and logged.

Stopping (``stop`` set) is graceful: listening ends, handshake peers are told (Closed
``0000``), secure-port peers still waiting for their partner get ``01``, and open rooms
may finish their transfer for up to ``shutdown_grace`` seconds before they are ended.

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
import ipaddress
import logging
import math
import socket
import ssl
from functools import partial
from typing import Awaitable, Callable, Iterable, Mapping, Sequence, TypeVar

import attrs
import trio

from relay import wire
from relay.core import ANNOUNCE_BUDGET, Close, Output, Relay, Send
from relay.limits import Admission, Guard, Limits, Refusal, RefusalLog, RoomMeter, host_of
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
"""Seconds the relay waits, when stopping, for handshake peers to take their Closed 0000."""
STATUS_TIMEOUT = 5.0
"""Seconds to write a secure-port status (``00``, ``01``, ``02``): two bytes, normally instant."""
REFUSAL_TIME = 2.0
"""Seconds a refused connection gets to hear why (TLS handshake and upgrade included)."""
REFUSALS_AT_ONCE = 256
"""Refused connections told why at the same time; past that, they are just closed, so that
a flood of refused connections costs no more than this many tasks."""
REFUSAL_LOG_EVERY = 1.0
"""Seconds between log lines about one limit's refusals (the others are counted in them)."""

ACCEPT_PAUSE = 0.1
"""Seconds to wait before accepting again when the system is out of descriptors or memory."""
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

T = TypeVar("T")

ROOM_READY = b"00"
ROOM_TIMEOUT = b"01"
ROOM_INVALID = b"02"

NOT_LIVE = ("hosts", "port", "secure_port", "ws_port", "metrics")
"""RelayConfig fields a running relay cannot change: they are its sockets."""


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


def _endpoint(instance: object, attribute: attrs.Attribute, value: tuple[str, int] | None) -> None:
    if value is not None:
        host, port = value
        if not host or not 0 <= port <= 65535:
            raise ValueError(f"{attribute.name} must be (address, port), not {value!r}")


@attrs.frozen
class RelayConfig:
    """How the relay listens, how long it waits (seconds), and what it allows."""

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
    shutdown_grace: float = attrs.field(default=30.0, validator=_positive)
    """When stopping, time open rooms get to finish their transfer before they are ended."""
    limits: Limits = attrs.field(factory=Limits)
    """The abuse limits (``relay.limits``)."""
    metrics: tuple[str, int] | None = attrs.field(default=None, validator=_endpoint)
    """Address and port of the Prometheus metrics over HTTP; None: off."""

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
    metrics: tuple[tuple[str, int], ...] = ()

    @property
    def port(self) -> int:
        return self.handshake[0][1]

    @property
    def secure_port(self) -> int:
        return self.secure[0][1]

    @property
    def ws_port(self) -> int | None:
        return self.websocket[0][1] if self.websocket else None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics[0][1] if self.metrics else None

    def describe(self) -> str:
        def addresses(pairs: Iterable[tuple[str, int]]) -> str:
            return ", ".join(_show_address(host, port) for host, port in pairs)

        text = f"{addresses(self.handshake)} (handshake) and {addresses(self.secure)} (secure room)"
        if self.websocket:
            text += f", {addresses(self.websocket)} (websocket)"
        text += ", with TLS" if self.tls else ""
        if self.metrics:
            text += f"; metrics on {addresses(self.metrics)}"
        return text


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
    sockets: Mapping[str, Sequence[socket.socket]] | None = None,
    task_status: trio.TaskStatus[BoundPorts] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the relay until ``stop`` is set, then shut down gracefully and return.

    ``sockets`` are listening sockets to use instead of binding (systemd's, by name:
    ``handshake``, ``secure``, ``websocket``, ``metrics``). See ``RelayServer.run``.
    """
    await RelayServer(config, sockets=sockets).run(stop=stop, task_status=task_status)


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


def _announce_budget(config: RelayConfig) -> int:
    """A plain receiver's batch of announcements: well below the outbox limit, so the
    relay's own announcements never cut off a receiver that reads."""
    return max(256, min(ANNOUNCE_BUDGET, config.max_outbox // 4))


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

    @property
    def host(self) -> str:
        return host_of(self.identity)

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
    """``"paired"`` (the partner's task took the socket), ``"expired"`` (the room timed out),
    ``"left"`` (the peer hung up first) or ``"stopping"`` (the relay is shutting down)."""
    released: trio.Event = attrs.Factory(trio.Event)
    """Set once this seat's own task no longer touches the socket."""

    def end_wait(self, outcome: str) -> None:
        self.outcome = outcome
        self.waiting.cancel()

    def __repr__(self) -> str:
        return f"<secure-port seat {_text(self.identity)}>"


@attrs.define(eq=False)
class _Room:
    """An open room: its pipe runs under ``scope``, whose deadline is the shutdown's."""

    meter: RoomMeter
    scope: trio.CancelScope


class RelayServer:
    """The running relay: one core, its connections, and who owns which task.

    ``run`` serves; while it does, ``reconfigure`` changes what can change live, and the
    attributes below are what the metrics read.
    """

    def __init__(self, config: RelayConfig,
                 sockets: Mapping[str, Sequence[socket.socket]] | None = None) -> None:
        self.config = config
        self.sockets = dict(sockets or {})
        self.tls: ssl.SSLContext | None = None
        self.guard = Guard(config.limits)
        self._refusal_log = RefusalLog(log, REFUSAL_LOG_EVERY)
        self.rooms = RoomBook(ttl=config.room_timeout)
        self.relay = Relay(self.rooms, hello_gate=self._hello_gate, guard=self.guard,
                           clock=trio.current_time, refusal_log=self._refusal_log,
                           announce_budget=_announce_budget(config))
        self.connections: collections.Counter[tuple[str, str]] = collections.Counter()
        """Connections being served, by (port, transport): ``("handshake", "tcp")``..."""
        self.open_rooms: set[_Room] = set()
        self.bytes_forwarded_closed = 0
        """Bytes carried by rooms that have closed (open ones are in their meters)."""
        self.rooms_opened = 0
        self._seats: set[_Seat] = set()
        self._before_room: set[trio.CancelScope] = set()
        """Secure-port connections still reading their ticket: cancelled when stopping."""
        self._rooms_deadline = math.inf
        self._refusing = 0
        self._janitor_wake = trio.Event()
        self._janitor_until = math.inf
        self._stopping = False

    # -- what the metrics read -------------------------------------------------------------

    @property
    def bytes_forwarded(self) -> int:
        """Bytes the secure rooms carried so far, both directions, open rooms included."""
        return self.bytes_forwarded_closed + sum(room.meter.delivered for room in self.open_rooms)

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- running ---------------------------------------------------------------------------

    async def run(
        self,
        *,
        stop: trio.Event | None = None,
        task_status: trio.TaskStatus[BoundPorts] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until ``stop`` is set, then shut down gracefully and return.

        ``task_status.started`` receives the ``BoundPorts`` once every port listens. A port
        that cannot be bound raises ``ListenError`` before that, an unusable certificate
        ``relay.transports.CertificateError``. Cancelling instead of setting ``stop`` drops
        every connection at once, without telling peers.
        """
        config = self.config
        if config.tls_cert is not None:
            self.tls = server_tls_context(config.tls_cert, config.tls_key)
        limit = raise_open_file_limit()
        if limit is not None:
            log.info("open-file limit: %d", limit)
        listening: list[trio.SocketListener] = []
        try:
            handshake_listeners = await self._listeners("handshake", config.port)
            listening += handshake_listeners
            secure_listeners = await self._listeners("secure", config.secure_port)
            listening += secure_listeners
            websocket_listeners: list[trio.SocketListener] = []
            if config.ws_port is not None or "websocket" in self.sockets:
                websocket_listeners = await self._listeners("websocket", config.ws_port)
                listening += websocket_listeners
            metrics_listeners: list[trio.SocketListener] = []
            if config.metrics is not None or "metrics" in self.sockets:
                metrics_listeners = await self._metrics_listeners()
                listening += metrics_listeners
            ports = BoundPorts(_bound(handshake_listeners), _bound(secure_listeners),
                               _bound(websocket_listeners), self.tls is not None,
                               _bound(metrics_listeners))
            await self._serve(handshake_listeners, secure_listeners, websocket_listeners,
                              metrics_listeners, stop, ports, task_status)
        finally:
            for listener in listening:  # closing twice is harmless
                await trio.aclose_forcefully(listener)

    async def _listeners(self, name: str, port: int | None) -> list[trio.SocketListener]:
        """systemd's sockets of that name if it passed any, else our own."""
        given = self.sockets.get(name)
        if given:
            return [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in given]
        assert port is not None
        return await _listen(self.config.hosts, port)

    async def _metrics_listeners(self) -> list[trio.SocketListener]:
        given = self.sockets.get("metrics")
        if given:
            return [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in given]
        assert self.config.metrics is not None
        host, port = self.config.metrics
        return await _listen((host,), port)

    async def _serve(
        self,
        handshake_listeners: list[trio.SocketListener],
        secure_listeners: list[trio.SocketListener],
        websocket_listeners: list[trio.SocketListener],
        metrics_listeners: list[trio.SocketListener],
        stop: trio.Event | None,
        ports: BoundPorts,
        task_status: trio.TaskStatus[BoundPorts],
    ) -> None:
        async with trio.open_nursery() as everything:
            everything.start_soon(self._expire_rooms)
            if metrics_listeners:
                from relay.metrics import serve_metrics  # prometheus_client only when asked

                for listener in metrics_listeners:
                    everything.start_soon(serve_metrics, listener, self)
            # One nursery per kind of task, so that shutdown can end them in order: stop
            # accepting, tell handshake peers, let open rooms finish within the grace.
            async with trio.open_nursery() as handshake_tasks:
                async with trio.open_nursery() as secure_tasks:
                    async with trio.open_nursery() as acceptors:
                        for listener in handshake_listeners:
                            acceptors.start_soon(
                                self._accept, listener, "handshake", handshake_tasks,
                                self._accept_handshake)
                        for listener in secure_listeners:
                            acceptors.start_soon(
                                self._accept, listener, "secure", secure_tasks,
                                self._accept_secure)
                        # A WebSocket's port is known after its upgrade: it is upgraded among
                        # the handshake tasks, and a room connection moves to the secure ones.
                        for listener in websocket_listeners:
                            acceptors.start_soon(
                                self._accept, listener, "websocket", handshake_tasks,
                                partial(self._accept_websocket, secure_tasks))
                        log.info("listening on %s", ports.describe())
                        task_status.started(ports)
                        if stop is None:
                            await trio.sleep_forever()
                        await stop.wait()
                        self._stopping = True
                        acceptors.cancel_scope.cancel()
                    self._begin_shutdown(handshake_tasks, secure_tasks)
            everything.cancel_scope.cancel()
        log.info("stopped")

    def _begin_shutdown(self, handshake_tasks: trio.Nursery, secure_tasks: trio.Nursery) -> None:
        """Stop everything but open rooms, which get ``shutdown_grace`` to finish."""
        now = trio.current_time()
        grace = self.config.shutdown_grace
        log.info("shutting down: %d open rooms get up to %g s to finish",
                 len(self.open_rooms), grace)
        self._deliver(self.relay.shutdown())
        handshake_tasks.cancel_scope.deadline = now + SHUTDOWN_GRACE
        for scope in self._before_room:
            scope.cancel()
        for seat in list(self._seats):
            if seat.outcome is None:
                seat.end_wait("stopping")
        self._rooms_deadline = now + grace
        for room in self.open_rooms:
            room.scope.deadline = self._rooms_deadline
        # A safety net: whatever else is left (a status being written) ends soon after.
        secure_tasks.cancel_scope.deadline = now + grace + STATUS_TIMEOUT + 2 * LINGER

    def reconfigure(self, config: RelayConfig) -> list[str]:
        """Take what can change while running from ``config``; return the fields that
        changed but cannot (they need a restart). Timeouts apply to connections from now on.

        A new TLS certificate is loaded first (so that renewed certificates are taken
        without a restart); if it cannot be, ``CertificateError`` is raised and nothing
        changes.
        """
        old = self.config
        restart = [name for name in NOT_LIVE if getattr(old, name) != getattr(config, name)]
        kept = {name: getattr(old, name) for name in NOT_LIVE}
        tls = self.tls
        if (old.tls_cert is None) != (config.tls_cert is None):
            restart.append("tls_cert")
            kept.update(tls_cert=old.tls_cert, tls_key=old.tls_key)
        elif config.tls_cert is not None:
            tls = server_tls_context(config.tls_cert, config.tls_key)
        self.config = attrs.evolve(config, **kept)
        self.tls = tls
        self.guard.limits = self.config.limits
        self.relay.announce_budget = _announce_budget(self.config)
        self.rooms.ttl = self.config.room_timeout
        self._rooms_changed()
        return restart

    async def _accept(
        self,
        listener: trio.SocketListener,
        port: str,
        tasks: trio.Nursery,
        handler: Callable[[trio.SocketStream, Admission], Awaitable[None]],
    ) -> None:
        """Hand each admitted connection to its own task; the handler owns (and closes) it."""
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
                try:
                    host = host_of(wire.identity_of(*stream.socket.getpeername()[:2]))
                except (OSError, ValueError):
                    stream.socket.close()  # gone already
                    continue
                # A trusted proxy's WebSocket clients are counted by the address it names.
                per_source = not (port == "websocket" and self._trusted(host))
                admission = self.guard.admit(host, per_source=per_source)
                if isinstance(admission, Refusal):
                    self._refuse(stream, port, admission, host, tasks)
                    continue
                tasks.start_soon(self._admitted, handler, stream, admission)

    async def _admitted(self, handler: Callable[..., Awaitable[None]], connection: object,
                        admission: Admission) -> None:
        try:
            await handler(connection, admission)
        finally:
            self.guard.release(admission)

    def _trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.config.trusted_proxies)

    # -- refusing ---------------------------------------------------------------------------

    def _refuse(self, stream: trio.SocketStream, port: str, refusal: Refusal, host: str,
                tasks: trio.Nursery) -> None:
        """Tell a connection over a limit why, in its port's terms, without letting a flood of
        them cost more than ``REFUSALS_AT_ONCE`` tasks."""
        self._refusal_log.refused(refusal, f"a {port} connection from {host}", trio.current_time())
        if self._refusing >= REFUSALS_AT_ONCE or self._stopping:
            stream.socket.close()
            return
        self._refusing += 1
        tasks.start_soon(self._say_refusal, stream, port, refusal)

    async def _say_refusal(self, tcp: trio.SocketStream, port: str, refusal: Refusal) -> None:
        try:
            with trio.move_on_after(REFUSAL_TIME):
                if port == "websocket":
                    await open_websocket(tcp, self.tls, REFUSAL_TIME, refusal=refusal.describe())
                    return
                endpoint = await open_endpoint(tcp, self.tls, REFUSAL_TIME)
                if endpoint is None:
                    return
                answer = wire.encode(wire.RELAY_UID, wire.Timeout()) if port == "handshake" \
                    else ROOM_TIMEOUT
                try:
                    await endpoint.stream.send_all(answer)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                await endpoint.goodbye(LINGER, reason=refusal.describe())
        except Exception:
            log.exception("refusing a connection failed")
        finally:
            tcp.socket.close()
            self._refusing -= 1

    def _hello_gate(self, conn: _HandshakeConnection) -> str | None:
        refusal = self.guard.hello(conn.host, trio.current_time())
        return None if refusal is None else refusal.describe()

    def _admit_forwarded(self, admission: Admission, identity: bytes) -> str | None:
        """A trusted proxy named its client: count the connection against that client."""
        refusal = self.guard.charge(admission, host_of(identity))
        if refusal is None:
            return None
        self._refusal_log.refused(refusal, f"a proxied connection from {host_of(identity)}",
                                  trio.current_time())
        return refusal.describe()

    # -- handshake port -------------------------------------------------------------------

    async def _accept_handshake(self, tcp: trio.SocketStream, admission: Admission) -> None:
        endpoint = await _opened(open_endpoint(tcp, self.tls, self.config.upgrade_timeout), tcp)
        if endpoint is not None:
            await self._serve_handshake(endpoint)

    async def _accept_websocket(self, secure_tasks: trio.Nursery, tcp: trio.SocketStream,
                                admission: Admission) -> None:
        arrival = await _opened(open_websocket(
            tcp, self.tls, self.config.upgrade_timeout, self.config.trusted_proxies,
            admit=partial(self._admit_forwarded, admission)), tcp)
        if arrival is None:
            return
        if self._stopping:
            arrival.endpoint.abort()
        elif arrival.route == "handshake":
            await self._serve_handshake(arrival.endpoint)
        else:
            # Nothing of a WebSocket runs in this task, so the connection can change hands;
            # it keeps its place among the admitted connections until the new task ends.
            secure_tasks.start_soon(self._admitted, self._serve_moved, arrival.endpoint,
                                    self.guard.share(admission))

    async def _serve_handshake(self, endpoint: Endpoint) -> None:
        identity = endpoint.identity
        if self._stopping:
            endpoint.abort()
            return
        conn = _HandshakeConnection(endpoint, identity, trio.current_time())
        log.info("handshake connection from %s (%s)", _text(identity), endpoint.transport)
        kind = ("handshake", endpoint.transport)
        self.connections[kind] += 1
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
            self.connections[kind] -= 1
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
        """Empty the outbox into the socket, then end (a new burst starts a new writer).

        Each time it is empty the core may give more (a plain receiver's next batch of
        announcements): so they go out as fast as the peer reads, never faster."""
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
                if not conn.outbox and conn.closing is None:
                    self._deliver(self.relay.drained(conn))  # lands in this outbox
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

    async def _accept_secure(self, tcp: trio.SocketStream, admission: Admission) -> None:
        endpoint = await _opened(open_endpoint(tcp, self.tls, self.config.upgrade_timeout), tcp)
        if endpoint is not None:
            await self._serve_secure(endpoint)

    async def _serve_moved(self, endpoint: Endpoint, admission: Admission) -> None:
        await self._serve_secure(endpoint)

    async def _serve_secure(self, endpoint: Endpoint) -> None:
        identity = endpoint.identity
        who = _text(identity)
        owned = [endpoint]
        room: tuple[_Seat, _Seat] | None = None
        kind = ("secure", endpoint.transport)
        self.connections[kind] += 1
        stopping = trio.CancelScope()  # cancelled if the relay stops before a room is found
        self._before_room.add(stopping)
        try:
            with stopping:
                if self._stopping:
                    stopping.cancel()
                with trio.move_on_after(self.config.room_timeout) as line_timer:
                    ticket = await _read_ticket(endpoint.stream)
            self._before_room.discard(stopping)
            if stopping.cancelled_caught:
                log.info("secure port %s: the relay is stopping", who)
                await _send_status(endpoint, ROOM_TIMEOUT)
                return
            if line_timer.cancelled_caught:
                log.info("secure port %s: no ticket in time", who)
                await _send_status(endpoint, ROOM_TIMEOUT)
                return
            if ticket is None:
                log.info("secure port %s: no valid ticket line", who)
                await _send_status(endpoint, ROOM_INVALID)
                return
            seat = _Seat(endpoint, identity)
            arrival = self.rooms.arrive(seat, ticket, trio.current_time(), source=identity)
            self._rooms_changed()
            if isinstance(arrival, Invalid):
                log.info("secure port %s: ticket %r refused (%s)", who, _text(ticket),
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
                room = (partner, seat)
                owned = []
        except Exception:
            log.exception("secure-port connection %s failed", who)
        finally:
            self._before_room.discard(stopping)
            self.connections[kind] -= 1
            for owned_endpoint in owned:
                owned_endpoint.abort()
        if room is not None:
            await self._open_room(*room)

    async def _wait_for_partner(self, seat: _Seat) -> list[Endpoint]:
        """Hold the connection until the partner's task takes it; return what is still ours."""
        self._seats.add(seat)
        try:
            with seat.waiting:
                if self._stopping:
                    seat.end_wait("stopping")
                await seat.endpoint.wait_hangup()
            if seat.outcome == "paired":
                return []
            if seat.outcome == "expired":
                log.info("secure port %s: partner never came; closing", _text(seat.identity))
            elif seat.outcome == "stopping":
                log.info("secure port %s: the relay is stopping", _text(seat.identity))
                self.rooms.leave(seat)
                await _send_status(seat.endpoint, ROOM_TIMEOUT)
                return []
            else:
                seat.outcome = "left"
                log.info("secure port %s: left before its partner came", _text(seat.identity))
                self.rooms.leave(seat)
            return [seat.endpoint]
        finally:
            self._seats.discard(seat)
            if seat.outcome in (None, "stopping"):  # cancelled: the seat must not be paired later
                self.rooms.leave(seat)
            seat.released.set()

    async def _open_room(self, first: _Seat, second: _Seat) -> None:
        """Join two seats (this task owns both endpoints now) and pipe them until either ends."""
        a, b = first.endpoint, second.endpoint
        names = f"{_text(first.identity)} and {_text(second.identity)}"
        kinds = [("secure", a.transport), ("secure", b.transport)]
        for kind in kinds:
            self.connections[kind] += 1
        try:
            refusal = self.guard.open_room() if not self._stopping else Refusal.ROOMS
            if refusal is not None:
                log.info("room for %s refused: %s", names,
                         "the relay is stopping" if self._stopping else refusal.describe())
                async with trio.open_nursery() as both:
                    both.start_soon(_send_status, a, ROOM_TIMEOUT)
                    both.start_soon(_send_status, b, ROOM_TIMEOUT)
                return
            try:
                await self._pipe_room(a, b, names)
            finally:
                self.guard.close_room()
        finally:
            for kind in kinds:
                self.connections[kind] -= 1
            a.abort()
            b.abort()

    async def _pipe_room(self, a: Endpoint, b: Endpoint, names: str) -> None:
        for endpoint in (a, b):
            if not await _send_status(endpoint, ROOM_READY, close=False):
                log.info("room for %s not opened: a peer is gone", names)
                return
        room = _Room(self.guard.room_meter(trio.current_time()),
                     trio.CancelScope(deadline=self._rooms_deadline))
        self.open_rooms.add(room)
        self.rooms_opened += 1
        log.info("room open between %s (%s to %s)", names, a.transport, b.transport)
        stats = None
        try:
            with room.scope:
                if a.plain and b.plain:
                    # kernel splice: the bytes stay in the kernel
                    stats = await blind_pipe(a.stream, b.stream, meter=room.meter)
                else:
                    stats = await stream_pipe(a, b, meter=room.meter)
        finally:
            self.open_rooms.discard(room)
            self.bytes_forwarded_closed += room.meter.delivered
        if stats is None:
            log.info("room between %s ended by the shutdown after %d bytes", names,
                     room.meter.delivered)
            return
        ends = {"a": _text(a.identity), "b": _text(b.identity)}
        log.info("room closed between %s: %d bytes one way, %d the other, ended by %s (%s)",
                 names, stats.a_to_b, stats.b_to_a, ends.get(stats.ended_by, "the relay"),
                 stats.reason)

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
