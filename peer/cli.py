"""``peer send`` and ``peer recv``: argument parsing and the order of the steps, nothing more.

Exit status: 0 only when the transfer was verified end to end (or, for a bob receiver, which
cannot confirm, closed cleanly after the whole PACK); 1 for any failure (one line
on stderr saying why); 2 for a usage error; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial
from pathlib import Path

import trio

from . import codes, completion, handshake, messages, qr, transfer
from .address import DEFAULT_PORT, DEFAULT_SECURE_PORT, AddressError, RelayAddress, parse_relay
from .channel import Channel, ChannelBroken, ChannelClosed, lost
from .console import Console
from .destination import Destination, DestinationError, StreamDestination
from .output import OutputDestination, names_a_file
from .version import VersionAction
from .errors import TransferFailed
from .memory import keep_freed_memory
from .meeting import HandshakeFailed, meet
from .progress import Progress
from .receiving import receive_offer
from .rendezvous import RelayError
from .sending import BOB_WAIT, HELLO_TIMEOUT, send_selection
from .source import SourceError, scan, stdin_selection, text_selection
from .status import StatusConsole, StatusLine

RELAY_ENV = "PEER_RELAY"
PASSWORD_ENV = "PEER_PASSWORD"


class Failure(Exception):
    """Stop with this one-line message and exit status 1."""

    status = 1


class Refused(Failure):
    """A usage problem found before anything was sent: exit status 2."""

    status = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peer",
        description="Send files end-to-end encrypted through a relay that can read nothing.",
    )
    parser.add_argument("--version", action=VersionAction)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{send,recv,completion}")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--relay",
            metavar="ADDR",
            help="relay address: HOST, HOST:PORT, tcp://HOST:PORT, tls://HOST:PORT, "
            f"ws://HOST[:PORT][/PREFIX/] or wss://HOST[:PORT][/PREFIX/] (default: ${RELAY_ENV}"
            + (", or a relay run inside `peer send` itself)" if sub.prog.endswith("send") else ")"),
        )
        sub.add_argument(
            "--secure-port",
            type=int,
            metavar="N",
            default=None,
            help=f"the relay's secure-room port (default {DEFAULT_SECURE_PORT})",
        )
        sub.add_argument(
            "--cacert",
            metavar="FILE",
            default=None,
            help="PEM file of the authorities to trust for a tls:// or wss:// relay, instead of the system's",
        )
        sub.add_argument(
            "--max-attempts",
            type=int,
            default=handshake.DEFAULT_MAX_ATTEMPTS,
            metavar="N",
            help=(
                "give up after N failed handshakes, each being one guess of the code "
                if sub.prog.endswith("send")
                else "give up after N senders failed to prove the code, each being one guess of it "
            )
            + f"(default {handshake.DEFAULT_MAX_ATTEMPTS})",
        )
        sub.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
        sub.add_argument(
            "-q", "--quiet", action="store_true",
            help="print nothing but errors" + (" (and a generated code)" if sub.prog.endswith("send") else ""),
        )

    send = commands.add_parser("send", help="send files or directories", description="Send files or directories.")
    common(send)
    send.add_argument(
        "--password",
        "--code",
        dest="password",
        metavar="PW",
        help=f"use this code instead of a generated one (${PASSWORD_ENV} does the same without "
        "showing it in the process list)",
    )
    send.add_argument(
        "--text", metavar="MESSAGE", help="send this text instead of files; the receiver prints it"
    )
    compress = send.add_mutually_exclusive_group()
    compress.add_argument(
        "--compress",
        dest="compress",
        action="store_const",
        const="always",
        default="auto",
        help="compress with zstd whatever the link (default: automatic, when it makes the transfer faster)",
    )
    compress.add_argument(
        "--no-compress", dest="compress", action="store_const", const="never", help="never compress"
    )
    send.add_argument(
        "--limit-rate",
        metavar="RATE",
        type=_rate,
        default=None,
        help="send at most RATE bytes per second on the wire (suffixes K, M, G: KiB/s, MiB/s, GiB/s)",
    )
    send.add_argument(
        "--confirm",
        action="store_true",
        help="ask before sending, once the receiver is known (by default only the receiver is asked)",
    )
    send.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="leave out the files and directories inside the given directories that cannot be "
        "read, listing them here and in the offer (by default one of them stops the send)",
    )
    send.add_argument(
        "--no-bob",
        action="store_true",
        help="never fall back to bob's format: a receiver that does not greet us is a failure, so "
        "no relay can pass itself off as a bob receiver (which cannot confirm what it got)",
    )
    send.add_argument(
        "--name", metavar="NAME", default="stdin", help="the name to offer for standard input (`-`; default: stdin)"
    )
    send.add_argument(
        "paths", nargs="*", metavar="PATH", help="files or directories to send; - reads standard input"
    )

    send.add_argument(
        "--qr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a generated code as a QR code too, on stderr (default: when stdout is a "
        "terminal); with a ws:// or wss:// relay it holds the browser link printed beside the "
        "peer recv line, which opens the relay's page with the code filled in",
    )

    recv = commands.add_parser("recv", help="receive files", description="Receive what a `peer send` offers.")
    common(recv)
    recv.add_argument(
        "-o", "--output", metavar="DEST", default=None,
        help="directory to save into (default: the current one); when one file is offered and DEST "
        "does not exist and does not end in /, the file is saved as DEST",
    )
    recv.add_argument(
        "--no-resume",
        action="store_true",
        help="start from scratch, and delete partial files on failure instead of keeping them to resume",
    )
    recv.add_argument(
        "--stdout",
        action="store_true",
        help="write the (single) file to standard output instead; messages stay on stderr, and "
        "the exit status says whether the bytes were verified",
    )
    existing = recv.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing files of the same name")
    existing.add_argument(
        "--rename",
        action="store_true",
        help="save an item whose name exists under the first free name instead, e.g. 'notes (1).txt'",
    )
    recv.add_argument(
        "--merge",
        action="store_true",
        help="write into offered top-level directories that exist already (existing files there "
        "are still refused unless --overwrite, which implies --merge)",
    )
    recv.add_argument(
        "--keep-modes",
        action="store_true",
        help="keep the sender's executable bits (by default no received file is executable)",
    )
    recv.add_argument(
        "--as-typed",
        action="store_true",
        help="try the code even if it looks like a generated one with a word outside the list "
        "(for a sender's own --password; otherwise such a code is questioned, or refused "
        "without a terminal, before it costs one of the sender's attempts)",
    )
    recv.add_argument("code", nargs="?", help=f"the code the sender printed (asked for if absent, or ${PASSWORD_ENV})")
    shell = commands.add_parser(
        "completion", help="print a shell completion script",
        description="Print a completion script for SHELL, generated from the options themselves, "
        "e.g. eval \"$(peer completion bash)\" in ~/.bashrc, or save it where the shell looks.",
    )
    shell.add_argument("shell", choices=completion.SHELLS, metavar="{bash,zsh,fish}")
    return parser


def _rate(text: str) -> float:
    """``--limit-rate``: ``500K``, ``2M``, ``1.5G`` or plain bytes per second."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    number, scale = text.strip(), 1
    if number[-1:].upper() in units:
        number, scale = number[:-1], units[number[-1].upper()]
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (try 500K or 2M)") from None
    if not 1 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (at least 1 byte per second)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "completion":
        sys.stdout.write(completion.script(args.shell, parser))
        return 0
    if args.secure_port is not None and not 0 < args.secure_port < 65536:
        print("peer: --secure-port must be between 1 and 65535", file=sys.stderr)
        return 2
    if args.max_attempts < 1:
        print("peer: --max-attempts must be at least 1", file=sys.stderr)
        return 2
    if args.command == "send" and (args.text is None) == (not args.paths):
        print("peer: give the paths to send, or --text MESSAGE (not both)", file=sys.stderr)
        return 2
    if args.command == "send" and "-" in args.paths and len(args.paths) > 1:
        print("peer: - (standard input) must be the only path", file=sys.stderr)
        return 2
    if args.command == "recv" and args.merge and args.rename:
        print("peer: --merge writes into an existing directory, --rename saves beside it: choose one",
              file=sys.stderr)
        return 2
    if args.command == "recv" and args.stdout and (
        args.output or args.overwrite or args.rename or args.merge or args.keep_modes
    ):
        print("peer: --stdout writes no file: -o, --overwrite, --rename, --merge and --keep-modes do not apply",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR, format="peer: %(message)s")
    keep_freed_memory()
    console = StatusConsole(StatusLine(quiet=args.quiet), quiet=args.quiet, assume_yes=args.yes)
    run = _send if args.command == "send" else _recv
    try:
        if args.command == "recv":
            args.code = _recv_code(args, console)
        return trio.run(run, args, console)
    except BaseException as error:  # noqa: B902 - unwrapped and re-raised below if unknown
        error = _sole(error)
        if isinstance(error, Failure):
            console.error(str(error))
            return error.status
        if isinstance(error, KeyboardInterrupt):
            console.error("interrupted")
            return 130
        raise error


