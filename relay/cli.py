"""``peer-relay``: run the relay daemon from the command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from relay.server import DEFAULT_HOSTS, ListenError, RelayConfig, serve
from relay.transports import CertificateError, trusted_network

PROG = "peer-relay"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535: {text!r}")
    return value


def _network(text: str):
    try:
        return trusted_network(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    defaults = RelayConfig()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Relay for peer send / peer recv (and bob): pairs senders with receivers on the "
            "handshake port, then pipes their end-to-end encrypted bytes blindly on the "
            "secure-room port. Stop it with Ctrl-C or SIGTERM."
        ),
    )
    parser.add_argument(
        "--host", dest="hosts", action="append", metavar="ADDR",
        help="address to listen on; repeat for several (default: every IPv4 and IPv6 "
             "interface, i.e. 0.0.0.0 and ::)",
    )
    parser.add_argument(
        "--port", type=_port, default=defaults.port,
        help="handshake port (default: %(default)s; 0 picks a free port)",
    )
    parser.add_argument(
        "--secure-port", type=_port, default=defaults.secure_port,
        help="secure-room port, where paired peers exchange their data "
             "(default: %(default)s; 0 picks a free port)",
    )
    parser.add_argument(
        "-t", "--timeout", type=_seconds, default=defaults.timeout, metavar="SECONDS",
        help="how long a peer may stay on the handshake port, from connect, before it is "
             "timed out (default: %(default)s, as bob)",
    )
    parser.add_argument(
        "--hello-timeout", type=_seconds, default=defaults.hello_timeout, metavar="SECONDS",
        help="how long a new connection has to say Hello (default: %(default)s)",
    )
    parser.add_argument(
        "--room-timeout", type=_seconds, default=defaults.room_timeout, metavar="SECONDS",
        help="how long a secure-room connection has to name its partner, and both peers "
             "have to join their room after the receiver accepts (default: %(default)s)",
    )
    parser.add_argument(
        "--ws-port", type=_port, default=None, metavar="PORT",
        help="also serve both protocols over WebSocket on this port, at the paths /handshake "
             "and /room, for peers behind proxies that only let HTTP(S) out "
             "(default: off; 0 picks a free port)",
    )
    parser.add_argument(
        "--tls-cert", metavar="FILE",
        help="PEM certificate chain: every port then speaks TLS (the WebSocket port wss://); "
             "peers use tls://HOST:PORT or wss://HOST:PORT/",
    )
    parser.add_argument(
        "--tls-key", metavar="FILE",
        help="PEM private key of --tls-cert, if it is not in the same file",
    )
    parser.add_argument(
        "--trust-proxy", dest="trusted_proxies", action="append", type=_network, default=[],
        metavar="ADDR",
        help="a reverse proxy (address or network, e.g. 127.0.0.1 or 10.0.0.0/8) whose "
             "X-Real-IP / X-Forwarded-For headers name the WebSocket peers it forwards; "
             "repeat for several. From anyone else these headers are ignored",
    )
    parser.add_argument(
        "--upgrade-timeout", type=_seconds, default=defaults.upgrade_timeout, metavar="SECONDS",
        help="how long a new connection has to finish its TLS handshake and WebSocket "
             "upgrade (default: %(default)s)",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true",
                           help="log every packet-level decision (debug)")
    verbosity.add_argument("-q", "--quiet", action="store_true",
                           help="log only warnings and errors")
    return parser


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("relay")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


async def _run(config: RelayConfig) -> str | None:
    """Serve until SIGINT or SIGTERM; return an error message if the relay cannot start."""
    stop = trio.Event()
    # Catch the signals before listening, so that one arriving during start-up still stops
    # the relay cleanly.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                ports = await nursery.start(lambda task_status: serve(
                    config, stop=stop, task_status=task_status))
            except ListenError as error:
                return error.strerror
            except CertificateError as error:
                return str(error)
            # Printed even with -q: scripts that ask for port 0 read the real ports here.
            print(f"{PROG}: listening on {ports.describe()}", flush=True)
            async for signum in signals:
                logging.getLogger("relay").info("%s received", signal.Signals(signum).name)
                stop.set()
                break
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        config = RelayConfig(
            hosts=tuple(args.hosts) if args.hosts else DEFAULT_HOSTS,
            port=args.port,
            secure_port=args.secure_port,
            timeout=args.timeout,
            hello_timeout=args.hello_timeout,
            room_timeout=args.room_timeout,
            ws_port=args.ws_port,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            trusted_proxies=tuple(args.trusted_proxies),
            upgrade_timeout=args.upgrade_timeout,
        )
    except ValueError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    try:
        error = trio.run(_run, config)
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        return 0
    if error is not None:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    return 0
