"""The relay daemon's I/O: sockets, timers and tasks around the sans-I/O core.

Everything the relay *decides* lives in ``relay.core`` (handshake port) and ``relay.rooms``
(secure-room pairing); the drivers only move bytes and time into them and carry out what
they answer: ``relay.handshake_port`` (a reader task per connection, a writer beside it
when it has bytes to send, bounded outboxes) and ``relay.secure_port`` (tickets, seats,
rooms). This module is the relay's life: its configuration, listening, accepting under
the limits, refusing, reloading and stopping; ``RelayServer`` joins the three.

Both ports may also be reached over TLS (``tls_cert``) and over WebSocket (``ws_port``, one
port for both protocols, told apart by the request path, which also serves the browser
peer's page to plain HTTP requests: ``relay.webapp``); ``relay.transports`` turns each
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
from typing import Awaitable, Callable, Iterable, Mapping, Sequence

import attrs
import trio

from relay import wire
from relay.core import Relay
from relay.handshake_port import HandshakePort, announce_budget
from relay.limits import Admission, Guard, Limits, Refusal, RefusalLog, host_of
from relay.opening import LINGER, opened
from relay.rooms import RoomBook
from relay.secure_port import (  # noqa: F401 (the statuses are imported from here too)
    ROOM_INVALID,
    ROOM_READY,
    ROOM_TIMEOUT,
    STATUS_TIMEOUT,
    SecurePort,
    _Room,
    _Seat,
)
from relay.transports import (
    Network,
    open_endpoint,
    open_websocket,
    server_tls_context,
    trusted_network,
)
from relay.webapp import WebApp

try:
    import resource
except ImportError:  # not POSIX
    resource = None  # type: ignore[assignment]

log = logging.getLogger("relay.server")

DEFAULT_HOSTS = ("0.0.0.0", "::")
"""Every IPv4 and every IPv6 interface, as two sockets (the IPv6 one is IPv6-only)."""
SHUTDOWN_GRACE = 2.0
"""Seconds the relay waits, when stopping, for handshake peers to take their Closed 0000."""
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
    web_app: bool = True
    """Serve the browser peer's page on the WebSocket port (``relay.webapp``); if not, a
    plain HTTP request there gets 404 saying so."""

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


class RelayServer(HandshakePort, SecurePort):
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
        self.webapp = WebApp.load(enabled=config.web_app)
        """The browser peer's files, read once (its counts feed the metrics)."""
        self._refusal_log = RefusalLog(log, REFUSAL_LOG_EVERY)
        self.rooms = RoomBook(ttl=config.room_timeout)
        self.relay = Relay(self.rooms, hello_gate=self._hello_gate, guard=self.guard,
                           clock=trio.current_time, refusal_log=self._refusal_log,
                           announce_budget=announce_budget(config.max_outbox))
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
            # accepting, tell handshake peers, let open rooms finish within the grace. A
            # nursery's deadline covers every nursery opened inside it, so the secure tasks
            # (the rooms) must be outside the handshake tasks' short one, not within it.
            async with trio.open_nursery() as secure_tasks:
                async with trio.open_nursery() as handshake_tasks:
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
        self.webapp.enabled = self.config.web_app
        self.relay.announce_budget = announce_budget(self.config.max_outbox)
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
                    await open_websocket(tcp, self.tls, REFUSAL_TIME, refusal=refusal.describe(),
                                         webapp=self.webapp)
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

    def _admit_forwarded(self, admission: Admission, identity: bytes) -> str | None:
        """A trusted proxy named its client: count the connection against that client."""
        refusal = self.guard.charge(admission, host_of(identity))
        if refusal is None:
            return None
        self._refusal_log.refused(refusal, f"a proxied connection from {host_of(identity)}",
                                  trio.current_time())
        return refusal.describe()

    # -- handshake port -------------------------------------------------------------------

    async def _accept_websocket(self, secure_tasks: trio.Nursery, tcp: trio.SocketStream,
                                admission: Admission) -> None:
        arrival = await opened(open_websocket(
            tcp, self.tls, self.config.upgrade_timeout, self.config.trusted_proxies,
            admit=partial(self._admit_forwarded, admission), webapp=self.webapp), tcp)
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

