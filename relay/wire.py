"""The handshake-port packet codec: the one place where every packet type is encoded and decoded.

Both the relay and the peers use it. The framing is bob's (docs/protocol.md §3): a 6-character
ASCII header ``UUUU TT`` followed by a body that is either fixed-size or ends at the first NUL.
There is no length prefix, so the parser must know each type's layout to find where the next
packet starts; a byte stream that does not fit is an error for the whole connection.
"""

from __future__ import annotations

import ipaddress
from typing import ClassVar, Iterator, Union

import attrs

RELAY_UID = 0x0000
MAX_UID = 0xFFFF
PUBLIC_SIZE = 34
VALIDATOR_SIZE = 64
POINT_SIZE = 32
MAX_IDENTITY = 53
"""``[ipv6]:port`` is at most 47 characters; 53 leaves room and keeps every packet far below bob's
408-byte parser buffer (the largest, New_server, is then 98 bytes)."""
MAX_PACKET = 408
"""bob's parser buffer: nothing longer may ever be emitted or accepted."""
HEADER_SIZE = 6

_HEX = frozenset(b"0123456789abcdefABCDEF")


class WireError(Exception):
    """The byte stream is not a valid packet sequence; the connection cannot continue."""


def _hex4(value: int) -> bytes:
    if not 0 <= value <= MAX_UID:
        raise ValueError(f"UID {value!r} is outside 0000-ffff")
    return b"%04x" % value


def _parse_hex(raw: bytes, what: str) -> int:
    # int(x, 16) would also accept "0x", "+", "_" and spaces; the protocol does not.
    if not raw or any(c not in _HEX for c in raw):
        raise WireError(f"{what} is not hexadecimal: {raw!r}")
    return int(raw, 16)


def _check_identity(identity: bytes) -> bytes:
    if len(identity) > MAX_IDENTITY:
        raise WireError(f"identity is {len(identity)} bytes, over the {MAX_IDENTITY}-byte limit")
    if b"\0" in identity or b"\n" in identity:
        # NUL ends the field on the wire and "\n" ends the secure-room ticket line.
        raise WireError("identity contains a NUL or newline byte")
    return identity


def _check_size(value: bytes, size: int, what: str) -> bytes:
    if len(value) != size:
        raise ValueError(f"{what} must be {size} bytes, not {len(value)}")
    return bytes(value)


# Each packet class knows its type number, the size of its fixed part, whether a NUL-terminated
# identity follows, and how to turn its fields into body bytes and back. Nothing else in the
# project builds or parses packet bodies.


@attrs.frozen
class HelloServer:
    """A sender registers, publishing its spoke public (salt, iterations, ciphers)."""

    TYPE: ClassVar[int] = 0x00
    FIXED: ClassVar[int] = PUBLIC_SIZE
    HAS_IDENTITY: ClassVar[bool] = False
    public: bytes = attrs.field(converter=bytes)

    def __attrs_post_init__(self) -> None:
        _check_size(self.public, PUBLIC_SIZE, "public")

    def body(self) -> bytes:
        return self.public

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> HelloServer:
        return cls(fixed)


@attrs.frozen
class HelloClient:
    """A receiver registers; it will be told about every waiting sender."""

    TYPE: ClassVar[int] = 0x01
    FIXED: ClassVar[int] = 0
    HAS_IDENTITY: ClassVar[bool] = False

    def body(self) -> bytes:
        return b""

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> HelloClient:
        return cls()


@attrs.frozen
class HelloScopedClient:
    """A receiver registers for one nameplate only (docs/protocol.md §10): it is told about
    the senders whose salt starts with that number, so its arrival costs the relay the
    senders of its nameplate rather than the whole crowd. bob's relay does not know it."""

    TYPE: ClassVar[int] = 0x10
    FIXED: ClassVar[int] = 2
    HAS_IDENTITY: ClassVar[bool] = False
    nameplate: int

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.nameplate <= 0xFFFF:
            raise ValueError(f"nameplate must be 0..65535, not {self.nameplate}")

    def body(self) -> bytes:
        return self.nameplate.to_bytes(2, "big")

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> HelloScopedClient:
        return cls(int.from_bytes(fixed, "big"))


