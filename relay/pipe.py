"""The secure room's blind two-way pipe (docs/protocol.md §6): same bytes out as in, then a marker.

Moving the payload is the relay's main cost, so on Linux the bytes never enter Python: each
direction splices socket -> kernel pipe -> socket (``os.splice``) and Python only decides
when to wait. Elsewhere one reused buffer per direction carries them. Either way a direction
holds at most one carrier's worth of bytes and reads more only when that has room, so a slow
reader slows its writer down through TCP instead of growing a buffer here.

When either side ends (EOF or an error) both directions stop reading, deliver what they
already hold, write the close marker ``ff ff ff ff`` to their destination (as bob's relay
does; the record layer reads it as "close"), and both sockets are closed, gently (see
``MARKER_LINGER``). A running pipe has no idle timeout, like bob's; but a side that takes nothing
of what is waiting for it for ``STALL_TIMEOUT`` ends the room (it does not read, and
holding its partner and both buffers for it would be an easy way to pin the relay).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import Protocol, Union

import attrs
import trio

from relay.limits import RoomMeter

try:
    import fcntl
except ImportError:  # not POSIX: no kernel pipes to size, and no splice either
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("relay.pipe")

CLOSE_MARKER = b"\xff\xff\xff\xff"
PIPE_SIZE = 1 << 20
"""Kernel pipe size asked for each direction: more bytes per wake-up, less CPU per GiB."""
BUFFER_SIZE = 256 * 1024
"""The fallback's user-space buffer per direction."""
YIELD_EVERY = 8 << 20
"""Bytes a direction may move without waiting before it lets other tasks run (fairness)."""
MARKER_LINGER = 2.0
"""Seconds to keep discarding what a peer still sends after its marker, before closing.

Closing a socket with unread input makes the kernel send a reset, and a reset can destroy
the marker in the peer's receive queue before it reads it; so the relay says FIN after the
marker and reads until the peer's EOF, for a short bounded while (a "lingering close").
"""
STALL_TIMEOUT = 120.0
"""Seconds a side may take nothing of the bytes waiting for it before the room is ended.
Generous: a receiver busy with its disk or a user at a prompt reads again long before."""

STALLED = "stalled: it stopped reading"
"""The reason a pipe ends when a side would not read (see ``STALL_TIMEOUT``)."""

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_SPLICE_UNSUPPORTED = frozenset(
    code for code in (errno.EINVAL, errno.ENOSYS, getattr(errno, "EOPNOTSUPP", None)) if code
)
"""What splice says when a kernel or sandbox cannot splice these descriptors at all."""

SocketLike = Union[trio.SocketStream, trio.socket.SocketType]


@attrs.frozen
class PipeStats:
    """What one room carried, for logs and metrics (never the bytes themselves)."""

    a_to_b: int
    b_to_a: int
    ended_by: str
    """``"a"`` or ``"b"``: the side whose end stopped the pipe (empty if cancelled from outside)."""
    reason: str
    """Why it ended: ``"EOF"``, an error name, or ``"cancelled"``."""
    spliced: bool
    """Whether the kernel splice path carried the bytes."""


_splice_usable = hasattr(os, "splice") and hasattr(os, "pipe2") and _SPLICE_FLAGS != 0
"""Cleared for the rest of the process the first time the kernel refuses to splice."""


def splice_available() -> bool:
    """Whether pipes will try the kernel splice path (Linux, until the kernel refuses)."""
    return _splice_usable


def _trio_socket(end: SocketLike) -> trio.socket.SocketType:
    return end.socket if isinstance(end, trio.SocketStream) else end


class _Endpoint:
    """One socket of the room: trio's object (to wait on and close) and a raw twin for sync calls.

    The twin shares the descriptor, so it is detached, never closed, or it would close the
    socket behind trio's back.
    """

    def __init__(self, end: SocketLike, name: str) -> None:
        self.name = name
        self.trio_socket = _trio_socket(end)
        self.fd = self.trio_socket.fileno()
        self.raw = socket.socket(fileno=self.fd)
        self.raw.setblocking(False)

    def release(self) -> None:
        self.raw.detach()
        self.trio_socket.close()


class _Carrier(Protocol):
    """Holds bytes read from the source until the destination takes them."""

    pending: int

    def room(self) -> bool: ...

    def fill(self, src: _Endpoint, limit: int | None = None) -> int: ...

    def drain(self, dst: _Endpoint) -> int: ...

    def close(self) -> None: ...


