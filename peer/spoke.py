"""spoke's password-authenticated key exchange (SPAKE2+EE on Ed25519), sans I/O.

The sender ("server") publishes a 34-byte *public* through the relay; a receiver
("client") who knows the password answers with X, the sender replies with Y and a
validator, the receiver replies with its own validator.  Both ends then hold the same
two 64-byte sub-keys for the record layer (``peer.records``).

Every step is a pure function over small immutable states, so the handshake driver
owns all I/O and timing.  The byte layout follows docs/protocol.md §5 exactly; the
comments mark the places where spoke departs from the textbook algorithms, because
those are the places where a "fix" would silently break interop with bob.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import attrs
import nacl.bindings as sodium
import nacl.exceptions

__all__ = [
    "ALGORITHM_PBKDF2",
    "CIPHER_AES256_GCM",
    "CIPHER_AES_CCM16",
    "CIPHER_CHACHA20_POLY1305",
    "DEFAULT_ITERATIONS",
    "FAILURE_BAD_CLIENT_VALIDATOR",
    "FAILURE_BAD_POINT",
    "FAILURE_BAD_PUBLIC",
    "FAILURE_BAD_SECRET",
    "FAILURE_BAD_SERVER_VALIDATOR",
    "HASH_SHA256",
    "MAX_ITERATIONS",
    "PUBLIC_SIZE",
    "ClientState",
    "Public",
    "ServerSecret",
    "ServerState",
    "SharedKeys",
    "SpokeError",
    "client_compute",
    "client_points",
    "derive_main",
    "derive_sub_key",
    "generate",
    "hello",
    "random_scalar",
    "server_compute",
    "server_finalize",
    "server_points",
    "split_stretch",
    "stretch",
]

# Spoke_failure codes (the one-byte body of packet 0d), named as in PROTOCOL §2.
# Careful: spoke's names are not "whose validator was bad".  Code 1 is raised by the
# receiver (client) when the sender's validator, sub-key 2, does not match: the usual
# symptom of a wrong password.  Code 2 is raised by the sender when the receiver's
# validator, sub-key 3, does not match.
FAILURE_BAD_POINT = 0
FAILURE_BAD_CLIENT_VALIDATOR = 1
FAILURE_BAD_SERVER_VALIDATOR = 2
FAILURE_BAD_PUBLIC = 3
FAILURE_BAD_SECRET = 4

ALGORITHM_PBKDF2 = 2
HASH_SHA256 = 4
CIPHER_AES256_GCM = 0
CIPHER_AES_CCM16 = 1
CIPHER_CHACHA20_POLY1305 = 2
KNOWN_CIPHERS = frozenset({CIPHER_AES256_GCM, CIPHER_AES_CCM16, CIPHER_CHACHA20_POLY1305})

PUBLIC_SIZE = 34
SALT_SIZE = 16
POINT_SIZE = 32
SCALAR_SIZE = 32
SUB_KEY_SIZE = 64
STRETCH_SIZE = 128

# Iterations our own sender advertises.  The receiver stretches the password once for
# every sender the relay advertises, in pure Python (see `stretch`), so this has to
# stay cheap.  Measured on the (shared, 2-core x86-64) development machine: 0.8-1.8 us
# per HMAC-SHA256, so 4 blocks x 4096 iterations = 16384 HMACs took 13-29 ms per
# stretch, under the 50 ms budget with room for slower machines.  (bob advertises 16;
# the real protection against guessing is the online exchange, one guess per
# handshake, not PBKDF2.)
DEFAULT_ITERATIONS = 4096

# Largest iteration count a receiver accepts from a public.  A hostile public could ask
# for 2**63 and pin our CPU forever.  100_000 took 0.4-0.7 s in our loop on the same
# machine: 25x our default (room to raise it later) while a flood of hostile
# advertisements still cannot stall a receiver for long.
MAX_ITERATIONS = 100_000

_PUBLIC_LAYOUT = struct.Struct(">HHQHHH16s")
assert _PUBLIC_LAYOUT.size == PUBLIC_SIZE


class SpokeError(Exception):
    """The exchange failed; `code` is the Spoke_failure byte to send (or received)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (spoke failure {self.code})"


