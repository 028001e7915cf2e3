"""Every relay option, once: its command-line flag, its key in the TOML file, its check.

The file uses the long option names as keys, at the top level (``hello-timeout = 30`` is
``--hello-timeout 30``); options that repeat on the command line are arrays there. Values
come from the defaults, then the file, then the command line, each overriding the one
before. Errors in the file name the file and the line (TOML's own errors give the column
too), so that ``peer-relay --check-config`` can be run before a restart or a reload.

``Option.live`` says whether a running relay takes the option from the file on SIGHUP;
the others (the sockets and the metrics address) need a restart.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Callable

import attrs

from relay.limits import Limits
from relay.logs import FORMATS, LEVELS, LogSettings

DEFAULT_PATH = Path("/etc/peer-relay/peer-relay.toml")
"""Read when it exists and no ``--config`` is given."""


class ConfigError(ValueError):
    """A bad option value or file; ``str()`` is ``FILE:LINE[:COLUMN]: message``."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 line: int | None = None, column: int | None = None,
                 option: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)
        self.line = line
        self.column = column
        self.option = option

    def __str__(self) -> str:
        where = [part for part in (self.path, self.line, self.column) if part is not None]
        prefix = ":".join(str(part) for part in where)
        return f"{prefix}: {self.message}" if prefix else self.message


# -- value kinds: one check for the command line (text) and the file (TOML values) ----------


def _number(value: Any, text_to: Callable[[str], Any], what: str) -> Any:
    if isinstance(value, str):
        try:
            return text_to(value.strip())
        except ValueError:
            raise ValueError(f"not {what}: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be {what}, not {_toml_type(value)}")
    return value


def _toml_type(value: Any) -> str:
    return {bool: "true/false", str: "a string", list: "an array", dict: "a table",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def seconds(value: Any) -> float:
    number = float(_number(value, float, "a number of seconds"))
    if not number > 0 or number == float("inf"):
        raise ValueError(f"must be a positive number of seconds, not {value!r}")
    return number


def port(value: Any) -> int:
    number = _number(value, int, "a port number")
    if isinstance(number, float) or not 0 <= number <= 65535:
        raise ValueError(f"must be a port number 0-65535, not {value!r}")
    return number


def count(value: Any) -> int:
    number = _number(value, int, "a whole number")
    if isinstance(number, float) or number < 0:
        raise ValueError(f"must be a whole number, 0 or more, not {value!r}")
    return number


def rate(value: Any) -> float:
    number = float(_number(value, float, "a number"))
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"must be a number, 0 or more, not {value!r}")
    return number


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, not {_toml_type(value)}")
    return value


def host(value: Any) -> str:
    return text(value).strip()


def network(value: Any) -> str:
    name = text(value).strip()
    try:
        ipaddress.ip_network(name, strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or network: {value!r}") from None
    return name


def endpoint(value: Any) -> tuple[str, int]:
    """``ADDR:PORT`` (``[v6]:PORT`` for IPv6)."""
    spec = text(value).strip()
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", spec)
    if not match:
        raise ValueError(f"must be ADDR:PORT (e.g. 127.0.0.1:9100 or [::1]:9100), not {value!r}")
    address = match[1] or match[3]
    return address, port(match[2] or match[4])


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"must be true or false, not {_toml_type(value)}")