def _sole(error: BaseException) -> BaseException:
    """The one real error inside the groups that trio's nurseries wrap errors in."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            inner = _sole(inner)
            if isinstance(inner, (Failure, KeyboardInterrupt)):
                return inner
    return error


def _relay_from(args) -> tuple[RelayAddress | None, bool]:
    """The configured relay, and whether it came from the environment."""
    text, from_env = args.relay, False
    if text is None and os.environ.get(RELAY_ENV):
        text, from_env = os.environ[RELAY_ENV], True
    if text is None:
        return None, False
    try:
        return parse_relay(text, secure_port=args.secure_port, cacert=args.cacert), from_env
    except AddressError as error:
        raise Failure(str(error)) from None


def _describe_handshake_event(console: Console, event: handshake.Event) -> None:
    if isinstance(event, handshake.AttemptFailed):
        what = ("had a different code" if event.kind == handshake.AttemptKind.WRONG_CODE
                else "abandoned the handshake after seeing our proof")
        console.warn(
            f"a receiver at {_show(event.partner_identity)} {what} "
            f"({event.attempts_used} of {event.attempts_allowed} attempts used): {event.reason}"
        )
    elif isinstance(event, handshake.ProofFailed) and event.failures > 1:
        # The first one is most likely our own typo, which the wrong-code message covers.
        console.warn(
            f"another sender, at {_show(event.partner_identity)}, failed to prove the code "
            f"({event.failures} of {event.failures_allowed} allowed): someone may be guessing it"
        )
    elif isinstance(event, handshake.Declined):
        console.info(f"{_show(event.partner_identity)} declined; still waiting")


def _notify(console: StatusConsole, waiting_for: str):
    """The handshake's events for the user; once the relay knows us, we wait for the peer."""

    def notify(event: handshake.Event) -> None:
        if isinstance(event, handshake.Registered):
            console.status.show(f"Waiting for the {waiting_for}...")
        _describe_handshake_event(console, event)

    return notify


