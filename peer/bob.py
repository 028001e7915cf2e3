"""Talking to bob's peers on a live channel: receive and send its PACK payload (docs/protocol.md §8).

How each side knows the other is bob (also in docs/transfer.md):
- a receiver sees it in the handshake: bob's sender advertises cipher1 = 2 (ChaCha20), which
  cannot carry records, where ours advertises 0 (AES-GCM) so that we can answer;
- a sender waits ``sending.BOB_WAIT`` seconds for our receiver's HELLO, which our receiver sends the
  moment the room opens; bob's receiver never sends anything, so silence means bob. Should
  a slow link (or a relay) make our receiver's HELLO late, the sender sends a PACK and our
  receiver, which also reads PACK, still gets a verified transfer, and ACKs it (pack-ack).
bob cannot acknowledge: its receiver just closes after the trailer. A clean close after the
whole PACK is the best a sender can learn from it, and we say so instead of claiming a
confirmation; from a receiver that said HELLO, only its ACK counts.
"""

from __future__ import annotations

import os
import shutil
from typing import Awaitable, Callable, Iterator

import trio

from . import pack, transfer
from .channel import Channel, ChannelBroken, ChannelClosed, lost
from .destination import Destination, DestinationError
from .errors import TransferFailed
from .progress import Progress
from .source import Selection, SourceError

CLOSE_WAIT = 60.0
"""How long a sender waits for the receiver to close (or ACK) once the trailer is sent."""
LEVEL = 0
"""zlib level for what we send to bob: stored blocks. Level 4 (bob's) deflates at ~44 MiB/s
here, far below the link; bob's receiver accepts any level."""
READ_STEP = 1024 * 1024
_NO_ROOT_SPOOL = 1024 * 1024
"""A destination without a directory (--stdout) spools at most this much, in memory."""

Announce = Callable[[transfer.Offer], None]
MakeProgress = Callable[[transfer.Offer], Progress]


# --- receiving from bob ---------------------------------------------------------------------


async def receive_pack(
    channel: Channel,
    destination: Destination,
    *,
    announce: Announce,
    decide: Callable[[transfer.Offer], Awaitable[bool]] | None = None,
    make_progress: MakeProgress | None = None,
    first: bytes | None = None,
) -> transfer.Offer:
    """Read bob's pack to its verified trailer, put every file in place, return what arrived.

    Nothing is inflated to disk before `decide` says yes (issue 16). A single file is
    asked about at its blob's header, then written as it inflates (never past its
    declared size) and renamed only once the trailer matched. A directory waits,
    compressed, in a hidden spool inside the destination until its trailer; its offer
    is shown and checked against the free space, and only once accepted are its objects
    inflated (each to its declared size) and its files written. The spools go with the
    reader on every path.
    """
    root = getattr(destination, "root", None)
    spool_limit = _free_space(root) if root is not None else _NO_ROOT_SPOOL
    reader = pack.PackReader(temp_dir=root, spool_limit=spool_limit)
    progress: Progress | None = None
    part = None
    offer: transfer.Offer | None = None
    arrived: list[transfer.OfferEntry] = []
    try:
        with destination.all_or_nothing():
            while not reader.finished:
                if first is not None:
                    record, first = first, None
                else:
                    try:
                        record = await channel.receive()
                    except ChannelClosed:
                        reader.eof()  # raises: the stream ended before the trailer
                        raise
                reader.feed(record)
                while (event := reader.next_event()) is not None:
                    if isinstance(event, (pack.SingleFile, pack.Directory)):
                        offer = reader.offer()
                        destination.plan(offer)
                        if isinstance(event, pack.Directory):
                            _check_room(root, reader)
                        announce(offer)
                        if decide is not None and not await decide(offer):
                            raise TransferFailed("declined")
                        if make_progress is not None:
                            progress = make_progress(offer)
                        if isinstance(event, pack.SingleFile):
                            part = destination.open_part(offer.entries[0])
                    elif isinstance(event, pack.FileData):
                        part.write(event.data)
                        if progress is not None:
                            progress.advance(len(event.data))
                    elif isinstance(event, pack.TreeEntry):
                        arrived.append(event.offer_entry())
                        if event.kind == transfer.FILE:
                            await _extract(reader, destination, event, progress)
                    elif isinstance(event, pack.PackEnd):
                        if part is not None:
                            # The pack's SHA-1 trailer is what verified these bytes; bob sends no
                            # per-file digest, so the part file's own one completes the commit.
                            destination.commit(part, part.digest())
                            part = None
                        destination.finish()
                        if arrived:  # a directory: what arrived, every size now known
                            offer = transfer.Offer([offer.entries[0], *arrived])
                if root is None and reader.is_directory:
                    raise TransferFailed("the sender sends a directory, and this receiver takes a single file")
            return offer
    except pack.PackError as error:
        raise TransferFailed(f"bob's stream is not valid: {error}") from None
    except DestinationError as error:
        raise TransferFailed(str(error)) from None
    except (ChannelClosed, ChannelBroken) as error:
        raise lost(error) from None
    finally:
        reader.close()
        if progress is not None:
            progress.close()


def _free_space(root) -> int:
    try:
        return shutil.disk_usage(root).free
    except OSError as exc:
        raise TransferFailed(f"cannot use {root} as the destination: {transfer.os_reason(exc)}") from None


