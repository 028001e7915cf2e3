"""Prometheus metrics of a running relay, served over HTTP from the relay's own trio loop.

The values are read from the relay when Prometheus scrapes (a custom collector), not
counted twice: the core counts the handshake packets it forwards, the guard the refusals,
the rooms their bytes as they go. ``prometheus_client`` formats them (``generate_latest``);
the HTTP side is a few lines of trio, so no thread runs beside the relay.

Only ``GET /metrics`` (and ``HEAD``) is served; anything else gets 404 or 405. Requests are
small and bounded in size and time, and a handful of scrapers at once is plenty.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from relay.core import Role
from relay.limits import Refusal

if TYPE_CHECKING:
    from relay.server import RelayServer

log = logging.getLogger("relay.metrics")

PREFIX = "peer_relay"
TRANSPORTS = ("tcp", "tls", "ws", "wss")
PORTS = ("handshake", "secure")
ROLE_NAMES = {Role.SERVER: "sender", Role.CLIENT: "receiver"}
REQUEST_LIMIT = 8192
"""Bytes of request head read at most; a scrape's is a few hundred."""
REQUEST_TIME = 5.0
"""Seconds a scraper has to send its request and take the answer."""
AT_ONCE = 16
"""Metrics connections served at the same time; more are closed at once."""