BOB_ITERATIONS = 16
"""The PBKDF2 count in bob's public (ours uses spoke.DEFAULT_ITERATIONS)."""


def _is_bob(agreed) -> bool:
    """Whether the sender of this Agreed or Paired is bob's: it advertises ChaCha20 (2) for the
    receiver's direction, which cannot carry records (ours advertises AES-GCM, 0), and
    stretches the code 16 times. Only the count is bound by the handshake (the keys come
    from it): a relay can rewrite the cipher ids, so ChaCha20 with any other count is a
    rewritten public of our own sender, which must be greeted (docs/transfer.md)."""
    public = getattr(agreed, "public", None)
    return agreed.keys.ciphers[1] != 0 and (public is None or public.iterations == BOB_ITERATIONS)


def _public_rewritten(agreed) -> bool:
    """A public that asks for another cipher than AES-GCM yet is not bob's was rewritten."""
    return agreed.keys.ciphers != (0, 0) and not _is_bob(agreed)


def _show(identity: bytes) -> str:
    return transfer.printable(identity.decode("utf-8", "replace"))


# --- send -----------------------------------------------------------------------------------


async def _send(args, console: Console) -> int:
    try:
        if args.text is not None:
            selection = text_selection(args.text)
        elif args.paths == ["-"]:
            selection = stdin_selection(args.name)
        else:
            selection = scan(args.paths, skip_unreadable=args.skip_unreadable)
    except SourceError as error:
        raise Failure(str(error)) from None
    for warning in selection.warnings:
        console.warn(warning)
    if not selection.offer.entries and selection.offer.text is None:
        raise Failure("nothing to send")
    text = args.password or os.environ.get(PASSWORD_ENV) or None
    generated = text is None
    if generated:
        text = codes.generate_code()
    elif (suspect := codes.review_code(text)) is not None:
        console.warn(f"{text} looks like a generated code but {suspect.describe()}: the receiver "
                     "will be asked whether it is a typo, or need --as-typed without a terminal")
    password = codes.password_bytes(text)
    if not password:
        raise Failure("the code must not be empty")
    address, from_env = _relay_from(args)
    async with trio.open_nursery() as nursery:
        if address is None:
            address, shown = await _embedded_relay(nursery, args)
        else:
            shown = None if from_env else address

        # A WebSocket relay serves the browser peer: the link lets a phone or a browser receive.
        link = address.page_link(text if generated else None)

        async def announce() -> None:
            # Only once the relay answered: nobody reads a code aloud for a relay that is down.
            console.status.clear()
            _announce(console, text, generated, shown, link)
            if generated and (args.qr if args.qr is not None else sys.stdout.isatty() and not args.quiet):
                print(qr.render(link or text), end="", file=sys.stderr, flush=True)

        try:
            return await _send_through(address, password, selection, args, console, announce)
        finally:
            nursery.cancel_scope.cancel()


