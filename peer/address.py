"""Where the relay is: the one parser for the ``--relay`` / ``PEER_RELAY`` address forms."""

from __future__ import annotations

import ipaddress
import urllib.parse

import attrs

DEFAULT_PORT = 9000
DEFAULT_SECURE_PORT = 9001
SCHEMES = ("tcp", "tls", "ws", "wss")
WEB_PORTS = {"ws": 80, "wss": 443}


class AddressError(ValueError):
    """The relay address cannot be understood."""


@attrs.frozen
class RelayAddress:
    """A relay: how to reach it, its handshake port and its secure-room port.

    Over TCP and TLS the secure-room port must be agreed out of band (bob does not announce
    it; the default is 9001). Over WebSocket one port serves both, at ``path`` + ``handshake``
    and ``path`` + ``room``, so one URL is all a peer needs.
    """

    host: str
    port: int = DEFAULT_PORT
    secure_port: int = DEFAULT_SECURE_PORT
    scheme: str = "tcp"
    """``tcp``, ``tls`` (TCP with TLS), ``ws`` or ``wss`` (WebSocket, plain or over TLS)."""
    path: str = "/"
    """WebSocket only: the prefix under which the relay's two endpoints are served."""
    cacert: str | None = None
    """TLS only: a PEM file of the authorities to trust instead of the system's."""

    @property
    def tls(self) -> bool:
        return self.scheme in ("tls", "wss")

    @property
    def websocket(self) -> bool:
        return self.scheme in ("ws", "wss")

    def endpoint_path(self, name: str, nameplate: int | None = None) -> str:
        """The WebSocket path of ``handshake`` or ``room`` under this address's prefix.

        With the code's ``nameplate``, ``?nameplate=N`` follows: relays ignore it, and a
        balancer hashing on it sends both peers of a pair, and both connections of each, to
        the same relay instance (docs/websocket.md).
        """
        path = self.path.rstrip("/") + "/" + name
        return path if nameplate is None else f"{path}?nameplate={nameplate:d}"

    def host_header(self) -> str:
        """``host[:port]`` as an HTTP Host header names this relay (port left out if default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if WEB_PORTS.get(self.scheme) == self.port else f"{host}:{self.port}"

    def page_link(self, code: str | None = None) -> str | None:
        """The browser peer's page on this relay, None unless it is a WebSocket relay.

        ``ws://H:P/PREFIX/`` serves it at ``http://H:P/PREFIX/`` (``wss`` at ``https``); with
        ``code``, the link opens the page's receive view with it filled in. The code goes in
        the fragment only, which a browser never sends to any server.
        """
        if not self.websocket:
            return None
        link = f"{'https' if self.tls else 'http'}://{self.host_header()}{self.path}"
        return link if code is None else link + "#receive/" + urllib.parse.quote(code, safe="-")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.scheme == "tcp":
            return f"{host}:{self.port}"
        if self.websocket:
            return f"{self.scheme}://{self.host_header()}{self.path}"
        return f"{self.scheme}://{host}:{self.port}"


def _port(text: str, original: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise AddressError(f"bad port in relay address {original!r}")
    return int(text)


def parse_relay(text: str, *, secure_port: int | None = None, cacert: str | None = None) -> RelayAddress:
    """Accept ``HOST``, ``HOST:PORT``, ``[V6]:PORT``, a bare IPv6 address, ``tcp://HOST:PORT``,
    ``tls://HOST:PORT``, and ``ws://`` or ``wss://HOST[:PORT][/PREFIX/]``.

    ``cacert`` (a PEM file) replaces the system's authorities for ``tls://`` and ``wss://``.
    """
    original = text
    text = text.strip()
    scheme = "tcp"
    path = "/"
    if "://" in text:
        scheme, _, text = text.partition("://")
        scheme = scheme.lower()
        if scheme not in SCHEMES:
            raise AddressError(
                f"unsupported relay scheme {scheme!r} in {original!r} "
                "(use tcp://, tls://, ws:// or wss://)"
            )
        if scheme in WEB_PORTS:
            text, slash, rest = text.partition("/")
            path = slash + rest or "/"
            if any(c in path for c in "?#") or any(c.isspace() for c in path):
                raise AddressError(f"bad path in relay address {original!r}")
            if not path.endswith("/"):
                path += "/"
        else:
            text = text.rstrip("/")
    if cacert is not None and scheme not in ("tls", "wss"):
        raise AddressError(f"a CA certificate only applies to tls:// and wss:// relays, not {original!r}")
    if not text:
        raise AddressError("empty relay address")
    port = WEB_PORTS.get(scheme, DEFAULT_PORT)
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
    return RelayAddress(
        host, port, DEFAULT_SECURE_PORT if secure_port is None else secure_port, scheme, path, cacert
    )


def _check_ip6(host: str, original: str) -> None:
    try:
        ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        raise AddressError(f"bad IPv6 address in relay address {original!r}") from None
