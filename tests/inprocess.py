"""Honest transfers run inside the test process: a relay (``serve``) and pairs of peers made of
the real handshake machines, meeting driver, channel, data phase and disk sides.

Only the command line is left out, which makes hundreds of pairs cheap enough for CI; the
end-to-end tests with real processes cover the command line. Used by the adversarial,
fault and load suites and by ``bench/load.py``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import AsyncIterator, Callable

import attrs
import trio

from peer import handshake
from peer.address import RelayAddress
from peer.channel import Channel
from peer.destination import Destination
from peer.meeting import meet
from peer.receiving import receive_offer
from peer.sending import send_selection
from peer.source import scan
from relay.server import BoundPorts, RelayConfig, serve


def relay_config(**overrides) -> RelayConfig:
    return RelayConfig(hosts=("127.0.0.1",), port=0, secure_port=0, **overrides)


@contextlib.asynccontextmanager
async def running_relay(config: RelayConfig | None = None) -> AsyncIterator[RelayAddress]:
    """A relay serving in the background of the current trio run; stopped cleanly on exit."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        ports: BoundPorts = await nursery.start(
            lambda task_status: serve(config or relay_config(), stop=stop, task_status=task_status))
        try:
            yield RelayAddress("127.0.0.1", ports.port, ports.secure_port)
        finally:
            stop.set()


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` mapped to its bytes (None for a directory)."""
    return {
        path.relative_to(root).as_posix(): None if path.is_dir() else path.read_bytes()
        for path in sorted(root.rglob("*"))
    }


@attrs.define
class PairResult:
    """What one honest transfer did; ``error`` is None only if it was verified end to end."""

    code: str
    size: int
    error: str | None = None
    handshake_seconds: float | None = None
    """From the receiver's first byte to the relay until both sides hold the open room."""
    transfer_seconds: float | None = None
    """From the open room to the receiver's acknowledgement reaching the sender."""
    attempts_failed: int = 0
    """Handshakes strangers ran against the sender (wrong codes, garbage) that it counted."""

    @property
    def ok(self) -> bool:
        return self.error is None


async def run_pair(
    address: RelayAddress,
    code: str,
    source: Path,
    out: Path,
    *,
    max_attempts: int = 3,
    timeout: float = 60.0,
    room_timeout: float = 30.0,
    on_paired: Callable[[], None] | None = None,
) -> PairResult:
    """Send ``source`` (a file or a directory) to a fresh ``out`` directory; never raises.

    The receiver starts once the sender is registered, as a person reading the code aloud
    would; the result says whether both sides finished and ``out`` equals the source.
    """
    password = code.encode()
    selection = scan([str(source)])
    result = PairResult(code, selection.offer.total_bytes)
    sender_registered = trio.Event()
    sender_done = trio.Event()
    started = paired_at = 0.0
    failures: list[str] = []

    def count_attempts(event: handshake.Event) -> None:
        if isinstance(event, handshake.AttemptFailed):
            result.attempts_failed += 1

    async def registered() -> None:
        sender_registered.set()

    async def sender() -> None:
        try:
            machine = handshake.SenderHandshake(password, max_attempts=max_attempts)
            meeting = await meet(address, machine, notify=count_attempts,
                                 on_registered=registered, room_timeout=room_timeout)
            keys = meeting.paired.keys
            channel = Channel(meeting.stream, send_key=keys.sender_to_receiver,
                              receive_key=keys.receiver_to_sender)
            try:
                await send_selection(channel, selection)
            finally:
                await channel.close()
        except Exception as error:  # noqa: BLE001 - reported, not raised: the test decides
            failures.append(f"sender: {type(error).__name__}: {error}")
        finally:
            sender_registered.set()
            sender_done.set()

    async def receiver() -> None:
        nonlocal started, paired_at
        await sender_registered.wait()
        if failures:
            return
        try:
            started = time.perf_counter()
            machine = handshake.ReceiverHandshake(password, max_attempts=max_attempts)
            meeting = await meet(address, machine, notify=count_attempts, room_timeout=room_timeout)
            paired_at = time.perf_counter()
            result.handshake_seconds = paired_at - started
            if on_paired is not None:
                on_paired()
            keys = meeting.paired.keys
            channel = Channel(meeting.stream, send_key=keys.receiver_to_sender,
                              receive_key=keys.sender_to_receiver)

            async def accept(offer) -> bool:
                return True

            try:
                await receive_offer(channel, Destination(out), decide=accept)
            finally:
                await channel.close()
        except Exception as error:  # noqa: BLE001
            failures.append(f"receiver: {type(error).__name__}: {error}")

    out.mkdir(parents=True, exist_ok=True)
    with trio.move_on_after(timeout) as timer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(receiver)
    if timer.cancelled_caught:
        failures.append(f"not finished within {timeout} s")
    if not failures:
        result.transfer_seconds = time.perf_counter() - paired_at
        expected = {source.name: None} | {
            f"{source.name}/{k}": v for k, v in tree(source).items()
        } if source.is_dir() else {source.name: source.read_bytes()}
        if tree(out) != expected:
            failures.append("the received tree differs from the source")
    result.error = "; ".join(failures) or None
    return result