async def _embedded_relay(nursery: trio.Nursery, args) -> tuple[RelayAddress, RelayAddress]:
    """Run a relay in this process, on the usual ports if they are free, else on any."""
    # Imported here, like bob's format below: a peer that does not need them starts faster.
    from relay.server import ListenError, RelayConfig, serve

    from .lan import best_lan_address

    logging.getLogger("relay").setLevel(logging.ERROR)
    secure = args.secure_port or DEFAULT_SECURE_PORT
    try:
        ports = await nursery.start(partial(serve, RelayConfig(port=DEFAULT_PORT, secure_port=secure)))
    except ListenError:
        try:
            ports = await nursery.start(partial(serve, RelayConfig(port=0, secure_port=0)))
        except ListenError as error:
            raise Failure(f"cannot run a relay here: {error}") from None
    local = RelayAddress("127.0.0.1", ports.port, ports.secure_port)
    return local, RelayAddress(best_lan_address(), ports.port, ports.secure_port)


def _announce(console: Console, text: str, generated: bool, shown: RelayAddress | None,
              link: str | None = None) -> None:
    if generated:
        print(f"Code: {text}", flush=True)
    command = ["peer", "recv"]
    if shown is not None:
        command += ["--relay", str(shown)]
        if shown.secure_port != DEFAULT_SECURE_PORT:
            command += ["--secure-port", str(shown.secure_port)]
    command.append(text if generated else "<the code>")
    console.info("On the other machine run: " + " ".join(command))
    if link is not None:
        # A code the user chose is theirs to tell: it is not written into the link either.
        console.info(f"Or open in a browser: {link}" if generated
                     else f"Or open {link} in a browser and type the code there")