@attrs.frozen
class ServerIdentity:
    """The relay tells a sender the address it sees; it is hashed into the handshake."""

    TYPE: ClassVar[int] = 0x02
    FIXED: ClassVar[int] = 0
    HAS_IDENTITY: ClassVar[bool] = True
    identity: bytes = attrs.field(converter=bytes)

    def body(self) -> bytes:
        return _check_identity(self.identity) + b"\0"

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> ServerIdentity:
        return cls(identity or b"")


@attrs.frozen
class ClientIdentity:
    """The relay tells a receiver the address it sees."""

    TYPE: ClassVar[int] = 0x03
    FIXED: ClassVar[int] = 0
    HAS_IDENTITY: ClassVar[bool] = True
    identity: bytes = attrs.field(converter=bytes)

    def body(self) -> bytes:
        return _check_identity(self.identity) + b"\0"

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> ClientIdentity:
        return cls(identity or b"")


@attrs.frozen
class NewServer:
    """The relay announces a waiting sender to a receiver."""

    TYPE: ClassVar[int] = 0x04
    FIXED: ClassVar[int] = 4 + PUBLIC_SIZE
    HAS_IDENTITY: ClassVar[bool] = True
    server_uid: int
    public: bytes = attrs.field(converter=bytes)
    identity: bytes = attrs.field(converter=bytes)

    def __attrs_post_init__(self) -> None:
        _check_size(self.public, PUBLIC_SIZE, "public")

    def body(self) -> bytes:
        return _hex4(self.server_uid) + self.public + _check_identity(self.identity) + b"\0"

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> NewServer:
        return cls(_parse_hex(fixed[:4], "New_server UID"), fixed[4:], identity or b"")


@attrs.frozen
class ClientValidator:
    """The receiver proves it derived the same keys (spoke sub-key #3)."""

    TYPE: ClassVar[int] = 0x05
    FIXED: ClassVar[int] = VALIDATOR_SIZE
    HAS_IDENTITY: ClassVar[bool] = False
    validator: bytes = attrs.field(converter=bytes)

    def __attrs_post_init__(self) -> None:
        _check_size(self.validator, VALIDATOR_SIZE, "validator")

    def body(self) -> bytes:
        return self.validator

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> ClientValidator:
        return cls(fixed)


@attrs.frozen
class YAndServerValidator:
    """The sender's point Y and its proof (spoke sub-key #2)."""

    TYPE: ClassVar[int] = 0x06
    FIXED: ClassVar[int] = POINT_SIZE + VALIDATOR_SIZE
    HAS_IDENTITY: ClassVar[bool] = False
    y: bytes = attrs.field(converter=bytes)
    validator: bytes = attrs.field(converter=bytes)

    def __attrs_post_init__(self) -> None:
        _check_size(self.y, POINT_SIZE, "Y")
        _check_size(self.validator, VALIDATOR_SIZE, "validator")

    def body(self) -> bytes:
        return self.y + self.validator

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> YAndServerValidator:
        return cls(fixed[:POINT_SIZE], fixed[POINT_SIZE:])


@attrs.frozen
class XAndClientIdentity:
    """The receiver's point X and the identity the relay gave it."""

    TYPE: ClassVar[int] = 0x07
    FIXED: ClassVar[int] = POINT_SIZE
    HAS_IDENTITY: ClassVar[bool] = True
    x: bytes = attrs.field(converter=bytes)
    identity: bytes = attrs.field(converter=bytes)

    def __attrs_post_init__(self) -> None:
        _check_size(self.x, POINT_SIZE, "X")

    def body(self) -> bytes:
        return self.x + _check_identity(self.identity) + b"\0"

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> XAndClientIdentity:
        return cls(fixed, identity or b"")


@attrs.frozen
class Agreement:
    """The sender accepted the receiver's validator: both hold the same keys."""

    TYPE: ClassVar[int] = 0x08
    FIXED: ClassVar[int] = 0
    HAS_IDENTITY: ClassVar[bool] = False

    def body(self) -> bytes:
        return b""

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> Agreement:
        return cls()


