"""WebSocket as a byte stream, so that the relay's protocols pass where only HTTPS does.

Binary messages carry exactly the bytes of the TCP protocols; message boundaries mean
nothing (a packet may span messages, a message may hold several packets). So a
``WebSocketStream`` is a ``trio.abc.Stream`` like any socket, and the relay's handshake
core, its room pairing and its pipe serve it unchanged; peers use the same class.

wsproto reads and writes the HTTP upgrade; after it, frames are ours (``relay.frames``):
wsproto's decoder copied every byte three or four times and unmasked it at 0.7 GB/s, on
the relay's busiest path. Outgoing binary frames are written as a header and the payload
as separate pieces (masked when we are the client). No extension is ever negotiated, so a
binary frame is nothing more than that. Nothing runs in the background: a reader task
with a message queue (as trio-websocket has) would need a nursery that outlives the peer's
``meet()``, and would hold a message more per connection in the relay.

Memory stays bounded whatever the other side sends: one transport read at a time is
decoded (frames are decoded as they arrive, not assembled), and nothing more is read until
the caller took those bytes. What is not allowed ends the connection with a Close frame
whose code and reason say why: a text message (1003), a message over ``MAX_MESSAGE`` (1009),
a malformed frame (1002, or 1007 for a Close reason that is not UTF-8), frames that carry
no data (pings, pongs, empty messages) faster than ``EMPTY_FRAME_RATE`` (1008).

Answers are never queued per frame: a connection holds at most one pending pong (a later
ping replaces it, as RFC 6455 §5.5.3 allows) and one Close frame. Otherwise a peer that
stops reading, so that our send to it blocks, could make us store one pong per ping.
"""

from __future__ import annotations

import collections
import enum
import http
from typing import NoReturn

import h11
import trio
import wsproto
import wsproto.utilities
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request

from . import frames
from .limits import TokenBucket

MAX_MESSAGE = 1 << 20
"""The largest message accepted. Ours are at most ``SEND_SIZE``; it bounds what a peer can
make us decode before we see the end of a message."""
SEND_SIZE = 256 * 1024
"""The largest message we send: a big write becomes several messages."""
RECEIVE_SIZE = 256 * 1024
"""Transport bytes decoded at a time, the most a connection holds beyond the caller's read."""
UPGRADE_READ = 16 * 1024
"""Transport bytes read at a time while an upgrade request is incomplete."""
MAX_REJECT_BODY = 1024
"""How much of a refusal's HTTP body a client reads, to quote it."""
CLOSE_WAIT = 2.0
"""Seconds ``aclose`` waits for the other side to answer our Close frame."""
EMPTY_FRAME_BURST = 64
"""Frames without data (pings, pongs, empty data frames) a peer may send at once."""
EMPTY_FRAME_RATE = 8.0
"""Such frames a peer may send per second, sustained; beyond, the connection is closed.
Each costs a decode and a ping a pong, and none moves a byte: nobody honest needs more."""

NORMAL_CLOSURE = 1000
_CLEAN_CODES = frozenset({NORMAL_CLOSURE, 1001, frames.NO_STATUS})
"""Close codes read as a plain end of stream (a clean end, going away, no code)."""


class WebSocketError(Exception):
    """The upgrade failed (refused, malformed, not a WebSocket server); the message says why."""


class _State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    """We sent our Close frame and wait for theirs."""
    CLOSED = "closed"
    """Both Close frames were sent, or the transport ended."""