class _SpliceCarrier:
    """A kernel pipe between the two sockets: the bytes never reach user space."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.capacity = _grow_pipe(self._write_fd, PIPE_SIZE)
        self.pending = 0
        self.moved_any = False

    def room(self) -> bool:
        return self.pending < self.capacity

    def fill(self, src: _Endpoint, limit: int | None = None) -> int:
        # The kernel may stop short of the count when the pipe's page slots run out; it then
        # says EAGAIN and the caller drains before reading again.
        wanted = self.capacity - self.pending
        if limit is not None:
            wanted = min(wanted, limit)
        moved = os.splice(src.fd, self._write_fd, wanted, flags=_SPLICE_FLAGS)
        self.pending += moved
        self.moved_any = True
        return moved

    def drain(self, dst: _Endpoint) -> int:
        moved = os.splice(self._read_fd, dst.fd, self.pending, flags=_SPLICE_FLAGS)
        self.pending -= moved
        return moved

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


class _BufferCarrier:
    """The portable fallback: one buffer, written out before it is refilled from the start."""

    def __init__(self, size: int = BUFFER_SIZE) -> None:
        self._view = memoryview(bytearray(size))
        self._start = 0
        self._end = 0
        self.pending = 0

    def room(self) -> bool:
        return self._end < len(self._view)

    def fill(self, src: _Endpoint, limit: int | None = None) -> int:
        end = len(self._view) if limit is None else min(len(self._view), self._end + limit)
        got = src.raw.recv_into(self._view[self._end:end])
        self._end += got
        self.pending += got
        return got

    def drain(self, dst: _Endpoint) -> int:
        sent = dst.raw.send(self._view[self._start:self._end])
        self._start += sent
        self.pending -= sent
        if self._start == self._end:
            self._start = self._end = 0
        return sent

    def close(self) -> None:
        self._view.release()


def _grow_pipe(fd: int, size: int) -> int:
    """Ask for a bigger pipe (unprivileged users are capped by fs.pipe-max-size); say its size."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    get_size = getattr(fcntl, "F_GETPIPE_SZ", None)
    if set_size is None or get_size is None:
        return 64 * 1024  # Linux's default
    try:
        fcntl.fcntl(fd, set_size, size)
    except OSError:
        pass  # keep the default size: slower, still correct
    return fcntl.fcntl(fd, get_size)


def _new_carrier() -> _Carrier:
    global _splice_usable
    if _splice_usable:
        try:
            return _SpliceCarrier()
        except OSError as error:
            _splice_usable = False
            log.warning("kernel pipes unavailable (%s); copying through user space", error)
    return _BufferCarrier()


@attrs.define(eq=False)
class _Direction:
    src: _Endpoint
    dst: _Endpoint
    carrier: _Carrier
    meter: RoomMeter | None = None
    """Shared by both directions: bytes delivered (for live metrics) and the rate limit."""
    stall: float = STALL_TIMEOUT
    reading: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    delivered: int = 0
    src_ended: bool = False
    """The source said EOF or failed: nothing more will come from it."""
    dst_broken: bool = False
    marker_sent: int = 0

    def fall_back(self) -> None:
        """The kernel refused to splice before any byte moved: copy in user space instead."""
        global _splice_usable
        if _splice_usable:
            _splice_usable = False
            log.warning("splice refused by the kernel; copying through user space from now on")
        self.carrier.close()
        self.carrier = _BufferCarrier()


@attrs.define(eq=False)
class _Ending:
    """The first side to end; the other direction is then told to stop reading."""

    side: str = ""
    reason: str = "cancelled"


async def blind_pipe(a: SocketLike, b: SocketLike, *, meter: RoomMeter | None = None,
                     stall: float = STALL_TIMEOUT) -> PipeStats:
    """Copy ``a`` <-> ``b`` until either ends, then mark the end on both and close both.

    ``meter`` counts the bytes as they go and may limit the room's rate (``relay.limits``).
    A side that takes none of the bytes waiting for it for ``stall`` seconds ends the pipe.

    Takes ownership of both sockets: they are closed when this returns, whatever happens.
    Never raises; if cancelled from outside it still writes the marker where it can without
    waiting, closes both, and lets the cancellation through.
    """
    try:
        end_a = _Endpoint(a, "a")
        try:
            end_b = _Endpoint(b, "b")
        except BaseException:
            end_a.release()
            raise
    except OSError as error:
        log.warning("cannot set up a pipe: %s", error)
        for end in (a, b):
            _trio_socket(end).close()
        return PipeStats(0, 0, "", type(error).__name__, False)
    directions: list[_Direction] = []
    try:
        a_to_b = _Direction(end_a, end_b, _new_carrier(), meter, stall)
        directions.append(a_to_b)
        b_to_a = _Direction(end_b, end_a, _new_carrier(), meter, stall)
        directions.append(b_to_a)
        ending = _Ending()
        finished = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_run, a_to_b, b_to_a, ending)
                nursery.start_soon(_run, b_to_a, a_to_b, ending)
            with trio.move_on_after(MARKER_LINGER):
                async with trio.open_nursery() as nursery:
                    for direction in directions:
                        if not direction.src_ended:
                            nursery.start_soon(_linger, direction.src)
            finished = True
        finally:
            if not finished:
                for direction in directions:
                    _mark_end_now(direction)
        spliced = all(isinstance(d.carrier, _SpliceCarrier) for d in directions)
        return PipeStats(a_to_b.delivered, b_to_a.delivered, ending.side, ending.reason, spliced)
    finally:
        for direction in directions:
            direction.carrier.close()
        end_a.release()
        end_b.release()


