"""``peer-relay``: run the relay daemon from the command line or as a systemd service.

Options come from ``relay.config`` (defaults, then the TOML file, then the flags). Under
systemd the relay takes its listening sockets from socket activation, says READY, STOPPING
and RELOADING itself and pings the watchdog (``relay.systemd``); started by hand it binds
its own sockets and all of that is skipped.

Signals: SIGTERM or SIGINT stop gracefully (open rooms get ``--shutdown-grace``); a second
one ends the rooms at once. SIGHUP re-reads the configuration file and applies what can
change live; a file with an error is reported and the running configuration kept.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

import trio

from relay import config, logs, systemd
from relay.server import ListenError, RelayServer
from relay.transports import CertificateError, server_tls_context

PROG = "peer-relay"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("relay")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Relay for peer send / peer recv (and bob): pairs senders with receivers on the "
            "handshake port, then pipes their end-to-end encrypted bytes blindly on the "
            "secure-room port. Stop it with Ctrl-C or SIGTERM; SIGHUP reloads the "
            "configuration file."
        ),
        epilog=f"Every option can also be set in the configuration file (default "
               f"{config.DEFAULT_PATH}, read if it exists), under its long name without the "
               f"dashes in front: hello-timeout = 30. Flags override the file.",
    )
    parser.add_argument(
        "--config", metavar="FILE",
        help=f"TOML configuration file (default: {config.DEFAULT_PATH} if it exists)")
    parser.add_argument(
        "--check-config", action="store_true",
        help="check the configuration (file, flags, TLS certificate) and exit: 0 if it is "
             "good, 2 with the file and line of the first error if not")
    config.add_arguments(parser)
    from peer.version import VersionAction  # the one distribution's version, looked up when asked
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument("-v", "--verbose", dest="log_level", action="store_const",
                        const="debug", default=argparse.SUPPRESS,
                        help="log every packet-level decision (--log-level debug)")
    parser.add_argument("-q", "--quiet", dest="log_level", action="store_const",
                        const="warning", default=argparse.SUPPRESS,
                        help="log only warnings and errors (--log-level warning)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = config.from_arguments(args)
    path = config.config_path(args.config)
    try:
        settings = config.load(path, overrides)
        if args.check_config and settings.relay.tls_cert is not None:
            _check_certificate(settings)
    except config.ConfigError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.check_config:
        where = f"{path}" if path is not None else "defaults and flags (no configuration file)"
        print(f"{PROG}: configuration OK: {where}")
        return EXIT_OK
    logs.configure(settings.log)
    try:
        sockets = systemd.listen_sockets()
    except systemd.ActivationError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return EXIT_FAILED
    reloader = _Reloader(args.config, overrides, settings)
    try:
        error = trio.run(_run, settings, sockets, reloader)
    except KeyboardInterrupt:  # a Ctrl-C that came before the signal handlers were in place
        return EXIT_OK
    if error is not None:
        print(f"{PROG}: {error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _check_certificate(settings: config.Settings) -> None:
    try:
        server_tls_context(settings.relay.tls_cert, settings.relay.tls_key)
    except CertificateError as error:
        raise config.ConfigError(str(error), option="tls-cert") from None


class _Reloader:
    """Re-reads the configuration on SIGHUP and hands the server what it can take live."""

    def __init__(self, explicit: str | None, overrides: dict[str, Any],
                 settings: config.Settings) -> None:
        self.explicit = explicit
        self.overrides = overrides
        self.current = settings

    def reload(self, server: RelayServer) -> None:
        path = config.config_path(self.explicit)
        try:
            new = config.load(path, self.overrides)
        except config.ConfigError as error:
            log.error("reload: %s; the running configuration is kept", error)
            return
        try:
            tls_toggled = "tls_cert" in server.reconfigure(new.relay)
        except CertificateError as error:
            log.error("reload: %s; the running configuration is kept", error)
            return
        logs.configure(new.log)
        applied, needs_restart = config.live_changes(self.current.values, new.values)
        if tls_toggled:
            needs_restart.append("tls-cert (turning TLS on or off)")
        source = path if path is not None else "the command line (no configuration file)"
        log.info("configuration reloaded from %s: %s", source,
                 f"changed {', '.join(applied)}" if applied else "no live option changed")
        if needs_restart:
            log.warning("reload: %s changed but take effect only after a restart",
                        ", ".join(needs_restart))
        self.current = new


async def _run(settings: config.Settings, sockets: dict, reloader: _Reloader) -> str | None:
    """Serve until a signal stops the relay; return an error message if it cannot start."""
    notifier = systemd.Notifier()
    stop = trio.Event()
    server = RelayServer(settings.relay, sockets=sockets)
    try:
        # Catch the signals before listening, so that one arriving during start-up still
        # stops the relay cleanly.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                async def run_server(task_status=trio.TASK_STATUS_IGNORED) -> None:
                    await server.run(stop=stop, task_status=task_status)
                    nursery.cancel_scope.cancel()  # stopped: the signal loop is done too

                try:
                    ports = await nursery.start(run_server)
                except ListenError as error:
                    return error.strerror
                except CertificateError as error:
                    return str(error)
                # Printed even with -q: scripts that ask for port 0 read the real ports here.
                print(f"{PROG}: listening on {ports.describe()}", flush=True)
                notifier.ready(f"listening on {ports.describe()}")
                interval = systemd.watchdog_interval()
                if interval is not None and notifier.enabled:
                    nursery.start_soon(_watchdog, notifier, interval)
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        log.info("%s received: reloading the configuration", name)
                        notifier.reloading()
                        reloader.reload(server)
                        notifier.ready(f"listening on {ports.describe()}")
                    elif not stop.is_set():
                        log.info("%s received: stopping (open rooms get up to %g s; send it "
                                 "again to end them now)", name, server.config.shutdown_grace)
                        notifier.stopping("stopping: letting open rooms finish")
                        stop.set()
                    else:
                        log.info("%s received again: ending open rooms now", name)
                        nursery.cancel_scope.cancel()
        return None
    finally:
        notifier.close()


async def _watchdog(notifier: systemd.Notifier, interval: float) -> None:
    """Tell systemd the event loop is alive; if the loop hangs, the pings stop with it."""
    while True:
        notifier.watchdog()
        await trio.sleep(interval)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