class WebSocketStream(trio.abc.Stream):
    """An open WebSocket connection read and written as a stream of bytes.

    ``client`` is our side of it (a client masks what it sends and reads unmasked frames);
    ``early`` are bytes the upgrade read beyond its own end, the first frames.
    ``closed_by`` says, once the connection ended, who ended it and why (for logs).
    One task may send while another receives, as with any trio stream.
    """

    def __init__(self, transport: trio.abc.Stream, *, client: bool, early: bytes = b"") -> None:
        self.transport = transport
        self.client = client
        self._reader = frames.FrameReader(masked=not client, max_message=MAX_MESSAGE)
        self._early = early
        self._state = _State.OPEN
        self._ready: collections.deque[bytes | bytearray] = collections.deque()
        """Decoded payload not yet handed to the caller, as the reader gave it (no copies)."""
        self._ended: str | None = None
        """Set when no more payload will come: ``""`` for a clean end, else the reason."""
        self._pong: bytes | None = None
        """The payload of the last ping not answered yet (a send held the transport)."""
        self._close: bytes | None = None
        """Our Close frame, until it is written."""
        self._empty: TokenBucket | None = None
        """What the peer may still send of frames without data (made on the first one)."""
        self._empty_seen = 0
        self._sending = trio.StrictFIFOLock()
        self.closed_by: str | None = None

    @property
    def empty_bytes(self) -> int:
        """Wire bytes of the frames received that carried no data (control frames among
        them): a room's rate limit counts them with the data (``relay.transports``)."""
        return self._reader.empty_bytes

    # -- receiving ------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._ready:
            # Every call yields, as trio's streams promise: payload already decoded would
            # otherwise let one reader of tiny packets hold the whole relay for a long read.
            await trio.lowlevel.checkpoint()
        while not self._ready:
            if self._ended is not None:
                await trio.lowlevel.checkpoint()
                if self._ended:
                    raise trio.BrokenResourceError(self._ended)
                return b""
            await self._decode_more()
        chunk = self._ready[0]
        if max_bytes is None or len(chunk) <= max_bytes:
            return self._ready.popleft()
        self._ready[0] = chunk[max_bytes:]
        return chunk[:max_bytes]

    async def _decode_more(self) -> None:
        if self._early:
            data, self._early = self._early, b""
        else:
            try:
                data = await self.transport.receive_some(RECEIVE_SIZE)
            except trio.BrokenResourceError as error:
                self._end(f"connection lost: {_why(error)}", "the connection broke")
                self._state = _State.CLOSED
                return
        if not data:
            # A TCP close without a Close frame (1006): how TCP peers end, and our peers end
            # so too (their channel's end marker came before).
            self._end("", "closed by the other side (no Close frame)")
            self._state = _State.CLOSED
            return
        # Decode everything first, without waiting: if the caller is cancelled afterwards
        # (a room's waiting half is, when its partner comes), no decoded byte is lost.
        self._reader.feed(data)
        try:
            for event in self._reader.events():
                if isinstance(event, frames.Payload):
                    if event.data:
                        self._ready.append(event.data)
                elif isinstance(event, frames.Ping):
                    if self._state is _State.OPEN:
                        self._pong = event.payload
                elif isinstance(event, frames.Close):
                    self._closed_by_peer(event)
                elif isinstance(event, frames.TextMessage):
                    self._refuse(frames.UNSUPPORTED_DATA, "only binary messages are accepted")
        except frames.FrameError as error:
            self._refuse(error.code, error.reason)
        self._count_empty_frames()
        await self._send_control()

    def _count_empty_frames(self) -> None:
        """Close a connection that sends frames without data faster than it may."""
        seen = self._reader.empty_frames
        new, self._empty_seen = seen - self._empty_seen, seen
        if not new:
            return
        now = trio.current_time()
        if self._empty is None:
            self._empty = TokenBucket.full(EMPTY_FRAME_RATE, EMPTY_FRAME_BURST, now)
        if not self._empty.take(now, new) and self._state is _State.OPEN:
            self._refuse(frames.POLICY_VIOLATION,
                         f"too many control or empty frames (over {EMPTY_FRAME_RATE:g} a second)")

    def _closed_by_peer(self, event: frames.Close) -> None:
        if self._state is _State.OPEN:
            code = None if event.code == frames.NO_STATUS else event.code
            self._close = frames.close_frame(code, event.reason, self.client)
        self._state = _State.CLOSED
        if event.code in _CLEAN_CODES:
            self._end("", f"closed by the other side ({event.code})")
        else:
            reason = f"{event.code} {event.reason}" if event.reason else str(event.code)
            self._end(f"the other side closed the WebSocket: {reason}",
                      f"closed by the other side: {reason}")

    def _refuse(self, code: int, reason: str) -> None:
        """End the connection because of what the other side sent, telling it why."""
        self._end(f"WebSocket closed: {reason}", f"closed by us ({code}): {reason}")
        self._say_close(code, reason)

    def _say_close(self, code: int, reason: str) -> None:
        """Queue our Close frame, unless one was sent or the connection ended."""
        if self._state is _State.OPEN:
            self._close = frames.close_frame(code, reason, self.client)
            self._state = _State.CLOSING

    def _end(self, error: str, closed_by: str) -> None:
        if self._ended is None:
            self._ended = error
            self.closed_by = closed_by

    # -- sending --------------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._state is not _State.OPEN:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError(self._ended or "the WebSocket is closed")
        view = memoryview(data).cast("B")
        async with self._sending:
            for start in range(0, len(view), SEND_SIZE):
                if self._state is not _State.OPEN:  # closed meanwhile by the receiver
                    raise trio.BrokenResourceError(self._ended or "the WebSocket is closed")
                await self._transmit_pieces(frames.binary_frame(view[start:start + SEND_SIZE], self.client))
            if self._pong is not None or self._close is not None:
                await self._transmit_pieces([])  # what a ping or a refusal left while we sent

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    def _take_control(self) -> list[bytes]:
        """The pending pong and Close frames, to write now (a pong never follows a Close)."""
        pending = []
        if self._pong is not None:
            if self._close is None and self._state is _State.OPEN:
                pending.append(frames.pong_frame(self._pong, self.client))
            self._pong = None
        if self._close is not None:
            pending.append(self._close)
            self._close = None
        return pending

    async def _send_control(self) -> None:
        """Send the pending pong or Close now, unless a running send_all holds the
        transport: it sends them before its next frame, so a receive never waits for a send.
        (Meanwhile a later ping replaces the pending pong: nothing piles up.)"""
        if (self._pong is None and self._close is None) or self._sending.locked():
            return
        async with self._sending:
            try:
                await self._transmit_pieces([])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the end of the stream says the rest

    async def _transmit_pieces(self, pieces: list[bytes | bytearray | memoryview]) -> None:
        """Pending control frames, then ``pieces``: one gathered write over a plain socket
        (no join); the caller holds ``_sending``."""
        control = self._take_control()
        if control:
            pieces = [*control, *pieces]
        if not pieces:
            return
        sock = getattr(self.transport, "socket", None)
        if sock is None or not hasattr(sock, "sendmsg"):
            await self.transport.send_all(b"".join(pieces))
            return
        pieces = list(pieces)
        while pieces:
            try:
                sent = await sock.sendmsg(pieces)
            except OSError as error:  # what SocketStream.send_all would have raised
                raise trio.BrokenResourceError(error) from error
            while pieces and sent >= len(pieces[0]):
                sent -= len(pieces[0])
                pieces.pop(0)
            if sent:
                pieces[0] = memoryview(pieces[0])[sent:]

    # -- closing --------------------------------------------------------------------------

    async def close_gracefully(self, code: int = NORMAL_CLOSURE, reason: str = "",
                               *, wait: float = CLOSE_WAIT) -> None:
        """Send a Close frame, read (and drop) until the other side answers or ``wait`` passes,
        then close the transport; so that nothing we sent is lost to a reset."""
        try:
            with trio.move_on_after(wait):
                async with self._sending:  # also sends a queued answer to their Close
                    if self._state is _State.OPEN:
                        self._end("the WebSocket is closed", f"closed by us ({code}) {reason}".rstrip())
                        self._say_close(code, reason)
                    await self._transmit_pieces([])
                while self._state is not _State.CLOSED:
                    data = await self.transport.receive_some(RECEIVE_SIZE)
                    if not data:
                        break
                    self._reader.feed(data)
                    try:
                        if any(isinstance(event, frames.Close) for event in self._reader.events()):
                            self._state = _State.CLOSED
                    except frames.FrameError:
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(self.transport)

    async def aclose(self) -> None:
        """Say Close if we still can, without waiting for the answer, and close the transport."""
        try:
            if not self._sending.locked():  # never wait behind a send: this is a close
                with trio.move_on_after(CLOSE_WAIT):
                    async with self._sending:
                        if self._state is _State.OPEN:
                            self._end("the WebSocket is closed", "closed by us (1000)")
                            self._say_close(NORMAL_CLOSURE, "")
                        await self._transmit_pieces([])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(self.transport)


