"""What every port's driver does with a new connection's opening and its end.

Shared by ``relay.handshake_port``, ``relay.secure_port`` and ``relay.server``.
"""

from __future__ import annotations

import logging
from typing import Awaitable, TypeVar

import trio

log = logging.getLogger("relay.server")

LINGER = 1.0
"""Seconds to read and drop what a peer still sends after the relay's last bytes to it.

Closing a socket that has unread input makes the kernel send a reset, and a reset can
destroy the last bytes (0f, ``02``...) in the peer's receive queue before it reads them.
So the relay shuts its side down first and drains the input until EOF, briefly.
"""
T = TypeVar("T")


async def opened(opening: Awaitable[T], tcp: trio.SocketStream) -> T | None:
    """Run a connection's opening (TLS, upgrade); a bug there must not take the relay down."""
    try:
        return await opening
    except Exception:
        log.exception("opening a connection failed")
        tcp.socket.close()
        return None


def text_of(identity: bytes) -> str:
    return identity.decode("ascii", "replace")
