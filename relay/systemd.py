"""The little of systemd's protocols the relay speaks: readiness, watchdog, socket activation.

No library is needed: ``sd_notify`` is one datagram of ``KEY=VALUE`` lines to the
AF_UNIX socket named by ``NOTIFY_SOCKET``, and socket activation hands over descriptors
3, 4, ... described by ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES``. Outside
systemd every function here does nothing, so the relay runs the same by hand.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

log = logging.getLogger("relay.systemd")

LISTEN_FDS_START = 3
SOCKET_NAMES = ("handshake", "secure", "websocket", "metrics")
"""What the relay accepts as ``FileDescriptorName=`` of its socket units."""


class ActivationError(ValueError):
    """systemd passed sockets the relay cannot use; the message is fit for the user."""


class Notifier:
    """Sends state changes to the service manager, if there is one (``NOTIFY_SOCKET``)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # the abstract namespace
            address = "\0" + address[1:]
        self.address = address or None
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; say whether it went out."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as error:
            log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), error)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets newer systemd match this reload with the signal that asked for it.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings: half of ``WATCHDOG_USEC``, or None without a watchdog."""
    environ = os.environ if environ is None else environ
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None  # meant for another process (a parent that exec'd us, say)
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def listen_sockets(environ: dict[str, str] | None = None, *, unset: bool = True
                   ) -> dict[str, list[socket.socket]]:
    """The listening sockets systemd passed to this process, by ``FileDescriptorName=``.

    Empty when not socket-activated. The ``LISTEN_*`` variables are removed (``unset``) so
    that no child process takes the sockets for its own. Raises ``ActivationError`` for a
    socket without a known name or that is not a listening TCP socket.
    """
    environ = os.environ if environ is None else environ
    pid, count = environ.get("LISTEN_PID"), environ.get("LISTEN_FDS")
    names_text = environ.get("LISTEN_FDNAMES")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            environ.pop(key, None)
    if pid is None or count is None or pid != str(os.getpid()):
        return {}
    try:
        number = int(count)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS is not a number: {count!r}") from None
    names = names_text.split(":") if names_text else []
    found: dict[str, list[socket.socket]] = {}
    try:
        for index in range(number):
            name = names[index] if index < len(names) else "unknown"
            found.setdefault(name, []).append(_listening(LISTEN_FDS_START + index, name))
    except BaseException:
        for socks in found.values():
            for sock in socks:
                sock.close()
        raise
    return found


def _listening(fd: int, name: str) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        raise ActivationError(f"descriptor {fd} from systemd is not a socket: {error}") from None
    if name not in SOCKET_NAMES:
        sock.close()
        raise ActivationError(
            f"systemd passed a socket named {name!r}; give each socket unit "
            f"FileDescriptorName= one of {', '.join(SOCKET_NAMES)}")
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6) \
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.close()
        raise ActivationError(
            f"the {name} socket from systemd is not a listening TCP socket (ListenStream=)")
    sock.set_inheritable(False)
    return sock