@attrs.frozen(kw_only=True)
class Public:
    """The 34-byte parameters a sender advertises; safe to show anyone."""

    version: int = 1
    algorithm: int = ALGORITHM_PBKDF2
    iterations: int
    cipher0: int
    cipher1: int
    hash: int = HASH_SHA256
    salt: bytes

    @classmethod
    def decode(cls, data: bytes) -> Public:
        """Parse a public from the wire, refusing anything we would not run.

        Like bob we ignore the version field.  Unlike bob we also refuse iteration
        counts of 0 or above MAX_ITERATIONS, because the count comes from a stranger.
        """
        if len(data) != PUBLIC_SIZE:
            raise SpokeError(FAILURE_BAD_PUBLIC, f"public is {len(data)} bytes, expected {PUBLIC_SIZE}")
        version, algorithm, iterations, cipher0, cipher1, hash_id, salt = _PUBLIC_LAYOUT.unpack(data)
        public = cls(
            version=version,
            algorithm=algorithm,
            iterations=iterations,
            cipher0=cipher0,
            cipher1=cipher1,
            hash=hash_id,
            salt=salt,
        )
        public.check()
        return public

    def check(self) -> None:
        """Raise SpokeError(3) unless we support and accept these parameters."""
        if self.algorithm != ALGORITHM_PBKDF2:
            raise SpokeError(FAILURE_BAD_PUBLIC, f"unknown password algorithm {self.algorithm}")
        if self.hash != HASH_SHA256:
            raise SpokeError(FAILURE_BAD_PUBLIC, f"unknown hash {self.hash}")
        for cipher in (self.cipher0, self.cipher1):
            if cipher not in KNOWN_CIPHERS:
                raise SpokeError(FAILURE_BAD_PUBLIC, f"unknown cipher {cipher}")
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise SpokeError(
                FAILURE_BAD_PUBLIC,
                f"iteration count {self.iterations} outside 1..{MAX_ITERATIONS}",
            )
        if len(self.salt) != SALT_SIZE:
            raise SpokeError(FAILURE_BAD_PUBLIC, f"salt is {len(self.salt)} bytes, expected {SALT_SIZE}")

    def encode(self) -> bytes:
        return _PUBLIC_LAYOUT.pack(
            self.version,
            self.algorithm,
            self.iterations,
            self.cipher0,
            self.cipher1,
            self.hash,
            self.salt,
        )

    @property
    def ciphers(self) -> tuple[int, int]:
        return (self.cipher0, self.cipher1)


@attrs.frozen(kw_only=True)
class ServerSecret:
    """What the sender keeps for the whole session: never leaves the process.

    Deriving M, N, h_K and L once up front lets the sender answer many receivers
    without stretching the password again.
    """

    public: Public
    m: bytes = attrs.field(repr=False)
    n: bytes = attrs.field(repr=False)
    h_k: bytes = attrs.field(repr=False)
    l: bytes = attrs.field(repr=False)  # noqa: E741 - the protocol's name for it


@attrs.frozen(kw_only=True)
class ClientState:
    """The receiver between sending X (packet 07) and receiving Y (packet 06)."""

    public: Public
    x: bytes = attrs.field(repr=False)
    big_x: bytes
    n: bytes = attrs.field(repr=False)
    h_k: bytes = attrs.field(repr=False)
    h_l: bytes = attrs.field(repr=False)


@attrs.frozen(kw_only=True)
class SharedKeys:
    """The outcome of one exchange; both roles hold equal values."""

    sender_to_receiver: bytes = attrs.field(repr=False)  # sub-key 0
    receiver_to_sender: bytes = attrs.field(repr=False)  # sub-key 1
    ciphers: tuple[int, int]


@attrs.frozen(kw_only=True)
class ServerState:
    """The sender between sending packet 06 and checking the receiver's 05."""

    expected_client_validator: bytes = attrs.field(repr=False)
    keys: SharedKeys


# --- password stretching ---------------------------------------------------------------


