"""The handshake port's driver: one task reads each connection into the core
(``relay.core``), a writer task empties its outbox, and the core's outputs are carried out.

A peer that does not read cannot stall anyone else: its outgoing bytes wait in a small
outbox, and a peer whose outbox overflows is cut off as too slow (bounded memory instead of
unbounded buffering). A plain receiver's announcements are not queued at once but asked of
the core (``Relay.drained``) each time its outbox has been written, so they go out as fast
as it reads and never overflow it.

``HandshakePort`` is a part of ``relay.server.RelayServer``, which holds the state it uses.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING

import attrs
import trio

from relay.core import ANNOUNCE_BUDGET, Close, Output, Send
from relay.limits import Admission, host_of
from relay.opening import LINGER, opened, text_of
from relay.transports import Endpoint, open_endpoint

if TYPE_CHECKING:
    from relay.server import RelayServer

log = logging.getLogger("relay.server")

RECEIVE_SIZE = 4096
"""Handshake packets are at most 408 bytes: small reads keep every peer's turn short."""
CLOSE_GRACE = 5.0
"""Seconds a closing handshake connection gets to take its last bytes (0e, 0f, 09...)."""


def announce_budget(max_outbox: int) -> int:
    """A plain receiver's batch of announcements: well below the outbox limit, so the
    relay's own announcements never cut off a receiver that reads."""
    return max(256, min(ANNOUNCE_BUDGET, max_outbox // 4))


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
        return f"<handshake connection {text_of(self.identity)}>"


class HandshakePort:
    """The handshake port's part of ``RelayServer``."""

    def _hello_gate(self: RelayServer, conn: _HandshakeConnection) -> str | None:
        refusal = self.guard.hello(conn.host, trio.current_time())
        return None if refusal is None else refusal.describe()

    # -- handshake port -------------------------------------------------------------------

    async def _accept_handshake(self: RelayServer, tcp: trio.SocketStream,
                                admission: Admission) -> None:
        endpoint = await opened(open_endpoint(tcp, self.tls, self.config.upgrade_timeout), tcp)
        if endpoint is not None:
            await self._serve_handshake(endpoint)

    async def _serve_handshake(self: RelayServer, endpoint: Endpoint) -> None:
        identity = endpoint.identity
        if self._stopping:
            endpoint.abort()
            return
        conn = _HandshakeConnection(endpoint, identity, trio.current_time())
        log.info("handshake connection from %s (%s)", text_of(identity), endpoint.transport)
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
            conn.tasks = None  # no writer can start any more: later packets for it are dropped
            if not tasks.cancel_scope.cancelled_caught and not conn.broken:
                await endpoint.goodbye(LINGER, reason=conn.closing or "")
        except Exception:
            log.exception("handshake connection %s failed", text_of(identity))
        finally:
            conn.tasks = None
            self.connections[kind] -= 1
            # Whatever happened, the core must not keep a peer we no longer serve (a no-op
            # when the core closed it itself).
            try:
                self._deliver(self.relay.disconnect(conn))
            except Exception:
                log.exception("forgetting %s failed", text_of(identity))
            endpoint.abort()
            log.info("closed %s: %s", text_of(identity), conn.closing or "dropped")

    async def _read(self: RelayServer, conn: _HandshakeConnection) -> None:
        config = self.config
        conn.reading.deadline = conn.connected_at + min(config.hello_timeout, config.timeout)
        registered = False
        with conn.reading:
            while True:
                try:
                    data = await conn.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                    if str(error):  # a WebSocket says why it ended (a text message...)
                        log.info("%s: %s", text_of(conn.identity), error)
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

    async def _write(self: RelayServer, conn: _HandshakeConnection) -> None:
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

    def _deliver(self: RelayServer, outputs: list[Output]) -> None:
        """Carry out the core's outputs, and those of any peer cut off along the way."""
        queue = collections.deque(outputs)
        while queue:
            output = queue.popleft()
            conn = output.conn
            if isinstance(output, Send):
                if conn.closing is not None or conn.tasks is None:
                    continue  # closing, or its tasks are over (another peer's departure at shutdown)
                if conn.unsent() + len(output.data) > self.config.max_outbox:
                    log.info("cutting off %s: it reads too slowly (%d bytes unsent)",
                             text_of(conn.identity), conn.unsent())
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