async def _run(this: _Direction, other: _Direction, ending: _Ending) -> None:
    try:
        with this.reading:
            side, reason = await _copy(this)
            if not ending.side:
                ending.side, ending.reason = side, reason
        other.reading.cancel()
        if not this.dst_broken:
            await _flush(this)
        if not this.dst_broken:
            await _send_marker(this)
        if not this.dst_broken:
            _say_fin(this.dst)
    except Exception as error:  # a bug here must not take the relay down: log it, end the room
        log.exception("pipe direction %s->%s failed: %s", this.src.name, this.dst.name, error)
        other.reading.cancel()


async def _copy(direction: _Direction) -> tuple[str, str]:
    """Carry bytes until the source ends or either socket fails; say which side and why."""
    src, dst, meter = direction.src, direction.dst, direction.meter
    since_yield = 0
    while True:
        carrier = direction.carrier
        progressed = False
        budget = None if meter is None else meter.allowance(trio.current_time())
        if carrier.room() and budget != 0:
            try:
                got = carrier.fill(src, budget)
            except BlockingIOError:
                pass
            except OSError as error:
                if _refused_splice(carrier, error):
                    direction.fall_back()
                    continue
                direction.src_ended = True
                return src.name, type(error).__name__
            else:
                if got == 0:
                    direction.src_ended = True
                    return src.name, "EOF"
                if meter is not None:
                    meter.spend(got)
                progressed = True
        if carrier.pending:
            try:
                sent = carrier.drain(dst)
            except BlockingIOError:
                pass
            except OSError as error:
                direction.dst_broken = True
                return dst.name, type(error).__name__
            else:
                direction.delivered += sent
                if meter is not None:
                    meter.delivered += sent
                since_yield += sent
                progressed = True
        if progressed:
            if since_yield >= YIELD_EVERY:
                since_yield = 0
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
        elif carrier.pending:
            # Bytes held and the destination full: it is the bottleneck, so wait for it rather
            # than for more input. This is where backpressure happens.
            since_yield = 0
            if not await _wait_writable(direction):
                return dst.name, STALLED
        elif budget == 0:
            since_yield = 0  # the room's rate limit: nothing may be read before then
            await trio.sleep(meter.wait(trio.current_time()))
        else:
            since_yield = 0
            await trio.lowlevel.wait_readable(src.fd)


def _refused_splice(carrier: _Carrier, error: OSError) -> bool:
    return (
        isinstance(carrier, _SpliceCarrier)
        and not carrier.moved_any
        and error.errno in _SPLICE_UNSUPPORTED
    )


async def _flush(direction: _Direction) -> None:
    """Deliver what the carrier already holds; stop at the first write error."""
    carrier, dst = direction.carrier, direction.dst
    while carrier.pending:
        try:
            sent = carrier.drain(dst)
            direction.delivered += sent
            if direction.meter is not None:
                direction.meter.delivered += sent
        except BlockingIOError:
            if not await _wait_writable(direction):
                return
        except OSError:
            direction.dst_broken = True
            return


async def _wait_writable(direction: _Direction) -> bool:
    """Wait until the destination takes bytes again; False (and it counts as broken) when
    it took nothing for ``stall`` seconds."""
    with trio.move_on_after(direction.stall):
        await trio.lowlevel.wait_writable(direction.dst.fd)
        return True
    direction.dst_broken = True
    return False


async def _send_marker(direction: _Direction) -> None:
    dst = direction.dst
    while direction.marker_sent < len(CLOSE_MARKER):
        try:
            direction.marker_sent += dst.raw.send(CLOSE_MARKER[direction.marker_sent:])
        except BlockingIOError:
            if not await _wait_writable(direction):
                return
        except OSError:
            direction.dst_broken = True
            return


def _say_fin(end: _Endpoint) -> None:
    """Nothing follows the marker: tell the peer now, even if the socket lingers open."""
    try:
        end.raw.shutdown(socket.SHUT_WR)
    except OSError:
        pass


async def _linger(end: _Endpoint) -> None:
    """Discard input until the peer's EOF (the caller bounds the time)."""
    scratch = bytearray(64 * 1024)
    while True:
        try:
            if not end.raw.recv_into(scratch):
                return
        except BlockingIOError:
            await trio.lowlevel.wait_readable(end.fd)
        except OSError:
            return


def _mark_end_now(direction: _Direction) -> None:
    """Best effort, without waiting, for a pipe torn down from outside; errors ignored."""
    if direction.dst_broken or direction.marker_sent == len(CLOSE_MARKER):
        return
    try:
        direction.marker_sent += direction.dst.raw.send(CLOSE_MARKER[direction.marker_sent:])
    except OSError:
        pass
