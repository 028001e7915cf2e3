"""Issue 16, findings 4 and 5 (the peers' half): strangers guessing a code, against real
``peer recv`` and ``peer send`` processes through a real relay on loopback.

The strangers are written with the project's own pieces (``SenderHandshake`` for a fake
sender, ``spoke.hello`` for a fake receiver's X) over a plain relay connection.
"""

from __future__ import annotations

import attrs
import trio

from peer import spoke
from peer.address import RelayAddress
from peer.handshake import SenderHandshake, SendFrame
from peer.rendezvous import RelayError, RelayLink
from relay import wire

from processes import RelayProcess, finish, peer, start_relay, stop_relay

CODE = "417-cobalt-lemon-unicycle"
WRONG = b"417-a-wrong-guess"
"""Same nameplate as CODE: our receiver answers such a sender, our sender such a receiver."""
STEP = 20.0
"""Seconds any one step may take on a loaded machine (never a bound on speed)."""


def _address(relay: RelayProcess) -> RelayAddress:
    return RelayAddress("127.0.0.1", relay.port, relay.secure_port)


async def _next(link: RelayLink, pending: list[wire.Frame], kind: type) -> wire.Frame:
    """The next frame carrying a ``kind`` packet (earlier frames of other kinds are dropped)."""
    while True:
        while pending:
            frame = pending.pop(0)
            if isinstance(frame.packet, kind):
                return frame
        pending.extend(await link.receive())


# --- finding 5: the receiver's limit ----------------------------------------------------------


@attrs.define
class FakeSender:
    """A sender with our nameplate and a wrong code: each handshake is one online guess."""

    link: RelayLink
    machine: SenderHandshake
    pending: list[wire.Frame] = attrs.Factory(list)

    @classmethod
    async def register(cls, address: RelayAddress) -> FakeSender:
        machine = SenderHandshake(WRONG)
        link = await RelayLink.open(address)
        fake = cls(link, machine)
        await fake.answer(machine.start(0))
        frame = await _next(link, fake.pending, wire.ServerIdentity)
        machine.receive(frame, 0)
        return fake

    async def answer(self, events: list) -> None:
        await self.link.send([event.frame for event in events if isinstance(event, SendFrame)])

    async def guess(self) -> int:
        """Wait for the receiver's 07, answer it (06), return the Spoke_failure code it sends."""
        x = await _next(self.link, self.pending, wire.XAndClientIdentity)
        await self.answer(self.machine.receive(x, 0))
        failure = await _next(self.link, self.pending, wire.SpokeFailure)
        return failure.packet.code

    async def saw_x(self, receiver_gone: trio.Event) -> bool:
        """Whether the receiver's 07 reaches us. The relay delivers a receiver's 07 before
        its 09 (departure), so either ends the wait; so does the relay closing us, and the
        receiver having exited a while ago (then it never heard of us: no 07 can come)."""
        async def give_up_after_exit() -> None:
            await receiver_gone.wait()
            await trio.sleep(3.0)
            nursery.cancel_scope.cancel()

        seen = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(give_up_after_exit)
            try:
                while True:
                    frame = await _next(self.link, self.pending, (wire.XAndClientIdentity, wire.Closed))
                    if isinstance(frame.packet, wire.XAndClientIdentity):
                        seen = True
                        break
                    if frame.uid == wire.RELAY_UID:
                        break
            except RelayError:
                pass
            nursery.cancel_scope.cancel()
        return seen


