"""The encrypted channel over the secure room: records.Sealer/Opener driven on a trio stream."""

from __future__ import annotations

import trio

from . import records
from .errors import TransferFailed

RECEIVE_SIZE = 1024 * 1024
_IOV_MAX = 512  # well under every system's limit on buffers per sendmsg


LOST = "the connection through the relay was lost"
"""What a broken connection means to the user: the relay, the network or the peer may have
gone, and from here nobody can tell which, so neither side blames the other."""


class ChannelClosed(Exception):
    """The room ended cleanly: the peer's close marker (``by_peer``), or an end of stream at a
    record boundary, which bob's peers use too but which the relay going away also gives."""

    def __init__(self, message: str, *, by_peer: bool = True) -> None:
        super().__init__(message)
        self.by_peer = by_peer


class ChannelBroken(Exception):
    """The room failed: corrupted or truncated records, or the connection broke."""


def lost(error: ChannelClosed | ChannelBroken, peer: str = "the other side",
         doing: str = "before the transfer finished") -> TransferFailed:
    """What a channel that ended too early means to the user, in one line: the peer is
    blamed only when it said goodbye (the close marker); otherwise the connection is."""
    if isinstance(error, ChannelClosed) and error.by_peer:
        return TransferFailed(f"{peer} went away {doing}")
    if isinstance(error, ChannelClosed):
        return TransferFailed(LOST)
    return TransferFailed(str(error))


class Channel:
    """One secure room, both directions; we seal with our key and open with theirs.

    Sends are gathered: several sealed records go out in one ``send_all`` once ``flush`` is
    called or the batch reaches ``batch_size``, which saves one system call per record on
    fast transfers without holding more than one batch in memory.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        send_key: bytes,
        receive_key: bytes,
        send_cipher: int = records.CIPHER_AES256_GCM,
        receive_cipher: int = records.CIPHER_AES256_GCM,
        batch_size: int = 1024 * 1024,
    ) -> None:
        self.stream = stream
        self._sealer = records.Sealer(send_key, send_cipher)
        self._opener = records.Opener(receive_key, receive_cipher)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._batch_size = batch_size
        self.bytes_sent = 0
        self.bytes_received = 0
        self._held: bytes | None = None

    @property
    def big_records(self) -> bool:
        """Whether records over 0x7fff bytes may be sealed and opened (both our peers agreed
        in the data phase: see transfer.BIG_RECORDS); never with bob."""
        return self._sealer.big

    @big_records.setter
    def big_records(self, allowed: bool) -> None:
        self._sealer.big = self._opener.big = allowed

    async def send(self, plaintext: bytes | memoryview) -> None:
        """Queue one record; it is written once the batch is full or on ``flush``."""
        header, sealed = self._sealer.seal_parts(plaintext)
        self._pending += (header, sealed)
        self._pending_size += len(header) + len(sealed)
        if self._pending_size >= self._batch_size:
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, size = self._pending, self._pending_size
        self._pending, self._pending_size = [], 0
        try:
            await self._write(pending)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise ChannelBroken(f"{LOST} ({_why(error)})") from None
        self.bytes_sent += size

    async def _write(self, pieces: list[bytes]) -> None:
        sock = getattr(self.stream, "socket", None)
        if sock is None or not hasattr(sock, "sendmsg"):
            await self.stream.send_all(b"".join(pieces))
            return
        # A gathered write (sendmsg) hands the kernel every record without joining them
        # into one more copy first.
        while pieces:
            sent = await sock.sendmsg(pieces[:_IOV_MAX])
            while pieces and sent >= len(pieces[0]):
                sent -= len(pieces[0])
                pieces.pop(0)
            if sent:
                pieces[0] = memoryview(pieces[0])[sent:]

    async def receive(self) -> bytes:
        """The next plaintext record; ChannelClosed at the end, ChannelBroken on corruption."""
        if self._held is not None:
            record, self._held = self._held, None
            return record
        while True:
            try:
                record = self._opener.next_record()
            except records.RecordError as error:
                raise ChannelBroken(f"the encrypted stream is corrupted: {error}") from None
            if record is records.CLOSED:
                raise ChannelClosed("the other side closed the connection")
            if record is not None:
                return record
            try:
                count = await self._receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                raise ChannelBroken(f"{LOST} ({_why(error)})") from None
            if not count:
                try:
                    self._opener.eof()
                except records.RecordError as error:
                    raise ChannelBroken(f"{LOST} in the middle of a record ({error})") from None
                raise ChannelClosed(LOST, by_peer=False)
            self.bytes_received += count

    def hold(self, record: bytes) -> None:
        """Give back a record taken early (while a prompt watched the room): the next
        ``receive`` returns it."""
        assert self._held is None
        self._held = record

    async def _receive(self) -> int:
        """Read what has arrived into the opener; 0 at the end of the stream."""
        sock = getattr(self.stream, "socket", None)
        if sock is None or not hasattr(sock, "recv_into"):
            data = await self.stream.receive_some(RECEIVE_SIZE)
            self._opener.feed(data)
            return len(data)
        # Straight into the opener's buffer: one copy of every byte fewer than receive_some.
        with self._opener.space(RECEIVE_SIZE) as room:
            count = await sock.recv_into(room)
        self._opener.filled(count)
        return count

    async def close(self) -> None:
        """Send what is pending, then the close marker, then close the stream."""
        try:
            await self.flush()
            await self.stream.send_all(records.CLOSE)
        except (ChannelBroken, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await self.abort()

    async def abort(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


def _why(error: BaseException) -> str:
    cause = error.__cause__ or error.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error) or type(error).__name__
