"""The sender's data phase on a live channel: offer, stream every file once, wait for the ACK."""

from __future__ import annotations

from functools import partial
from typing import Awaitable, Callable

import trio

from . import transfer
from .channel import Channel, ChannelBroken, ChannelClosed
from .progress import Progress
from .source import Selection, SourceError
from .transfer import TransferFailed

HELLO_TIMEOUT = 60.0
"""How long our receiver may take to greet us once the room is open (it greets at once)."""
ANSWER_TIMEOUT = 24 * 3600.0
"""The receiver's user may leave the prompt open a long time; the relay bounds it anyway."""


Confirm = Callable[[], Awaitable[bool]]


async def send_selection(
    channel: Channel,
    selection: Selection,
    *,
    confirm: Confirm | None = None,
    make_progress: Callable[[], Progress] | None = None,
    to_bob: Callable[[], Awaitable[None]] | None = None,
    bob_wait: float = HELLO_TIMEOUT,
) -> transfer.Completed | None:
    """Run the sender's side to the receiver's ACK; TransferFailed on anything else.

    A receiver that stays silent for ``bob_wait`` seconds is bob's (ours greets at once):
    then ``to_bob`` sends bob's payload instead and None is returned.

    The progress bar is made only once the receiver accepted, so that it neither draws over
    a prompt nor counts the time a person took to answer.
    """
    session = transfer.SenderSession(selection.offer)
    try:
        return await _send(channel, session, selection, confirm, make_progress, to_bob, bob_wait)
    except SourceError as error:
        await _tell(channel, session, str(error))
        raise TransferFailed(str(error)) from None
    except transfer.ProtocolError as error:
        await _tell(channel, session, str(error))
        raise TransferFailed(f"the receiver broke the protocol: {error}") from None
    except ChannelClosed:
        raise TransferFailed("the receiver went away before confirming the transfer") from None
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


async def _send(channel, session, selection, confirm, make_progress, to_bob, bob_wait):
    first = None
    with trio.move_on_after(bob_wait):
        first = await channel.receive()
    if first is None:
        if to_bob is None:
            raise TransferFailed(f"the receiver did not greet us within {bob_wait:.0f} s")
        if confirm is not None and not await confirm():
            raise TransferFailed("cancelled")
        await to_bob()
        return None
    hello = session.receive(first)
    if isinstance(hello, transfer.PeerError):
        raise TransferFailed(f"the receiver stopped: {hello.reason}")
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
        return await _stream_and_confirm(channel, session, selection, progress)
    finally:
        if progress is not None:
            progress.close()


async def _stream_and_confirm(channel, session, selection, progress) -> transfer.Completed:
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
        nursery.start_soon(guarded, partial(_stream_files, channel, session, selection, progress))
    if failures:
        raise failures[0]
    return outcome[0]


async def _stream_files(channel, session, selection, progress) -> None:
    while (entry := session.next_file()) is not None:
        if progress is not None:
            progress.note(entry.path)
        with selection.open(entry) as reader:
            await channel.send(session.begin_file(entry))
            while session.file_remaining:
                count = reader.readinto(session.data_buffer())
                await channel.send(session.data_message(count))
                if progress is not None:
                    progress.advance(count)
            await channel.send(session.end_file(reader.digest()))
    await channel.send(session.done())
    await channel.flush()