def stretch(password: bytes, salt: bytes, iterations: int) -> bytes:
    """PBKDF2-HMAC-SHA256 to 128 bytes, with spoke's little-endian block index.

    spoke stores the block counter in native (little-endian) order where RFC 8018
    says big-endian, so `hashlib.pbkdf2_hmac` gives other bytes and we keep our own
    loop.  The loop reuses pre-keyed SHA-256 states for the HMAC pads (the standard
    HMAC construction written out) because it is ~1.4x faster than `hmac.new().copy()`.
    """
    if iterations < 1:
        raise ValueError("PBKDF2 needs at least one iteration")
    block_size = hashlib.sha256().block_size
    key = hashlib.sha256(password).digest() if len(password) > block_size else password
    key = key.ljust(block_size, b"\0")
    inner_pad = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer_pad = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def prf(message: bytes) -> bytes:
        inner = inner_pad.copy()
        inner.update(message)
        outer = outer_pad.copy()
        outer.update(inner.digest())
        return outer.digest()

    blocks = []
    for index in range(1, STRETCH_SIZE // 32 + 1):
        u = prf(salt + index.to_bytes(4, "little"))
        accumulated = int.from_bytes(u, "big")
        for _ in range(iterations - 1):
            u = prf(u)
            accumulated ^= int.from_bytes(u, "big")
        blocks.append(accumulated.to_bytes(32, "big"))
    return b"".join(blocks)


def split_stretch(mnkl: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """Turn the stretched password into (M, N, h_K, h_L).

    M and N are points hashed from the password (Elligator 2, cofactor cleared);
    h_K is mixed into the transcript; h_L is the scalar behind L = h_L*B, where the
    base multiplication *clamps* h_L (unlike the noclamp calls of the exchange).
    """
    if len(mnkl) != STRETCH_SIZE:
        raise ValueError(f"stretched password must be {STRETCH_SIZE} bytes")
    m = sodium.crypto_core_ed25519_from_uniform(mnkl[0:32])
    n = sodium.crypto_core_ed25519_from_uniform(mnkl[32:64])
    return m, n, mnkl[64:96], mnkl[96:128]


# --- scalars and points -------------------------------------------------------------------


def random_scalar() -> bytes:
    """A fresh secret scalar, masked the way spoke does it (bit 254 is left alone)."""
    while True:
        scalar = _mask_scalar(os.urandom(SCALAR_SIZE))
        if any(scalar):
            return scalar


def _mask_scalar(raw: bytes) -> bytes:
    scalar = bytearray(raw)
    scalar[0] &= 248
    scalar[31] &= 127
    return bytes(scalar)


def _check_scalar(scalar: bytes) -> bytes:
    if len(scalar) != SCALAR_SIZE:
        raise ValueError(f"scalar must be {SCALAR_SIZE} bytes")
    if not any(scalar):
        raise ValueError("scalar must not be zero")
    return scalar


def _point_operation(operation, *args: bytes) -> bytes:
    """Run a libsodium point operation; any rejection means a hostile or broken peer."""
    try:
        return operation(*args)
    except nacl.exceptions.CryptoError as error:
        raise SpokeError(FAILURE_BAD_POINT, "peer sent a point outside the prime-order group") from error


def _check_peer_length(name: str, value: bytes, size: int) -> None:
    """Peer-supplied points of the wrong size count as bad points (code 0)."""
    if len(value) != size:
        raise SpokeError(FAILURE_BAD_POINT, f"{name} is {len(value)} bytes, expected {size}")


# --- key schedule -------------------------------------------------------------------------

_SUB_KEY_LABEL = b"SPOKE".ljust(16, b"\0")


def derive_main(
    *,
    client_identity: bytes,
    server_identity: bytes,
    x: bytes,
    y: bytes,
    z: bytes,
    h_k: bytes,
    v: bytes,
) -> bytes:
    """Hash the transcript.  The version prefix is little-endian (01 00) although the
    public writes it big-endian (00 01); identities are (client, server) on both sides.
    """
    transcript = b"".join((b"\x01\x00", client_identity, server_identity, x, y, z, h_k, v))
    return hashlib.blake2b(transcript, digest_size=64).digest()


def derive_sub_key(main: bytes, index: int) -> bytes:
    """Sub-key `index` (0..3): keyed BLAKE2b with the index as a little-endian u64."""
    message = _SUB_KEY_LABEL + index.to_bytes(8, "little") + bytes(8)
    return hashlib.blake2b(message, key=main, digest_size=SUB_KEY_SIZE).digest()


def _keys_from_main(main: bytes, public: Public) -> SharedKeys:
    return SharedKeys(
        sender_to_receiver=derive_sub_key(main, 0),
        receiver_to_sender=derive_sub_key(main, 1),
        ciphers=public.ciphers,
    )


# --- the points of the exchange ---------------------------------------------------------


def server_points(secret: ServerSecret, x: bytes, y: bytes) -> tuple[bytes, bytes, bytes]:
    """Sender's curve work for scalar y and the receiver's X: returns (Y, Z, V).

    Z = y*(X - M) and V = y*L.  Raises SpokeError(0) when X - M is not a point of the
    prime-order subgroup (libsodium refuses small-order and non-canonical points).
    """
    _check_peer_length("X", x, POINT_SIZE)
    big_y = sodium.crypto_core_ed25519_add(sodium.crypto_scalarmult_ed25519_base_noclamp(y), secret.n)
    gx = _point_operation(sodium.crypto_core_ed25519_sub, x, secret.m)
    z = _point_operation(sodium.crypto_scalarmult_ed25519_noclamp, y, gx)
    v = _point_operation(sodium.crypto_scalarmult_ed25519_noclamp, y, secret.l)
    return big_y, z, v


def client_points(state: ClientState, big_y: bytes) -> tuple[bytes, bytes]:
    """Receiver's curve work for the sender's Y: returns (Z, V), equal to the sender's.

    Z = x*(Y - N); V = h_L*(Y - N) with the *clamped* multiplication, to match
    L = h_L*B made with the clamped base multiplication.  Raises SpokeError(0) on a bad Y.
    """
    _check_peer_length("Y", big_y, POINT_SIZE)
    gy = _point_operation(sodium.crypto_core_ed25519_sub, big_y, state.n)
    z = _point_operation(sodium.crypto_scalarmult_ed25519_noclamp, state.x, gy)
    v = _point_operation(sodium.crypto_scalarmult_ed25519, state.h_l, gy)
    return z, v


# --- the exchange -------------------------------------------------------------------------


def generate(
    password: bytes,
    *,
    salt: bytes | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    ciphers: tuple[int, int] = (CIPHER_AES256_GCM, CIPHER_AES256_GCM),
) -> tuple[ServerSecret, Public]:
    """Sender side, once per session: stretch the password and build the public.

    Our default ciphers are GCM both ways so the receiver can answer over the record
    layer too; bob advertises (0, 2) and never sends data receiver → sender.
    """
    if salt is None:
        salt = os.urandom(SALT_SIZE)
    public = Public(iterations=iterations, cipher0=ciphers[0], cipher1=ciphers[1], salt=salt)
    try:
        public.check()
    except SpokeError as error:
        raise ValueError(f"refusing to advertise a public our own receiver rejects: {error.message}") from None
    m, n, h_k, h_l = split_stretch(stretch(password, salt, iterations))
    l = sodium.crypto_scalarmult_ed25519_base(h_l)  # noqa: E741 - clamped on purpose
    return ServerSecret(public=public, m=m, n=n, h_k=h_k, l=l), public


def hello(
    password: bytes,
    public: bytes | Public,
    *,
    scalar: bytes | None = None,
) -> tuple[ClientState, bytes]:
    """Receiver side: answer a sender's public with X = x*B + M (body of packet 07).

    `scalar` is for test vectors only; leave it out to get a fresh random one.
    """
    if isinstance(public, Public):
        public.check()
    else:
        public = Public.decode(public)
    m, n, h_k, h_l = split_stretch(stretch(password, public.salt, public.iterations))
    x = random_scalar() if scalar is None else _check_scalar(scalar)
    big_x = sodium.crypto_core_ed25519_add(sodium.crypto_scalarmult_ed25519_base_noclamp(x), m)
    state = ClientState(public=public, x=x, big_x=big_x, n=n, h_k=h_k, h_l=h_l)
    return state, big_x


def server_compute(
    secret: ServerSecret,
    x: bytes,
    *,
    client_identity: bytes,
    server_identity: bytes,
    scalar: bytes | None = None,
) -> tuple[ServerState, bytes]:
    """Sender side: from the receiver's X, build packet 06's body (Y ‖ sub-key 2).

    Raises SpokeError(0) when X minus M is not a point of the prime-order subgroup.
    """
    y = random_scalar() if scalar is None else _check_scalar(scalar)
    big_y, z, v = server_points(secret, x, y)
    main = derive_main(
        client_identity=client_identity,
        server_identity=server_identity,
        x=x,
        y=big_y,
        z=z,
        h_k=secret.h_k,
        v=v,
    )
    state = ServerState(
        expected_client_validator=derive_sub_key(main, 3),
        keys=_keys_from_main(main, secret.public),
    )
    return state, big_y + derive_sub_key(main, 2)


def client_compute(
    state: ClientState,
    y_and_validator: bytes,
    *,
    client_identity: bytes,
    server_identity: bytes,
) -> tuple[SharedKeys, bytes]:
    """Receiver side: check the sender's validator, return the keys and packet 05's body.

    Raises SpokeError(0) for a bad Y and SpokeError(1) when the sender's validator
    does not match, which in practice means the passwords differ.
    """
    _check_peer_length("packet 06 body", y_and_validator, POINT_SIZE + SUB_KEY_SIZE)
    big_y = y_and_validator[:POINT_SIZE]
    server_validator = y_and_validator[POINT_SIZE:]
    z, v = client_points(state, big_y)
    main = derive_main(
        client_identity=client_identity,
        server_identity=server_identity,
        x=state.big_x,
        y=big_y,
        z=z,
        h_k=state.h_k,
        v=v,
    )
    if not hmac.compare_digest(derive_sub_key(main, 2), server_validator):
        raise SpokeError(FAILURE_BAD_CLIENT_VALIDATOR, "the sender's validator does not match (wrong password?)")
    return _keys_from_main(main, state.public), derive_sub_key(main, 3)


def server_finalize(state: ServerState, client_validator: bytes) -> SharedKeys:
    """Sender side: accept the receiver only if its validator (packet 05) matches."""
    if not hmac.compare_digest(state.expected_client_validator, client_validator):
        raise SpokeError(FAILURE_BAD_SERVER_VALIDATOR, "the receiver's validator does not match")
    return state.keys
