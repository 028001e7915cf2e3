"""The sender's data phase on a live channel: offer, stream every file once, wait for the ACK."""

from __future__ import annotations

from functools import partial
from typing import Awaitable, Callable

import trio

from . import compression, transfer
from .channel import Channel, ChannelBroken, ChannelClosed, lost
from .errors import TransferFailed
from .progress import Progress
from .source import Selection, SourceError

BOB_WAIT = 5.0
"""Seconds a sender that can also speak bob's format waits for our receiver's HELLO before
treating the receiver as bob (see peer/bob.py)."""
HELLO_TIMEOUT = 60.0
"""How long our receiver may take to greet us once the room is open (it greets at once)."""
ANSWER_TIMEOUT = 24 * 3600.0
"""The receiver's user may leave the prompt open a long time; the relay bounds it anyway."""


SMALL_FILE = 64 * 1024
"""Files up to this size are read (and compressed) right here, not in a worker thread: for
a 9-byte file the thread hops, buffers and tasks of the block pipeline cost far more than
the read (2,000 of them spent most of their time there)."""

Confirm = Callable[[], Awaitable[bool]]
ToBob = Callable[[transfer.SenderSession], Awaitable["transfer.Completed | None"]]

FEATURES = frozenset({transfer.TEXT, transfer.UNKNOWN_SIZE, transfer.RESUME, transfer.BIG_RECORDS})
"""What this sender can use when the receiver offers it (zstd is added unless disabled)."""

_WHY_MISSING = {
    transfer.TEXT: "the receiver cannot take a text message: it runs an older peer-relay",
    transfer.UNKNOWN_SIZE: "the receiver cannot take data of unknown size (a pipe): it runs an older peer-relay",
}


async def send_selection(
    channel: Channel,
    selection: Selection,
    *,
    confirm: Confirm | None = None,
    make_progress: Callable[[], Progress] | None = None,
    to_bob: ToBob | None = None,
    bob_wait: float = HELLO_TIMEOUT,
    compress: str = "auto",
    limit_rate: float | None = None,
    public: bytes | None = None,
) -> transfer.Completed | None:
    """Run the sender's side to the receiver's ACK; TransferFailed on anything else.

    A receiver that stays silent for ``bob_wait`` seconds may be bob's (ours greets at
    once): then ``to_bob`` sends bob's payload instead, on the session (which then reads
    a late hello, see bob.send_pack), and returns our receiver's ACK, or None when only a
    close after the whole PACK said it was done (which confirms nothing).

    ``public`` is the spoke public we announced: a receiver's hello that saw another one
    means the relay rewrote it, and the transfer stops (transfer.HandshakeAltered).

    The progress bar is made only once the receiver accepted, so that it neither draws over
    a prompt nor counts the time a person took to answer.

    ``compress`` is ``auto`` (see compression.CompressionChoice), ``always`` or ``never``;
    ``limit_rate`` caps what goes on the wire, in bytes per second.
    """
    features = set(FEATURES)
    choice = None
    if compress != "never" and compression.available():
        features.add(transfer.ZSTD)
        choice = compression.CompressionChoice(compress)
    session = transfer.SenderSession(selection.offer, features=features, public=public)
    pacer = Pacer(channel, limit_rate) if limit_rate else None
    try:
        return await _send(channel, session, selection, confirm, make_progress, to_bob, bob_wait, choice, pacer)
    except SourceError as error:
        await _tell(channel, session, str(error))
        raise TransferFailed(str(error)) from None
    except transfer.HandshakeAltered as error:
        await _tell(channel, session, str(error))
        raise TransferFailed(str(error)) from None
    except transfer.ProtocolError as error:
        await _tell(channel, session, str(error))
        raise TransferFailed(f"the receiver broke the protocol: {error}") from None
    except ChannelClosed as error:
        raise lost(error, "the receiver", "before confirming the transfer") from None
    except ChannelBroken as error:
        raise TransferFailed(str(error)) from None


async def _tell(channel: Channel, session: transfer.SenderSession, reason: str) -> None:
    """Best effort: let the receiver know why we stop, so it can say so too."""
    try:
        with trio.move_on_after(2):
            await channel.send(session.error(reason[: transfer.MAX_REASON_BYTES]))
            await channel.flush()
    except (ChannelBroken, RuntimeError):
        pass