async def _send_through(address, password, selection, args, console: Console, announce) -> int:
    machine = handshake.SenderHandshake(password, max_attempts=args.max_attempts)
    console.status.show(f"Connecting to the relay at {address}...")
    try:
        meeting = await meet(address, machine, notify=_notify(console, "receiver"),
                             on_registered=announce)
    except (RelayError, HandshakeFailed) as error:
        raise Failure(str(error)) from None
    keys = meeting.paired.keys
    partner = _show(meeting.paired.partner_identity)
    check = transfer.verification_string(keys.sender_to_receiver)
    channel = Channel(
        meeting.stream,
        send_key=keys.sender_to_receiver,
        receive_key=keys.receiver_to_sender,
        send_cipher=keys.ciphers[0],
        receive_cipher=keys.ciphers[1],
    )

    console.status.show(f"Waiting for {partner} to greet us (verification {check})...")

    async def confirm() -> bool:
        summary = selection.offer.summary()
        # Only with --confirm: a sender who read the code aloud and walked away must not
        # stall the transfer. Standard input carries the data, so it cannot carry an answer too.
        if args.confirm and not console.assume_yes and console.interactive and args.paths != ["-"]:
            if not await console.ask(f"Send {summary} to {partner}? Verification {check}."):
                return False
        else:
            console.info(f"Sending {summary} to {partner} (verification {check})")
        console.status.show(f"Waiting for the receiver to accept (verification {check})...")
        return True

    def make_progress() -> Progress:
        total = selection.offer.total_bytes if selection.offer.sizes_known else None
        console.status.hand_over(f"Sending {selection.offer.summary()}...")
        return Progress(total, label="Sending", quiet=args.quiet, files=selection.offer.file_count)

    greeted_late = False

    async def to_bob(session: transfer.SenderSession) -> transfer.Completed | None:
        nonlocal greeted_late
        if selection.offer.text is not None:
            raise TransferFailed(f"{partner} is a bob receiver, which cannot receive a text message")
        if not selection.offer.sizes_known:
            raise TransferFailed(
                f"{partner} is a bob receiver, which needs the size in advance: it cannot receive a pipe"
            )
        console.info(f"{partner} is a bob receiver: sending bob's format")
        from .bob import send_pack

        try:
            return await send_pack(channel, selection, args.paths, session=session, make_progress=make_progress)
        finally:
            greeted_late = session.hello is not None

    try:
        done = await send_selection(
            channel,
            selection,
            confirm=confirm,
            make_progress=make_progress,
            to_bob=None if args.no_bob else to_bob,
            bob_wait=HELLO_TIMEOUT if args.no_bob else BOB_WAIT,
            public=meeting.paired.public.encode() if meeting.paired.public is not None else None,
            compress=args.compress,
            limit_rate=args.limit_rate,
        )
    except TransferFailed as error:
        await channel.abort()
        raise Failure(str(error)) from None
    await channel.close()
    if done is None:
        # Only a close after the last record: no proof, and a relay could fake it.
        who = "the receiver (an older peer-relay) closed" if greeted_late else "bob's receiver closed"
        cannot = "it cannot confirm" if greeted_late else "bob cannot confirm"
        console.info(
            f"Sent {selection.offer.summary()}; {who} the connection after the "
            f"last byte ({cannot} what it wrote)."
        )
        return 0
    if selection.offer.text is not None:
        console.info("Sent the text message; the receiver confirmed it.")
        return 0
    wire = ""
    if channel.bytes_sent < done.total_bytes:
        wire = f", {transfer.format_size(channel.bytes_sent)} on the wire"
    console.info(
        f"Sent {done.file_count} file{'s' if done.file_count != 1 else ''} "
        f"({transfer.format_size(done.total_bytes)}{wire}); the receiver confirmed every byte."
    )
    return 0


# --- recv -----------------------------------------------------------------------------------