# -- opening: the HTTP upgrade ----------------------------------------------------------------


class _Head:
    """What both kinds of request on the WebSocket port share: a path and headers."""

    path: str
    headers: list[tuple[bytes, bytes]]
    """Request headers, names in lower case."""

    def header(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (lower case), in order."""
        return [value for key, value in self.headers if key == name]


class UpgradeRequest(_Head):
    """A server-side connection whose upgrade request was read: accept or refuse it."""

    def __init__(self, transport: trio.abc.Stream, connection: wsproto.WSConnection,
                 request: Request, early: bytes) -> None:
        self.transport = transport
        self._ws = connection
        self._early = early
        self.path = request.target.split("?", 1)[0]
        self.host = request.host
        self.headers = list(request.extra_headers)
        """Other request headers, names in lower case."""

    async def accept(self) -> WebSocketStream:
        await self.transport.send_all(self._ws.send(AcceptConnection()))
        return WebSocketStream(self.transport, client=False, early=self._early)

    async def refuse(self, status: int, reason: str) -> None:
        """Answer with an HTTP error whose body is ``reason``; the caller closes the transport."""
        await self.transport.send_all(http_error(status, reason))


class PageRequest(_Head):
    """A plain HTTP request (no WebSocket upgrade asked for): someone wants a page.

    The caller answers it (``relay.webapp``), then either closes the connection or, when
    ``keep_alive``, reads the next request on it: a browser loading the page's thirty-odd
    files then needs a few connections (and TLS handshakes), not one per file.
    """

    def __init__(self, request: h11.Request, early: bytes = b"") -> None:
        self.method = request.method.decode("ascii")
        self.target = request.target.decode("ascii")
        self.path = self.target.split("?", 1)[0]
        self.headers = [(bytes(key), bytes(value)) for key, value in request.headers]
        tokens = {t.strip() for value in self.header(b"connection") for t in value.lower().split(b",")}
        # HTTP/1.1 keeps a connection unless told otherwise. A body (which we never read)
        # or bytes already sent after the head (a pipelined request) end it, to stay simple.
        body = self.header(b"transfer-encoding") or any(v.strip() != b"0" for v in self.header(b"content-length"))
        self.keep_alive = (request.http_version == b"1.1" and b"close" not in tokens
                           and not body and not early)


async def read_upgrade_request(transport: trio.abc.Stream) -> UpgradeRequest:
    """Read a client's upgrade request (the caller bounds the time).

    Anything but a valid WebSocket upgrade is answered with an HTTP error saying what is
    wrong, then raises ``WebSocketError``. h11 caps the request head at 16 KiB.
    """
    request = await read_request(transport, pages=False)
    assert isinstance(request, UpgradeRequest)
    return request


async def read_request(transport: trio.abc.Stream, *, pages: bool = True,
                       again: bool = False) -> UpgradeRequest | PageRequest | None:
    """Read a client's request: a WebSocket upgrade, or (with ``pages``) a plain request.

    A request is a page request when it has no ``Upgrade: websocket`` header; it is left
    for the caller to answer. An upgrade goes on to wsproto's checks. What is not valid
    HTTP, or not a valid upgrade, is answered with an HTTP error saying what is wrong,
    then raises ``WebSocketError``. h11 caps the request head at 16 KiB. ``again``: a
    later request on a kept-alive connection, where a close before its first byte is the
    client's normal goodbye: None then.
    """
    parser = h11.Connection(h11.SERVER)
    head_end = _HeadEnd()
    head = bytearray()
    while True:
        # Small reads: the HTTP parser refuses a head that grows past 16 KiB unfinished,
        # but would take a huge one that arrived whole in one large read.
        data = await transport.receive_some(UPGRADE_READ)
        if not data:
            if again and not head:
                return None
            raise WebSocketError("closed before sending an upgrade request")
        part, early = head_end.split(data)
        head += part
        try:
            parser.receive_data(part)
            event = parser.next_event()
        except h11.RemoteProtocolError as error:
            await _refuse_request(transport, 400, str(error))
        if isinstance(event, h11.Request):
            break
    if pages and not _asks_websocket(event):
        return PageRequest(event, early)
    connection = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    try:
        connection.receive_data(bytes(head))
        for ws_event in connection.events():
            if isinstance(ws_event, Request):
                return UpgradeRequest(transport, connection, ws_event, early)
    except (wsproto.utilities.RemoteProtocolError, ValueError) as error:
        # ValueError: wsproto decodes some header values without checking them first
        # (a non-ASCII byte raises UnicodeDecodeError); that is a bad request too.
        hint = getattr(error, "event_hint", None)
        status = hint.status_code if isinstance(hint, RejectConnection) else 400
        what = error if isinstance(error, wsproto.utilities.RemoteProtocolError) else "bad header value"
        await _refuse_request(transport, status, str(what))
    # The head was whole (h11 said so): wsproto read the same bytes and must have decided.
    raise WebSocketError("not a WebSocket upgrade request")  # pragma: no cover


def _asks_websocket(request: h11.Request) -> bool:
    """Whether the request asks to be upgraded to a WebSocket (other upgrades, such as
    ``h2c``, may be ignored: the request is then answered as a plain one)."""
    return any(name == b"upgrade" and b"websocket" in (t.strip() for t in value.lower().split(b","))
               for name, value in request.headers)


async def _refuse_request(transport: trio.abc.Stream, status: int, what: str) -> NoReturn:
    reason = f"not a WebSocket upgrade request: {what}"
    try:
        await transport.send_all(http_error(status, reason, upgrade=status == 426))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    raise WebSocketError(reason) from None


def http_error(status: int, reason: str, *, upgrade: bool = False) -> bytes:
    """A complete HTTP/1.1 error response with ``reason`` as its plain-text body."""
    body = reason.encode("utf-8", "replace") + b"\n"
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    head = [
        f"HTTP/1.1 {status} {phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if upgrade:
        head += ["Upgrade: websocket", "Sec-WebSocket-Version: 13"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


async def connect(transport: trio.abc.Stream, *, host: str, path: str) -> WebSocketStream:
    """Upgrade ``transport`` (TCP or TLS, already connected) as a client; the caller bounds
    the time. ``host`` is the Host header (``name`` or ``name:port``)."""
    connection = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await transport.send_all(connection.send(Request(host=host, target=path)))
    refused: int | None = None
    body = bytearray()
    head_end = _HeadEnd()
    while True:
        data = await transport.receive_some(RECEIVE_SIZE)
        if not data and refused is None:
            raise WebSocketError("the server closed the connection instead of upgrading it "
                                 "(is this a WebSocket address?)")
        head, early = head_end.split(data)
        try:
            connection.receive_data(head or None)
            if early:  # a refusal's body: HTTP too; a 101's frames are left for the stream
                events = list(connection.events())
                if not any(isinstance(event, AcceptConnection) for event in events):
                    connection.receive_data(early)
                    events += connection.events()
            else:
                events = connection.events()
            for event in events:
                if isinstance(event, AcceptConnection):
                    return WebSocketStream(transport, client=True, early=early)
                if isinstance(event, RejectConnection):
                    refused = event.status_code
                    if not event.has_body:
                        raise WebSocketError(_refusal(refused, body))
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished or len(body) >= MAX_REJECT_BODY:
                        raise WebSocketError(_refusal(refused or 0, body))
        except wsproto.utilities.RemoteProtocolError as error:
            raise WebSocketError(f"not a WebSocket server: {error}") from None
        if not data:
            raise WebSocketError(_refusal(refused or 0, body))


class _HeadEnd:
    """Where an HTTP head ends in what was read: the HTTP parser gets the head, and the
    bytes after it (the first frames, if the other side did not wait) stay ours to read."""

    def __init__(self) -> None:
        self._tail = b""
        self._found = False

    def split(self, data: bytes) -> tuple[bytes, bytes]:
        """``data`` as (what belongs to the head, what comes after its end)."""
        if self._found:
            return data, b""
        window = self._tail + data
        at = window.find(b"\r\n\r\n")
        if at < 0:
            self._tail = window[-3:]
            return data, b""
        self._found = True
        cut = at + 4 - len(self._tail)
        return data[:cut], data[cut:]


def _refusal(status: int, body: bytes | bytearray) -> str:
    text = bytes(body[:MAX_REJECT_BODY]).decode("utf-8", "replace").strip().splitlines()
    detail = f": {text[0]}" if text else ""
    return f"the server refused the WebSocket upgrade ({status}){detail}"


def _why(error: BaseException) -> str:
    cause = error.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(error) or type(error).__name__