async def _receive(channel: Channel, session: transfer.SenderSession, timeout: float, what: str):
    with trio.move_on_after(timeout):
        event = session.receive(await channel.receive())
        if isinstance(event, transfer.PeerError):
            raise TransferFailed(f"the receiver stopped: {event.reason}")
        return event
    raise TransferFailed(f"the receiver did not {what} within {timeout:.0f} s")


async def _send(channel, session, selection, confirm, make_progress, to_bob, bob_wait, choice, pacer):
    first = None
    with trio.move_on_after(bob_wait):
        first = await channel.receive()
    if first is None:
        if to_bob is None:
            raise TransferFailed(f"the receiver did not greet us within {bob_wait:.0f} s")
        if confirm is not None and not await confirm():
            raise TransferFailed("cancelled")
        session.fall_back_to_pack()
        return await to_bob(session)
    hello = session.receive(first)
    if isinstance(hello, transfer.PeerError):
        raise TransferFailed(f"the receiver stopped: {hello.reason}")
    channel.big_records = session.big_records
    if session.missing_features:
        reason = _WHY_MISSING[min(session.missing_features)]
        await _tell(channel, session, "the sender needs what this receiver does not support: "
                    + ", ".join(sorted(session.missing_features)))
        raise TransferFailed(reason)
    if confirm is not None and not await confirm():
        await _tell(channel, session, "the sender cancelled")
        raise TransferFailed("cancelled")
    for message in session.offer_messages():
        await channel.send(message)
    await channel.flush()
    answer = await _receive(channel, session, ANSWER_TIMEOUT, "answer the offer")
    if isinstance(answer, transfer.Declined):
        reason = f": {answer.reason}" if answer.reason else ""
        raise TransferFailed(f"the receiver declined the transfer{reason}")
    progress = make_progress() if make_progress is not None else None
    try:
        if transfer.ZSTD not in session.features:
            choice = None
        return await _stream_and_confirm(channel, session, selection, progress, choice, pacer)
    finally:
        if progress is not None:
            progress.close()


async def _stream_and_confirm(channel, session, selection, progress, choice, pacer) -> transfer.Completed:
    # The file stream and a watch on the receiver run side by side: the receiver may stop us
    # early (disk full, a bad name). Whichever fails first cancels the other; its error wins.
    outcome: list[transfer.Completed] = []
    failures: list[Exception] = []
    async with trio.open_nursery() as nursery:

        async def guarded(job) -> None:
            try:
                await job()
            except (TransferFailed, SourceError, transfer.ProtocolError, ChannelClosed, ChannelBroken) as error:
                failures.append(error)
                nursery.cancel_scope.cancel()

        async def watch_receiver() -> None:
            event = session.receive(await channel.receive())
            if isinstance(event, transfer.PeerError):
                raise TransferFailed(f"the receiver stopped: {event.reason}")
            outcome.append(event)

        nursery.start_soon(guarded, watch_receiver)
        nursery.start_soon(guarded, partial(_stream_files, channel, session, selection, progress, choice, pacer))
    if failures:
        raise failures[0]
    return outcome[0]


class Pacer:
    """``--limit-rate``: keeps the bytes put on the wire under a rate, as a slow link would.

    It counts what the channel actually wrote (sealed records, after compression), so a
    throttled transfer shows what compression buys on a slow link.
    """

    def __init__(self, channel: Channel, rate: float) -> None:
        self._channel = channel
        self._rate = float(rate)
        self._start: float | None = None
        self._base = 0

    async def pace(self) -> None:
        now = trio.current_time()
        if self._start is None:
            self._start, self._base = now, self._channel.bytes_sent
            return
        due = self._start + (self._channel.bytes_sent - self._base) / self._rate
        if due > now:
            await trio.sleep(due - now)