async def _ask_watching(console: StatusConsole, question: str, channel: Channel) -> bool:
    """Ask, while watching the room: a sender that leaves (or stops) while the question is
    open ends it at once instead of after the answer."""
    answer: list[bool] = []
    gone: list[TransferFailed] = []
    async with trio.open_nursery() as nursery:

        async def ask() -> None:
            answer.append(await console.ask(question))
            nursery.cancel_scope.cancel()

        async def watch() -> None:
            try:
                record = await channel.receive()
            except (ChannelClosed, ChannelBroken) as error:
                gone.append(lost(error, "the sender", "while the offer was shown"))
                nursery.cancel_scope.cancel()
                return
            try:
                message = messages.decode_message(record)
            except transfer.ProtocolError:
                message = None
            if isinstance(message, messages.Error):
                gone.append(TransferFailed(f"the sender stopped: {transfer.printable(message.reason)}"))
                nursery.cancel_scope.cancel()
                return
            channel.hold(record)  # not ours to judge: the session reads it after the answer

        nursery.start_soon(ask)
        nursery.start_soon(watch)
    if gone:
        print(file=sys.stderr, flush=True)  # off the unanswered prompt's line
        raise gone[0]
    return answer[0]


def _recv_code(args, console: Console) -> str | None:
    """The code to try, settled before anything reaches the relay: a code shaped like ours
    with a word outside the list (``codes.review_code``) would spend one of the sender's
    few attempts, so a terminal is asked about it and anything else refuses it.

    Runs before trio, so that the ``Code:`` prompt's line editing owns the main thread.
    """
    text = args.code or os.environ.get(PASSWORD_ENV) or None
    if _relay_from(args)[0] is None:
        return text  # _recv says what is missing first
    while True:
        if not text:
            if not console.interactive:
                return None
            try:
                text = console.read_code_line(codes.completions)
            except EOFError:
                raise Failure("no code given") from None
        suspect = None if args.as_typed else codes.review_code(text)
        if suspect is None:
            return text
        if not console.interactive:
            fix = f"; did you mean {suspect.correction}?" if suspect.correction else ""
            raise Refused(
                f"not trying {suspect.typed}: {suspect.describe()}{fix} (nothing was sent; "
                "if the sender chose exactly this code, add --as-typed)"
            )
        console.warn(suspect.describe())
        if suspect.correction is not None and console.ask_now(f"Did you mean {suspect.correction}?"):
            return suspect.correction
        if console.ask_now(f"Try {suspect.typed} as typed? A wrong code costs one of the sender's attempts",
                           default=False):
            return text
        text = None


async def _recv(args, console: Console) -> int:
    address, _ = _relay_from(args)
    if address is None:
        raise Failure(
            f"no relay given: pass --relay ADDR or set {RELAY_ENV} "
            "(the sender printed the command to type)"
        )
    text = args.code  # settled by _recv_code before trio started, $PEER_PASSWORD included
    if not text:
        raise Failure("no code given")
    hint = codes.check_code(text) if codes.review_code(text) is None else None  # else asked already
    if hint:
        console.warn(hint)
    password = codes.password_bytes(text)
    if not password:
        raise Failure("the code must not be empty")
    if args.stdout:
        return await _receive_into(address, password, StreamDestination(), args, console)
    output = Path(args.output or ".")
    made_output = not output.exists()
    options = dict(overwrite=args.overwrite, rename=args.rename, merge=args.merge,
                   keep_modes=args.keep_modes, resume=not args.no_resume)
    try:
        if args.output and names_a_file(args.output):
            destination = OutputDestination(output, **options)  # a file's new name, or a directory
        else:
            output.mkdir(parents=True, exist_ok=True)
            destination = Destination(output, **options)
    except (OSError, DestinationError) as error:
        raise Failure(f"cannot use {output} as the destination: {getattr(error, 'strerror', None) or error}") from None
    try:
        return await _receive_into(address, password, destination, args, console)
    finally:
        if made_output:
            try:
                output.rmdir()  # only if still empty: nothing was received
            except OSError:
                pass