@attrs.frozen
class Closed:
    """The relay says a peer went away (UID 0000: the relay itself is closing)."""

    TYPE: ClassVar[int] = 0x09
    FIXED: ClassVar[int] = 4
    HAS_IDENTITY: ClassVar[bool] = False
    peer_uid: int

    def body(self) -> bytes:
        return _hex4(self.peer_uid)

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> Closed:
        return cls(_parse_hex(fixed, "Closed UID"))


@attrs.frozen
class Accepted:
    """The receiver's user accepted the agreed sender; the relay then opens a room for them."""

    TYPE: ClassVar[int] = 0x0A
    FIXED: ClassVar[int] = 0
    HAS_IDENTITY: ClassVar[bool] = False

    def body(self) -> bytes:
        return b""

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> Accepted:
        return cls()


@attrs.frozen
class Refused:
    """The receiver's user declined the agreed sender."""

    TYPE: ClassVar[int] = 0x0B
    FIXED: ClassVar[int] = 0
    HAS_IDENTITY: ClassVar[bool] = False

    def body(self) -> bytes:
        return b""

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> Refused:
        return cls()


RELAY_FAILURE_LETTERS = frozenset(b"CSHN")


@attrs.frozen
class RelayFailure:
    """A peer reports a protocol slip to the relay (unknown client/server, no handshake...)."""

    TYPE: ClassVar[int] = 0x0C
    FIXED: ClassVar[int] = 5
    HAS_IDENTITY: ClassVar[bool] = False
    letter: bytes = attrs.field(converter=bytes)
    peer_uid: int = 0

    def __attrs_post_init__(self) -> None:
        if len(self.letter) != 1 or self.letter[0] not in RELAY_FAILURE_LETTERS:
            raise ValueError(f"Relay_failure letter must be one of C, S, H, N, not {self.letter!r}")

    def body(self) -> bytes:
        return self.letter + _hex4(self.peer_uid)

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> RelayFailure:
        # Unlike bob's parser we accept "N", which bob's own peers emit.
        if fixed[0] not in RELAY_FAILURE_LETTERS:
            raise WireError(f"Relay_failure letter {fixed[:1]!r} is not C, S, H or N")
        return cls(fixed[:1], _parse_hex(fixed[1:], "Relay_failure UID"))


SPOKE_FAILURE_CODES = range(5)


@attrs.frozen
class SpokeFailure:
    """The handshake failed between two peers (code 1 is, in practice, a wrong password)."""

    TYPE: ClassVar[int] = 0x0D
    FIXED: ClassVar[int] = 1
    HAS_IDENTITY: ClassVar[bool] = False
    code: int

    def __attrs_post_init__(self) -> None:
        if self.code not in SPOKE_FAILURE_CODES:
            raise ValueError(f"Spoke_failure code {self.code} is not 0-4")

    def body(self) -> bytes:
        return bytes([self.code])

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> SpokeFailure:
        if fixed[0] not in SPOKE_FAILURE_CODES:
            raise WireError(f"Spoke_failure code {fixed[0]} is not 0-4")
        return cls(fixed[0])


@attrs.frozen
class Done:
    """The relay confirms to the receiver that its room is ready on the secure port."""

    TYPE: ClassVar[int] = 0x0E
    FIXED: ClassVar[int] = 0
    HAS_IDENTITY: ClassVar[bool] = False

    def body(self) -> bytes:
        return b""

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> Done:
        return cls()


@attrs.frozen
class Timeout:
    """The relay gives up on a peer and closes its connection right after."""

    TYPE: ClassVar[int] = 0x0F
    FIXED: ClassVar[int] = 0
    HAS_IDENTITY: ClassVar[bool] = False

    def body(self) -> bytes:
        return b""

    @classmethod
    def from_body(cls, fixed: bytes, identity: bytes | None) -> Timeout:
        return cls()


Packet = Union[
    HelloServer, HelloClient, ServerIdentity, ClientIdentity, NewServer, ClientValidator,
    YAndServerValidator, XAndClientIdentity, Agreement, Closed, Accepted, Refused,
    RelayFailure, SpokeFailure, Done, Timeout, HelloScopedClient,
]