async def _stream_files(channel, session, selection, progress, choice=None, pacer=None) -> None:
    while (entry := session.next_file()) is not None:
        if progress is not None:
            progress.note(entry.path)
        # Resume: the receiver's verified bytes are skipped with a seek, never read.
        start = session.start_offset(entry)
        chunk = transfer.RESUME_CHUNK if session.resuming and entry.size is not None else None
        with selection.open(entry, start=start, chunk=chunk) as reader:
            await channel.send(session.begin_file(entry))
            if progress is not None and start:
                progress.resume_at(start, entry.size)
            if entry.size is not None and entry.size - start <= SMALL_FILE:
                await _send_small(channel, session, reader, choice, entry.size - start)
                if progress is not None:
                    progress.advance(entry.size - start)
                if pacer is not None:
                    await pacer.pace()
            elif choice is not None or entry.size is None:
                await _send_blocks(channel, session, reader, choice, progress, pacer, stream=entry.size is None)
            else:
                while session.file_remaining:
                    count = reader.readinto(session.data_buffer())
                    await channel.send(session.data_message(count))
                    if session.check_due:
                        await channel.send(session.check(reader.chunk_digest()))
                    if progress is not None:
                        progress.advance(count)
                    if pacer is not None:
                        await pacer.pace()
            await channel.send(session.end_file(reader.digest()))
    await channel.send(session.done())
    await channel.flush()


async def _send_small(channel, session, reader, choice, size: int) -> None:
    """One small file, read whole here and sent raw or as one zstd frame."""
    if not size:
        return
    if choice is None:
        while session.file_remaining:
            await channel.send(session.data_message(reader.readinto(session.data_buffer())))
        return
    block = memoryview(bytearray(size))
    done = 0
    while done < size:
        done += reader.readinto(block[done:])
    choice.begin_file()
    tried = choice.compress_next()
    frame = compression.compress_block(block) if tried else None
    if frame is None:
        await _send_bytes(channel, session, block)
    else:
        for message in session.compressed_messages(frame, size):
            await channel.send(message)
    choice.block_sent(size, tried, frame is not None)


def _read_block(reader, buffer: memoryview, try_zstd: bool, chunk: int | None):
    """In a worker thread: the next block (read and hashed), its zstd frame if asked, and the
    digest of the resume chunk it completes, if it completes one (the reader never reads
    across a chunk, and hashing here keeps the digest in step with the reading)."""
    count = reader.readinto(buffer)
    frame = compression.compress_block(buffer[:count]) if try_zstd and count else None
    chunk_digest = reader.chunk_digest() if chunk and count and reader.position % chunk == 0 else None
    return count, frame, chunk_digest


async def _send_blocks(channel, session, reader, choice, progress, pacer, *, stream: bool) -> None:
    """Send one file block by block: read, hash and compress in a worker thread while this
    task seals and sends the previous block, so the two overlap on two cores.

    A pipe read may block, so it always goes through here too; when the pipe runs dry the
    channel is flushed, so that a slow producer's bytes are not held back by batching.
    """
    if choice is not None:
        choice.begin_file()
    chunk = transfer.RESUME_CHUNK if session.resuming and not stream else None
    buffers = [memoryview(bytearray(compression.FRAME_CONTENT)) for _ in range(3)]
    # Capacity 1 and three buffers: one being sent, one queued, one being filled.
    send_blocks, receive_blocks = trio.open_memory_channel(1)

    async def produce() -> None:
        async with send_blocks:
            turn = 0
            while True:
                buffer = buffers[turn % 3]
                turn += 1
                try_zstd = choice is not None and choice.compress_next()
                # Abandoned on cancellation (a silent pipe): the thread then owns `buffer`.
                count, frame, chunk_digest = await trio.to_thread.run_sync(
                    _read_block, reader, buffer, try_zstd, chunk, abandon_on_cancel=True
                )
                if not count:
                    return
                await send_blocks.send((buffer[:count], try_zstd, frame, chunk_digest))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        async with receive_blocks:
            async for block, tried, frame, chunk_digest in receive_blocks:
                if frame is None:
                    await _send_bytes(channel, session, block)
                else:
                    for message in session.compressed_messages(frame, len(block)):
                        await channel.send(message)
                if chunk_digest is not None:
                    await channel.send(session.check(chunk_digest))
                if stream and len(block) < compression.FRAME_CONTENT:
                    await channel.flush()
                if choice is not None:
                    choice.block_sent(len(block), tried, frame is not None)
                if progress is not None:
                    progress.advance(len(block))
                if pacer is not None:
                    await pacer.pace()


async def _send_bytes(channel, session, data: memoryview) -> None:
    """DATA messages for `data`, copied into the session's record buffer piece by piece."""
    done = 0
    while done < len(data):
        buffer = session.data_buffer()
        count = min(len(buffer), len(data) - done)
        buffer[:count] = data[done : done + count]
        await channel.send(session.data_message(count))
        done += count