def _check_room(root, reader: pack.PackReader) -> None:
    """A directory needs room for its inflated objects and its files besides the spool."""
    needed = reader.unpacked_size + reader.most_bytes
    free = _free_space(root)
    if needed > free:
        raise TransferFailed(
            f"not enough space in {root}: unpacking bob's directory needs up to "
            f"{transfer.format_size(needed)}, {transfer.format_size(free)} free"
        )


async def _extract(reader: pack.PackReader, destination: Destination, entry: pack.TreeEntry, progress) -> None:
    part = destination.open_part(entry.offer_entry())
    for piece in reader.iter_blob(entry.id):
        part.write(piece)
        if progress is not None:
            progress.advance(len(piece))
        await trio.lowlevel.checkpoint()
    destination.commit(part, part.digest())


# --- sending to bob -------------------------------------------------------------------------


async def send_pack(
    channel: Channel,
    selection: Selection,
    paths: list[str],
    *,
    session: transfer.SenderSession,
    make_progress: Callable[[], Progress] | None = None,
) -> transfer.Completed | None:
    """Send one file or one directory as bob's pack; return our receiver's ACK of it, or None
    when the room was closed cleanly after the whole pack (all bob ever says: no proof).

    What the receiver says is read while the pack goes out (`session`, fallen back to
    the pack, decodes it): a close before the last record is a failure, whoever closed;
    so is a broken connection at any time. A HELLO, even late, means the receiver is ours:
    then, if it promised one (pack-ack), only its ACK confirms, and a bare close fails.
    """
    if len(paths) != 1:
        raise TransferFailed("bob's receiver takes one file or one directory: send the paths one at a time")
    watch = _PackWatch(channel, session)
    progress = make_progress() if make_progress is not None else None
    source_failure: SourceError | None = None
    broken: ChannelBroken | None = None
    sent = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            try:
                with watch.sending:
                    await _send_pack(channel, selection, paths, progress)
                # Cancelled only at a checkpoint where the sending had not finished: once the
                # last record is in the kernel's hands, a close seen meanwhile comes after it.
                sent = not watch.sending.cancelled_caught
            except SourceError as error:
                source_failure = error
            except ChannelBroken as error:
                broken = error
            if sent:
                with trio.move_on_after(CLOSE_WAIT):
                    await watch.ended.wait()
            nursery.cancel_scope.cancel()
    finally:
        if progress is not None:
            progress.close()
    if source_failure is not None:
        raise TransferFailed(str(source_failure))
    if watch.failure is not None:
        raise watch.failure  # what the receiver said, or how the room failed
    if broken is not None and not watch.closed:
        raise TransferFailed(str(broken))
    if not sent:
        raise TransferFailed("the receiver closed the connection before the end of bob's pack")
    if watch.confirmed is not None:
        return watch.confirmed
    if not watch.closed:
        raise TransferFailed(f"the receiver did not close the connection within {CLOSE_WAIT:.0f} s")
    if session.pack_needs_ack:
        raise TransferFailed("the receiver (a peer-relay peer) closed the connection without confirming the transfer")
    return None


class _PackWatch:
    """Reads the room while the pack goes out and after: how it ended, and what was said."""

    def __init__(self, channel: Channel, session: transfer.SenderSession) -> None:
        self.channel = channel
        self.session = session
        self.sending = trio.CancelScope()
        """Around the sending: cancelled once the room ends (a close or a failure)."""
        self.ended = trio.Event()
        self.closed = False
        """The room ended cleanly (the close marker, or EOF at a record boundary)."""
        self.confirmed: transfer.Completed | None = None
        self.failure: Exception | None = None

    async def run(self) -> None:
        try:
            while self.confirmed is None:
                event = self.session.receive(await self.channel.receive())
                if isinstance(event, transfer.PeerError):
                    raise TransferFailed(f"the receiver stopped: {event.reason}")
                if isinstance(event, transfer.Completed):
                    self.confirmed = event
                # HelloReceived: our receiver after all, whose hello came late; go on.
        except ChannelClosed:
            self.closed = True
            self.sending.cancel()
        except ChannelBroken as error:
            self.failure = TransferFailed(str(error))
            self.sending.cancel()
        except (TransferFailed, transfer.ProtocolError) as error:
            self.failure = error
            self.sending.cancel()
        self.ended.set()


async def _send_pack(channel: Channel, selection: Selection, paths: list[str], progress: Progress | None) -> None:
    top = selection.offer.top_level[0]
    if top.is_file:
        reader = selection.open(top)
        with reader:
            records = pack.single_file_records(top.path, top.size, _chunks(reader, progress), LEVEL)
            await _send_records(channel, records)
            reader.digest()  # raises if the file changed while it was read
    else:
        directory = pack.directory_pack(paths[0].rstrip(os.sep) or paths[0], top.path)
        await _send_records(channel, _counted(directory, progress))


def _chunks(reader, progress: Progress | None) -> Iterator[bytes]:
    buffer = bytearray(READ_STEP)
    view = memoryview(buffer)
    while reader.remaining:
        count = reader.readinto(view)
        if progress is not None:
            progress.advance(count)
        yield bytes(view[:count])


def _counted(directory: pack.DirectoryPack, progress: Progress | None) -> Iterator[bytes]:
    seen = 0
    for record in directory.records(LEVEL):
        if progress is not None:
            progress.advance(directory.content_sent - seen)
            seen = directory.content_sent
        yield record


async def _send_records(channel: Channel, records: Iterator[bytes]) -> None:
    for record in records:
        await channel.send(record)
    await channel.flush()