PACKET_TYPES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (
        HelloServer, HelloClient, ServerIdentity, ClientIdentity, NewServer, ClientValidator,
        YAndServerValidator, XAndClientIdentity, Agreement, Closed, Accepted, Refused,
        RelayFailure, SpokeFailure, Done, Timeout, HelloScopedClient,
    )
}

PEER_TO_PEER = frozenset({0x05, 0x06, 0x07, 0x08, 0x0A, 0x0B, 0x0D})
"""Types the relay forwards (rewriting the UID); every other type is for or from the relay."""
RELAY_ONLY = frozenset({0x02, 0x03, 0x04, 0x09, 0x0E, 0x0F})
"""Types only the relay may send; a peer sending one is ignored."""


@attrs.frozen
class Frame:
    """One packet with its header UID: the destination from a peer, the source from the relay."""

    uid: int
    packet: Packet

    def encode(self) -> bytes:
        return encode(self.uid, self.packet)


def encode(uid: int, packet: Packet) -> bytes:
    """The exact bytes of one packet, header included (lowercase hex, as bob emits)."""
    data = _hex4(uid) + b"%02x" % packet.TYPE + packet.body()
    if len(data) > MAX_PACKET:
        raise ValueError(f"packet of {len(data)} bytes exceeds bob's {MAX_PACKET}-byte buffer")
    return data


class Parser:
    """Incremental decoder: feed it any split of the stream, take whole frames out.

    It holds at most one partial packet (under 110 bytes) once drained, so a peer cannot make
    it buffer without bound however it slices its writes.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failed: WireError | None = None

    def feed(self, data: bytes) -> None:
        if self._failed is not None:
            raise self._failed
        self._buffer += data

    def frames(self) -> Iterator[Frame]:
        """Yield every complete frame buffered so far; raise WireError on the first bad byte."""
        while True:
            frame = self.next_frame()
            if frame is None:
                return
            yield frame

    def next_frame(self) -> Frame | None:
        if self._failed is not None:
            raise self._failed
        try:
            parsed = _parse_one(self._buffer)
        except WireError as error:
            self._failed = error
            raise
        if parsed is None:
            return None
        frame, used = parsed
        del self._buffer[:used]
        return frame

    def pending(self) -> int:
        """How many bytes of an incomplete packet are held."""
        return len(self._buffer)


def _parse_one(buf: bytearray) -> tuple[Frame, int] | None:
    if len(buf) < 4:
        _reject_early(buf, len(buf))
        return None
    uid = _parse_hex(bytes(buf[0:4]), "UID")
    if len(buf) < HEADER_SIZE:
        _reject_early(buf[4:], len(buf) - 4)
        return None
    kind = _parse_hex(bytes(buf[4:6]), "packet type")
    cls = PACKET_TYPES.get(kind)
    if cls is None:
        raise WireError(f"packet type {kind:02x} is unknown (00-10)")
    fixed_end = HEADER_SIZE + cls.FIXED
    if len(buf) < fixed_end:
        return None
    fixed = bytes(buf[HEADER_SIZE:fixed_end])
    identity = None
    end = fixed_end
    if cls.HAS_IDENTITY:
        nul = buf.find(b"\0", fixed_end, fixed_end + MAX_IDENTITY + 1)
        if nul < 0:
            if len(buf) - fixed_end > MAX_IDENTITY:
                raise WireError(
                    f"identity in packet type {kind:02x} has no NUL within {MAX_IDENTITY} bytes"
                )
            return None
        identity = _check_identity(bytes(buf[fixed_end:nul]))
        end = nul + 1
    return Frame(uid, cls.from_body(fixed, identity)), end


def _reject_early(part: bytearray, size: int) -> None:
    """Fail on a non-hex header byte as soon as it arrives, not after the rest of the header."""
    for c in part[:size]:
        if c not in _HEX:
            raise WireError(f"header byte {bytes([c])!r} is not hexadecimal")


def identity_of(host: str, port: int) -> bytes:
    """The relay's name for a peer: ``ip:port``, with IPv6 in brackets (so it parses back)."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; bob would say a.b.c.d.
            return f"{address.ipv4_mapped}:{port}".encode()
        return f"[{address.compressed}]:{port}".encode()
    return f"{address}:{port}".encode()
