"""Where the relay is: the one parser for the ``--relay`` / ``PEER_RELAY`` address forms."""

from __future__ import annotations

import ipaddress

import attrs

DEFAULT_PORT = 9000
DEFAULT_SECURE_PORT = 9001


class AddressError(ValueError):
    """The relay address cannot be understood."""


@attrs.frozen
class RelayAddress:
    """A relay: its host, its handshake port and its secure-room port (bob does not announce
    the latter, so both ends must agree on it out of band; the default is 9001)."""

    host: str
    port: int = DEFAULT_PORT
    secure_port: int = DEFAULT_SECURE_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _port(text: str, original: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise AddressError(f"bad port in relay address {original!r}")
    return int(text)


def parse_relay(text: str, *, secure_port: int | None = None) -> RelayAddress:
    """Accept ``HOST``, ``HOST:PORT``, ``[V6]:PORT``, a bare IPv6 address or ``tcp://HOST:PORT``."""
    original = text
    text = text.strip()
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme.lower() != "tcp":
            raise AddressError(
                f"unsupported relay scheme {scheme!r} in {original!r} (use tcp://HOST:PORT)"
            )
        text = text.rstrip("/")
    if not text:
        raise AddressError("empty relay address")
    port = DEFAULT_PORT
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise AddressError(f"bad relay address {original!r}")
        if rest:
            port = _port(rest[1:], original)
        _check_ip6(host, original)
    elif text.count(":") > 1:
        host = text  # a bare IPv6 address, no port
        _check_ip6(host, original)
    elif ":" in text:
        host, _, port_text = text.partition(":")
        port = _port(port_text, original)
    else:
        host = text
    if not host or any(c.isspace() or c in "/@?#" for c in host):
        raise AddressError(f"bad host in relay address {original!r}")
    return RelayAddress(host, port, DEFAULT_SECURE_PORT if secure_port is None else secure_port)


def _check_ip6(host: str, original: str) -> None:
    try:
        ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        raise AddressError(f"bad IPv6 address in relay address {original!r}") from None