def choice(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        word = text(value).strip().lower()
        if word not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, not {value!r}")
        return word
    check.__name__ = "choice"
    return check


@attrs.frozen
class Option:
    name: str
    """The long flag without ``--``, and the key in the file."""
    check: Callable[[Any], Any]
    default: Any
    help: str
    live: bool
    """Taken from the file again on SIGHUP."""
    metavar: str | None = None
    repeat: bool = False
    """A repeatable flag and an array in the file."""
    optional: bool = False
    """May be left unset (None)."""
    short: str | None = None
    """A one-letter flag too (``-t``)."""

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def convert(self, value: Any) -> Any:
        if self.repeat:
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(self.check(item) for item in value)
        return self.check(value)


_LIMITS = Limits()

OPTIONS: tuple[Option, ...] = (
    Option("host", host, ("0.0.0.0", "::"), "address to listen on; repeat for several "
           "(default: every IPv4 and IPv6 interface, i.e. 0.0.0.0 and ::)", False, "ADDR",
           repeat=True),
    Option("port", port, 9000, "handshake port (default: %(default)s; 0 picks a free port)",
           False, "PORT"),
    Option("secure-port", port, 9001, "secure-room port, where paired peers exchange their "
           "data (default: %(default)s; 0 picks a free port)", False, "PORT"),
    Option("ws-port", port, None, "also serve both protocols over WebSocket on this port, at "
           "the paths /handshake and /room (default: off; 0 picks a free port)", False, "PORT",
           optional=True),
    Option("web-app", boolean, True, "serve the browser peer's page on the WebSocket port, at "
           "/ (default: on; --no-web-app answers every page request with 404)", True),
    Option("tls-cert", text, None, "PEM certificate chain: every port then speaks TLS (the "
           "WebSocket port wss://); re-read on SIGHUP", True, "FILE", optional=True),
    Option("tls-key", text, None, "PEM private key of --tls-cert, if it is not in the same "
           "file", True, "FILE", optional=True),
    Option("trust-proxy", network, (), "a reverse proxy (address or network) whose X-Real-IP "
           "/ X-Forwarded-For headers name the WebSocket peers it forwards; repeat for "
           "several", True, "ADDR", repeat=True),
    Option("timeout", seconds, 3600.0, "how long a peer may stay on the handshake port, from "
           "connect (default: %(default)s, as bob)", True, "SECONDS", short="-t"),
    Option("hello-timeout", seconds, 30.0, "how long a new connection has to say Hello "
           "(default: %(default)s)", True, "SECONDS"),
    Option("room-timeout", seconds, 60.0, "how long a secure-room connection has to name its "
           "partner, and both peers have to join their room (default: %(default)s)", True,
           "SECONDS"),
    Option("upgrade-timeout", seconds, 10.0, "how long a new connection has to finish its TLS "
           "handshake and WebSocket upgrade (default: %(default)s)", True, "SECONDS"),
    Option("max-outbox", count, 64 * 1024, "bytes a handshake peer may leave unread before "
           "it is cut off as too slow (default: %(default)s)", True, "BYTES"),
    Option("shutdown-grace", seconds, 30.0, "on SIGTERM, how long open rooms may go on "
           "before they are ended (default: %(default)s)", True, "SECONDS"),
    Option("max-connections", count, _LIMITS.max_connections, "open connections on all "
           "ports together; 0: no limit (default: %(default)s)", True, "N"),
    Option("max-connections-per-address", count, _LIMITS.max_connections_per_address,
           "open connections from one IPv4 address or IPv6 /64; 0: no limit "
           "(default: %(default)s)", True, "N"),
    Option("hello-rate", rate, _LIMITS.hello_rate, "Hellos per second one address may send, "
           "sustained; 0: no limit (default: %(default)s)", True, "PER_SECOND"),
    Option("hello-burst", count, _LIMITS.hello_burst, "Hellos one address may send at once "
           "before --hello-rate applies (default: %(default)s)", True, "N"),
    Option("max-rooms", count, _LIMITS.max_rooms, "open secure rooms; 0: no limit "
           "(default: %(default)s)", True, "N"),
    Option("room-rate", count, _LIMITS.room_rate, "bytes per second one room may carry, both "
           "directions together; 0: no limit (default: %(default)s)", True, "BYTES"),
    Option("max-failed-handshakes-per-address", count,
           _LIMITS.max_failed_handshakes_per_address, "handshakes from one IPv4 address or "
           "IPv6 /64 that may end without an agreement within --failed-handshake-window, open "
           "ones included; past it the relay refuses its new ones; 0: no limit "
           "(default: %(default)s)", True, "N"),
    Option("max-failed-handshakes-per-sender", count,
           _LIMITS.max_failed_handshakes_per_sender, "the same for one waiting sender, from "
           "every address together; 0: no limit (default: %(default)s)", True, "N"),
    Option("failed-handshake-window", seconds, _LIMITS.failed_handshake_window, "how long a "
           "failed handshake counts against its address and its sender "
           "(default: %(default)s)", True, "SECONDS"),
    Option("max-senders-per-nameplate", count, _LIMITS.max_senders_per_nameplate, "senders "
           "that may wait with one nameplate; one more is refused; 0: no limit "
           "(default: %(default)s)", True, "N"),
    Option("limit-exempt", network, tuple(str(n) for n in _LIMITS.exempt), "addresses or "
           "networks not counted per address (default: 127.0.0.0/8 and ::1); repeat for "
           "several", True, "ADDR", repeat=True),
    Option("metrics", endpoint, None, "serve Prometheus metrics over HTTP at "
           "http://ADDR:PORT/metrics (default: off)", False, "ADDR:PORT", optional=True),
    Option("log-level", choice(*LEVELS), "info", "debug, info, warning or error "
           "(default: %(default)s)", True, "LEVEL"),
    Option("log-format", choice(*FORMATS), "plain", "plain lines or json lines "
           "(default: %(default)s)", True, "FORMAT"),
    Option("anonymize-addresses", boolean, False, "log IP addresses as their /24 (IPv4) or "
           "/48 (IPv6) network and a hash that changes with every start", True),
)
BY_NAME = {option.name: option for option in OPTIONS}


@attrs.frozen
class Settings:
    """Everything a relay process runs with."""

    relay: Any
    """A ``relay.server.RelayConfig``."""
    log: LogSettings
    values: dict[str, Any] = attrs.field(eq=False, repr=False)
    """Option name to value, as merged."""


# -- the file ---------------------------------------------------------------------------------


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """The options set in a TOML file, checked (option name to value)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read the configuration: {(error.strerror or str(error)).lower()}",
                          path=path) from None
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise ConfigError("not UTF-8 text", path=path, line=line) from None
    try:
        table = tomllib.loads(source)
    except tomllib.TOMLDecodeError as error:
        raise _syntax_error(error, path, source) from None
    values: dict[str, Any] = {}
    for key, value in table.items():
        option = BY_NAME.get(key)
        line = _line_of(source, key)
        if option is None:
            raise ConfigError(_unknown(key, value), path=path, line=line, option=key)
        try:
            values[key] = option.convert(value)
        except ValueError as error:
            raise ConfigError(f"{key}: {error}", path=path, line=line, option=key) from None
    return values


def _unknown(key: str, value: Any) -> str:
    if isinstance(value, dict):
        return (f"unknown section {key!r}: options are set at the top level, e.g. "
                f"'max-rooms = 100', not in [sections]")
    close = difflib.get_close_matches(key.replace("_", "-"), BY_NAME, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown option {key!r}{hint}"


def _syntax_error(error: tomllib.TOMLDecodeError, path: str | os.PathLike, source: str) -> ConfigError:
    message = str(error)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        return ConfigError(f"invalid TOML: {message[:match.start()].strip().lower()}", path=path,
                           line=int(match[1]), column=int(match[2]))
    match = re.search(r"\s*\(at end of document\)$", message)
    if match:
        return ConfigError(f"invalid TOML: {message[:match.start()].strip().lower()} "
                           "at the end of the file", path=path, line=source.rstrip().count("\n") + 1)
    return ConfigError(f"invalid TOML: {message}", path=path)


def _line_of(source: str, key: str) -> int | None:
    """The line where ``key`` is set (or its [section] opens): tomllib does not say."""
    quoted = re.escape(key)
    pattern = re.compile(
        rf"^[ \t]*(?:\[[ \t]*)?(?:{quoted}|\"{quoted}\"|'{quoted}')[ \t]*(?:=|\.|\])", re.MULTILINE)
    # The first match wins: TOML forbids setting a key twice. A line inside a multi-line
    # string that happens to look like "key =" could fool it; no option needs such strings.
    match = pattern.search(source)
    return source.count("\n", 0, match.start()) + 1 if match else None


# -- the command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option. Unset flags are left out of the result (``SUPPRESS``), so that
    only what the command line says overrides the file."""
    for option in OPTIONS:
        flag = f"--{option.name}"
        help_text = option.help % {"default": _show(option.default)} if "%(default)" in option.help else option.help
        if option.check is boolean:
            parser.add_argument(flag, dest=option.dest, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        flags = [option.short, flag] if option.short else [flag]
        parser.add_argument(
            *flags, dest=option.dest, metavar=option.metavar, type=_flag_type(option),
            action="append" if option.repeat else "store", default=argparse.SUPPRESS,
            help=help_text)


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _flag_type(option: Option) -> Callable[[str], Any]:
    def convert(value: str) -> Any:
        try:
            return option.check(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    convert.__name__ = option.name  # argparse names the type in some messages
    return convert


def from_arguments(namespace: argparse.Namespace) -> dict[str, Any]:
    """The options the command line set (option name to value)."""
    values = {}
    for option in OPTIONS:
        if hasattr(namespace, option.dest):
            value = getattr(namespace, option.dest)
            values[option.name] = tuple(value) if option.repeat else value
    return values


# -- merging ---------------------------------------------------------------------------------


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Defaults, then each layer in turn (a later one wins)."""
    values = {option.name: option.default for option in OPTIONS}
    for layer in layers:
        values.update(layer)
    return values


def build(values: dict[str, Any], *, path: str | os.PathLike | None = None,
          source: str | None = None) -> Settings:
    """Check the options together and make the settings; errors name the option (and its
    line in ``path`` when ``source``, the file's text, is given)."""
    from relay.server import RelayConfig  # the server imports this module's users

    def fail(option: str, message: str) -> ConfigError:
        line = _line_of(source, option) if source is not None else None
        return ConfigError(f"{option}: {message}", path=path if line else None, line=line,
                           option=option)

    if values["tls-key"] is not None and values["tls-cert"] is None:
        raise fail("tls-key", "a TLS key needs a certificate (tls-cert)")
    if values["hello-rate"] and not values["hello-burst"]:
        raise fail("hello-burst", "must be at least 1 when hello-rate is set")
    try:
        limits = Limits(
            max_connections=values["max-connections"],
            max_connections_per_address=values["max-connections-per-address"],
            hello_rate=values["hello-rate"],
            hello_burst=values["hello-burst"],
            max_rooms=values["max-rooms"],
            room_rate=values["room-rate"],
            exempt=values["limit-exempt"],
            max_failed_handshakes_per_address=values["max-failed-handshakes-per-address"],
            max_failed_handshakes_per_sender=values["max-failed-handshakes-per-sender"],
            failed_handshake_window=values["failed-handshake-window"],
            max_senders_per_nameplate=values["max-senders-per-nameplate"],
        )
        relay = RelayConfig(
            hosts=values["host"],
            port=values["port"],
            secure_port=values["secure-port"],
            ws_port=values["ws-port"],
            tls_cert=values["tls-cert"],
            tls_key=values["tls-key"],
            trusted_proxies=values["trust-proxy"],
            timeout=values["timeout"],
            hello_timeout=values["hello-timeout"],
            room_timeout=values["room-timeout"],
            upgrade_timeout=values["upgrade-timeout"],
            max_outbox=values["max-outbox"],
            shutdown_grace=values["shutdown-grace"],
            limits=limits,
            metrics=values["metrics"],
            web_app=values["web-app"],
        )
    except ValueError as error:  # checks only the server knows (max-outbox's minimum...)
        message = str(error)
        option = next((o.name for o in OPTIONS if message.startswith(o.dest)), None)
        if option is None:
            raise ConfigError(message) from None
        raise fail(option, message.split(" ", 1)[1] if " " in message else message) from None
    log = LogSettings(values["log-level"], values["log-format"], values["anonymize-addresses"])
    return Settings(relay, log, dict(values))


def load(path: str | os.PathLike | None, overrides: dict[str, Any]) -> Settings:
    """Defaults, then the file at ``path`` (None: no file), then ``overrides``."""
    file_values: dict[str, Any] = {}
    source = None
    if path is not None:
        file_values = read_file(path)
        source = Path(path).read_text(encoding="utf-8")
    values = merge(file_values, overrides)
    # An error in a value the command line set is the command line's, not the file's.
    file_source = source if path is not None else None
    try:
        return build(values, path=path, source=file_source)
    except ConfigError as error:
        if error.option in overrides:
            raise ConfigError(f"--{error.message}", option=error.option) from None
        raise


def live_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(options a reload applies, options that changed but need a restart)."""
    changed = [option for option in OPTIONS if old.get(option.name) != new.get(option.name)]
    return ([o.name for o in changed if o.live], [o.name for o in changed if not o.live])


def config_path(explicit: str | None) -> Path | None:
    """The file to read: ``--config``, else the default one if it exists."""
    if explicit is not None:
        return Path(explicit)
    return DEFAULT_PATH if DEFAULT_PATH.exists() else None

