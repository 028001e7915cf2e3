"""The receiver's data phase on a live channel: greet, show the offer, write, verify, ACK."""

from __future__ import annotations

from typing import Awaitable, Callable

import trio

from . import compression, transfer
from .channel import Channel, ChannelBroken, ChannelClosed, lost
from .destination import Destination, DestinationError
from .errors import TransferFailed
from .progress import Progress

Decide = Callable[[transfer.Offer], Awaitable[bool]]
MakeProgress = Callable[[transfer.Offer], Progress]


async def receive_offer(
    channel: Channel,
    destination: Destination,
    *,
    decide: Decide,
    make_progress: MakeProgress | None = None,
    show_text: Callable[[str], None] | None = None,
    sender_public: bytes | None = None,
) -> transfer.TransferDone:
    """Run the receiver's side until everything is verified, in place and acknowledged.

    On any failure every temporary file is removed, the sender is told why (best effort),
    and TransferFailed carries the one line for the user. A text message is handed to
    ``show_text`` (only offered to senders when it is given) before the acknowledgement.
    ``sender_public`` (the spoke public we were announced) goes, digested, in our HELLO.
    """
    features = {transfer.UNKNOWN_SIZE, transfer.BIG_RECORDS, transfer.PACK_ACK}
    if compression.available():
        features.add(transfer.ZSTD)
    if getattr(destination, "supports_resume", False):
        features.add(transfer.RESUME)
    if show_text is not None:
        features.add(transfer.TEXT)
    session = transfer.ReceiverSession(features=features, sender_public=sender_public)
    progress: Progress | None = None
    try:
        with destination.all_or_nothing():
            channel.big_records = session.big_records  # before the sender may use them
            await channel.send(session.hello())
            await channel.flush()
            first = await channel.receive()
            if first[:4] == b"PACK":
                # The sender gave up waiting for our greeting and sent bob's format: read that.
                # It is ours (it got our hello, late): once all is verified and in place, say so
                # (pack-ack); a bare close would prove nothing to it.
                from .bob import receive_pack  # here: bob.py builds on this module

                try:
                    offer = await receive_pack(
                        channel, destination, announce=lambda offer: None, decide=decide,
                        make_progress=make_progress, first=first,
                    )
                except TransferFailed as error:
                    await _tell(channel, session, str(error))
                    raise
                await _send_now(channel, session.acknowledge_pack(offer.file_count, offer.total_bytes))
                return transfer.TransferDone(offer.file_count, offer.total_bytes)
            offer = await _wait_offer(channel, session, first)
            resume = transfer.RESUME in session.features
            try:
                destination.plan(offer, resume=resume)
            except DestinationError as error:
                await _send_now(channel, session.decline(str(error)))
                raise TransferFailed(str(error)) from None
            if not await decide(offer):
                await _send_now(channel, session.decline("the receiver said no"))
                raise TransferFailed("declined")
            await _send_now(channel, session.accept(destination.resume_points(offer) if resume else None))
            if make_progress is not None:
                progress = make_progress(offer)
            done = await _write_files(channel, session, destination, progress)
            destination.finish()
            if offer.text is not None:
                show_text(offer.text)
            await _send_now(channel, session.acknowledge())
            return done
    except transfer.ProtocolError as error:
        await _tell(channel, session, str(error))
        raise TransferFailed(f"the sender broke the protocol: {error}") from None
    except DestinationError as error:
        await _tell(channel, session, str(error))
        raise TransferFailed(str(error)) from None
    except (ChannelClosed, ChannelBroken) as error:
        raise lost(error) from None
    finally:
        if progress is not None:
            progress.close()


async def _send_now(channel: Channel, message: bytes) -> None:
    await channel.send(message)
    await channel.flush()


async def _tell(channel: Channel, session: transfer.ReceiverSession, reason: str) -> None:
    try:
        with trio.move_on_after(2):
            await _send_now(channel, session.error(reason[: transfer.MAX_REASON_BYTES]))
    except (ChannelBroken, RuntimeError):
        pass


async def _wait_offer(channel: Channel, session: transfer.ReceiverSession, first: bytes) -> transfer.Offer:
    record = first
    while True:
        event = session.receive(record)
        record = None
        if event is None:
            record = await channel.receive()
            continue
        if isinstance(event, transfer.PeerError):
            raise TransferFailed(f"the sender stopped: {event.reason}")
        assert isinstance(event, transfer.OfferReceived)
        return event.offer


async def _write_files(channel, session, destination, progress) -> transfer.TransferDone:
    part = None
    while True:
        event = session.receive(await channel.receive())
        if isinstance(event, transfer.FileData):
            part.write(event.data)
            if progress is not None:
                progress.advance(len(event.data))
        elif isinstance(event, transfer.FileStarted):
            part = destination.open_part(event.entry)
            if progress is not None:
                progress.note(event.entry.path)
                progress.resume_at(event.offset, event.entry.size)
        elif isinstance(event, transfer.ChunkChecked):
            destination.check(part, event.digest)
        elif isinstance(event, transfer.FileFinished):
            destination.commit(part, event.digest)
            part = None
        elif isinstance(event, transfer.TransferDone):
            return event
        elif isinstance(event, transfer.PeerError):
            raise TransferFailed(f"the sender stopped: {event.reason}")
