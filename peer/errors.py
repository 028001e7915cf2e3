"""The data phase's errors, in a module of their own.

The offer (peer/offer.py), the messages (peer/messages.py) and the state machines
(peer/transfer.py) all raise ProtocolError; defined here, below all three, none of them
imports another in a circle. peer/transfer.py re-exports the ones its users catch.
"""

from __future__ import annotations

__all__ = ["HandshakeAltered", "ProtocolError", "TransferError", "TransferFailed"]


class TransferError(Exception):
    """Base of this module's errors."""


class TransferFailed(Exception):
    """A transfer ended without the receiver's confirmation; the message is the user's one line."""


class ProtocolError(TransferError):
    """The peer sent something this data phase does not allow; the transfer must stop.

    The message is one line meant for the user; send it to the peer with `error()`.
    """


class HandshakeAltered(ProtocolError):
    """Our receiver was announced another sender public than the one we sent: the relay
    rewrote it (only the cipher ids can change without breaking the handshake)."""