async def _receive_into(address, password, destination, args, console: Console) -> int:

    async def decide_agreement(agreed: handshake.Agreed) -> bool:
        if not _is_bob(agreed):
            # Ours: the user decides once the offer has arrived, which a sender run with
            # --confirm sends only once its user said yes.
            check = transfer.verification_string(agreed.keys.sender_to_receiver)
            console.status.show(f"Waiting for the sender to confirm (verification {check})...")
            return True
        # bob's data carries no offer: like bob, ask before the room opens.
        who = _show(agreed.partner_identity)
        console.status.end()
        if console.assume_yes:
            console.info(f"Accepting bob's sender at {who}")
            return True
        return await console.ask(f"Accept from {who} (a bob sender)?")

    machine = handshake.ReceiverHandshake(password, max_attempts=args.max_attempts)
    console.status.show(f"Connecting to the relay at {address}...")
    try:
        meeting = await meet(address, machine, notify=_notify(console, "sender"), decide=decide_agreement)
    except (RelayError, HandshakeFailed) as error:
        raise Failure(str(error)) from None
    keys = meeting.paired.keys
    partner = _show(meeting.paired.partner_identity)
    check = transfer.verification_string(keys.sender_to_receiver)
    bob = _is_bob(meeting.paired)
    if _public_rewritten(meeting.paired):
        console.warn("the sender's parameters were altered on the way (cipher ids "
                     f"{keys.ciphers[0]}, {keys.ciphers[1]} without bob's PBKDF2 count): "
                     "treating it as a peer-relay sender")
    channel = Channel(
        meeting.stream,
        send_key=keys.receiver_to_sender,
        receive_key=keys.sender_to_receiver,
        # AES-GCM both ways whatever the public says: it is what our senders and bob's seal
        # with, and the cipher ids are not bound by the handshake. (bob's cipher1 cannot
        # seal records anyway: we never send it any, only the raw close marker.)
        send_cipher=0,
        receive_cipher=0,
    )

    async def decide(offer: transfer.Offer) -> bool:
        console.status.end()  # the wait is over: the offer and the question take its place
        console.info(f"{partner} offers {offer.summary()} (verification {check})")
        for line in offer.listing():
            console.info(line)
        if console.assume_yes:
            return True
        return await _ask_watching(console, "Accept?", channel)

    def make_progress(offer: transfer.Offer) -> Progress:
        total = offer.total_bytes if offer.sizes_known else None
        console.status.hand_over(f"Receiving {offer.summary()}...")
        return Progress(total, label="Receiving", quiet=args.quiet, files=offer.file_count)

    text_received = False

    def show_text(text: str) -> None:
        nonlocal text_received
        text_received = True
        # The message is the sender's: on a terminal, nothing in it may move the cursor or
        # recolour the screen. A pipe gets it exactly as sent.
        if sys.stdout.isatty():
            text = "\n".join(transfer.printable(line.replace("\t", "    ")) for line in text.split("\n"))
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()

    def announce(offer: transfer.Offer) -> None:
        console.info(f"{partner} sends {offer.summary()}")
        for line in offer.listing():
            console.info(line)

    try:
        if bob:
            from .bob import receive_pack

            offer = await receive_pack(channel, destination, announce=announce, make_progress=make_progress)
            done = transfer.TransferDone(offer.file_count, offer.total_bytes)
        else:
            done = await receive_offer(
                channel, destination, decide=decide, make_progress=make_progress, show_text=show_text,
                sender_public=meeting.paired.public.encode() if meeting.paired.public is not None else None,
            )
    except TransferFailed as error:
        await channel.abort()
        if destination.kept_partial:
            raise Failure(f"{error}; the partial download is kept: run the same command again to resume it") from None
        raise Failure(str(error)) from None
    await channel.close()
    if done.file_count or not text_received:
        console.info(
            f"Received {done.file_count} file{'s' if done.file_count != 1 else ''} "
            f"({transfer.format_size(done.total_bytes)}) "
            + ("to standard output" if args.stdout
               else f"as {args.output}" if destination.as_file
               else f"into {args.output or '.'}")
        )
    for offered, local in destination.renamed.items():
        console.info(f"{transfer.printable(offered)} existed already: saved as {transfer.printable(local)}")
    return 0