class RelayCollector:
    """Reads a ``RelayServer`` each time it is collected."""

    def __init__(self, server: RelayServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        core = server.relay
        connections = GaugeMetricFamily(
            f"{PREFIX}_connections", "Connections being served, by port and transport.",
            labels=["port", "transport"])
        for port in PORTS:
            for transport in TRANSPORTS:
                connections.add_metric([port, transport], server.connections[(port, transport)])
        yield connections
        yield GaugeMetricFamily(
            f"{PREFIX}_connections_admitted",
            "Open connections counted by the connection limits (TLS and WebSocket upgrades "
            "in progress included).", value=server.guard.connections)
        peers = GaugeMetricFamily(f"{PREFIX}_peers", "Peers registered on the handshake port, "
                                  "by role.", labels=["role"])
        for role, number in core.peers.items():
            peers.add_metric([ROLE_NAMES[role]], number)
        yield peers
        waiting = GaugeMetricFamily(
            f"{PREFIX}_waiting", "Peers waiting on the handshake port by kind: senders, "
            "receivers scoped to a nameplate (10) and plain receivers (01).", labels=["kind"])
        for kind, number in core.waiting.items():
            waiting.add_metric([kind], number)
        yield waiting
        yield CounterMetricFamily(
            f"{PREFIX}_announcements", "Senders announced to receivers (New_server, 04, sent).",
            value=core.counts.announcements)
        yield GaugeMetricFamily(f"{PREFIX}_uids_in_use", "Handshake UIDs held by live peers "
                                "(at most 65535).", value=core.uids_in_use)
        counts = core.counts
        for name, value, text in (
            ("handshakes_started", counts.started, "Handshakes begun: a receiver's first "
             "message (07) forwarded to a sender."),
            ("handshakes_agreed", counts.agreed, "Handshakes where both sides proved the same "
             "code: a sender's Agreement (08) forwarded."),
            ("handshakes_failed", counts.failed, "Handshakes that failed, most often on a "
             "wrong code: Spoke_failure (0d) forwarded."),
            ("handshakes_declined", counts.refused, "Agreements the receiver declined "
             "(Refused, 0b)."),
            ("handshake_attempts_failed", counts.attempts_failed, "Handshakes begun (07) that "
             "ended without an agreement by the receiver's doing (a wrong code, a Spoke_failure "
             "or Refused before the Agreement, or leaving): what the failed-handshake limits "
             "count; refusals are in refused{limit=\"failed_handshakes_per_...\"}."),
            ("rooms_booked", counts.accepted, "Agreements the receiver accepted (Accepted, "
             "0a): a room is booked for the pair."),
            ("rooms_opened", server.rooms_opened, "Rooms that opened: both peers joined."),
            ("forwarded_bytes", server.bytes_forwarded, "Bytes the secure rooms carried, both "
             "directions, open rooms included."),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", text, value=value)
        yield GaugeMetricFamily(f"{PREFIX}_rooms_open", "Rooms carrying a transfer now.",
                                value=len(server.open_rooms))
        yield GaugeMetricFamily(f"{PREFIX}_rooms_pending", "Booked rooms not yet joined by "
                                "both peers.", value=server.rooms.pending)
        refused = CounterMetricFamily(f"{PREFIX}_refused", "Connections (or Hellos, rooms, "
                                      "handshakes) refused, by the limit that refused them.",
                                      labels=["limit"])
        for limit in Refusal:
            refused.add_metric([limit.value], server.guard.refused[limit])
        yield refused
        web = CounterMetricFamily(f"{PREFIX}_web_requests", "Plain HTTP requests on the "
                                  "WebSocket port (the browser peer's page), by the status of "
                                  "the answer.", labels=["status"])
        for status, number in sorted(server.webapp.requests.items()):
            web.add_metric([str(status)], number)
        yield web
        yield GaugeMetricFamily(f"{PREFIX}_stopping", "1 while the relay shuts down.",
                                value=int(server.stopping))


def registry_for(server: RelayServer) -> CollectorRegistry:
    """A registry of its own (not the library's global one): one per relay, even in tests."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(RelayCollector(server))
    ProcessCollector(registry=registry)  # CPU, memory, descriptors: on Linux only
    return registry


async def serve_metrics(listener: trio.SocketListener, server: RelayServer) -> None:
    """Answer scrapes on ``listener`` until cancelled."""
    registry = registry_for(server)
    active = 0

    async def answer(stream: trio.SocketStream) -> None:
        nonlocal active
        try:
            with trio.move_on_after(REQUEST_TIME):
                await _answer(stream, registry)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("answering a metrics request failed")
        finally:
            active -= 1
            stream.socket.close()

    async with listener:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as error:
                    log.warning("cannot accept a metrics connection: %s", error)
                    await trio.sleep(0.1)
                    continue
                if active >= AT_ONCE:
                    stream.socket.close()
                    continue
                active += 1
                nursery.start_soon(answer, stream)


async def _answer(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    head = bytearray()
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        if len(head) >= REQUEST_LIMIT:
            await _respond(stream, 431, b"request head too large\n")
            return
        data = await stream.receive_some(REQUEST_LIMIT - len(head))
        if not data:
            return
        head += data
    request_line = bytes(head).split(b"\n", 1)[0].strip()
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        await _respond(stream, 400, b"not an HTTP request\n")
        return
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if target != b"/metrics":
        await _respond(stream, 404, b"metrics are at /metrics\n")
    elif method not in (b"GET", b"HEAD"):
        await _respond(stream, 405, b"only GET and HEAD\n", extra=[b"Allow: GET, HEAD"])
    else:
        body = generate_latest(registry)
        await _respond(stream, 200, body, content_type=CONTENT_TYPE_LATEST.encode(),
                       send_body=method == b"GET")


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            431: b"Request Header Fields Too Large"}


async def _respond(stream: trio.SocketStream, status: int, body: bytes, *,
                   content_type: bytes = b"text/plain; charset=utf-8",
                   extra: list[bytes] | None = None, send_body: bool = True) -> None:
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS[status]),
             b"Content-Type: " + content_type,
             b"Content-Length: %d" % len(body),
             b"Connection: close",
             *(extra or [])]
    await stream.send_all(b"\r\n".join(lines) + b"\r\n\r\n" + (body if send_body else b""))
    await stream.send_eof()
    # Read what the client may still send until it closes, so that closing with unread
    # bytes does not reset the connection before it has read the answer.
    with trio.move_on_after(1.0):
        while await stream.receive_some(4096):
            pass