async def test_a_receiver_stops_after_three_senders_fail_to_prove_its_code(tmp_path):
    relay = start_relay()
    receiver = None
    fakes: list[FakeSender] = []
    try:
        receiver = peer("recv", *relay.peer_args(), "-y", "-o", f"{tmp_path / 'out'}/", CODE,
                        cwd=tmp_path)
        address = _address(relay)
        # One after the other, each well inside the receiver's wrong-code grace period: it
        # answers each of them, and each mismatch is one online guess at its code.
        for _ in range(3):
            with trio.fail_after(STEP):
                fakes.append(await FakeSender.register(address))
                assert await fakes[-1].guess() == spoke.FAILURE_BAD_CLIENT_VALIDATOR
        # A fourth gets nothing: the receiver has stopped answering (and left).
        with trio.fail_after(STEP):
            fakes.append(await FakeSender.register(address))
        gone = trio.Event()
        outcome: list = []

        async def wait_for_receiver() -> None:
            outcome.extend(await trio.to_thread.run_sync(finish, receiver, 60.0))
            gone.set()

        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_for_receiver)
                answered = await fakes[-1].saw_x(gone)
                if answered:
                    receiver.kill()  # it would wait for that sender's 06 forever
        assert not answered, "the receiver answered a fourth sender"
        status, _, err = outcome
        assert status == 1, err
        assert err.strip().splitlines()[-1] == (
            "peer: 3 senders with nameplate 417 failed to prove the code: someone may be "
            "guessing it; ask the sender for a new code"
        ), err
        assert not (tmp_path / "out").exists()
    finally:
        for fake in fakes:
            await fake.link.aclose()
        if receiver is not None and receiver.poll() is None:
            receiver.kill()
            receiver.communicate()
        stop_relay(relay)


# --- finding 4: the sender's limit, and what it says ----------------------------------------------


async def _guess_at_sender(address: RelayAddress, ending: str) -> None:
    """One stranger's handshake with the waiting sender: a valid 07 for a wrong code, our 06,
    then ``ending``: a Spoke_failure with code 1 ("your proof does not match my code"), one
    with code 0, or just hanging up. A fresh connection each time, as after a relay refuses
    a second try on the same one."""
    link = await RelayLink.open(address)
    pending: list[wire.Frame] = []
    try:
        await link.send([wire.Frame(wire.RELAY_UID, wire.HelloClient())])
        identity = (await _next(link, pending, wire.ClientIdentity)).packet.identity
        announced = (await _next(link, pending, wire.NewServer)).packet
        _, x = spoke.hello(WRONG, announced.public)
        await link.send([wire.Frame(announced.server_uid, wire.XAndClientIdentity(x, identity))])
        await _next(link, pending, wire.YAndServerValidator)  # one offline guess, already won
        if ending == "code 1":
            await link.send([wire.Frame(announced.server_uid, wire.SpokeFailure(1))])
        elif ending == "code 0":
            await link.send([wire.Frame(announced.server_uid, wire.SpokeFailure(0))])
    finally:
        await link.aclose()


async def test_a_sender_says_when_strangers_abandon_handshakes_after_its_proof(tmp_path):
    relay = start_relay()
    sender = None
    try:
        (tmp_path / "f.txt").write_text("not for strangers")
        sender = peer("send", *relay.peer_args(), "--password", CODE, "f.txt", cwd=tmp_path)
        address = _address(relay)
        for ending in ("code 1", "hang up", "code 0"):
            with trio.fail_after(STEP):
                await _guess_at_sender(address, ending)
        status, _, err = await trio.to_thread.run_sync(finish, sender, 60.0)
        assert status == 1, err
        lines = err.strip().splitlines()
        assert lines[-1] == (
            "peer: gave up after 3 failed handshakes (1 wrong code, 2 abandoned after seeing "
            "our proof): someone else on the relay may be guessing the code; send again to get "
            "a new code"
        ), err
        warnings = [line for line in lines if line.startswith("peer: warning: a receiver")]
        assert len(warnings) == 3, err
        assert "had a different code (1 of 3 attempts used)" in warnings[0]
        assert all("abandoned the handshake after seeing our proof" in w for w in warnings[1:])
        assert "(3 of 3 attempts used)" in warnings[2]
    finally:
        if sender is not None and sender.poll() is None:
            sender.kill()
            sender.communicate()
        stop_relay(relay)
