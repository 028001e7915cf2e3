"""spoke's exchange: docs/protocol.md §5.6 vectors, full exchanges and every failure code."""

import hashlib

import attrs
import nacl.bindings as sodium
import pytest

from peer import spoke

# --- docs/protocol.md §5.6 --------------------------------------------------------------------
PASSWORD = b"revolucion-para-siempre"
SALT = bytes.fromhex("00112233445566778899aabbccddeeff")
ITERATIONS = 16
CLIENT_IDENTITY = b"127.0.0.1:40000"
SERVER_IDENTITY = b"127.0.0.1:40001"
X_SCALAR = bytes.fromhex("28711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4801")
Y_SCALAR = bytes.fromhex("a0fce4363854ff888cff4b8e7875d600c2682390412a8cf79b37d0b11148b07a")

PUBLIC = "00010002000000000000001000000002000400112233445566778899aabbccddeeff"
MNKL = (
    "70e4be0616b55e6a3608e02ca7e2c2c414c86a2f9775a3ead6bc41d067f0b9cd"
    "3b1a4ea9e96ac5588bde4236ffb317fda68d7da57e4606d9ddfee44066572062"
    "97f4baf579ff3d9abfadc20a01924908e4746efeb27a3b70906e1171cafc4e97"
    "f3534cf834821583fc8f13ee47fdbb9e32891d4b2b7efc087e3aa56b46ddbd15"
)
M = "150cc28c3815cdab7bafa00d8fe0620731f51c4dbeee72c4446da2b1002658dd"
N = "1bb13d493ee6e856baa88a978b215c38a93a616e3c10d8fb035802f577798ca5"
L = "b28cd60927611069ba46910202ea41bb3d21e74c376ceca48c84152490f44a12"
X = "4aaa9357f1a79873e42981cd9341e42bc7acea41256c8dcabc2fc6a7c4a4e3b8"
Y = "c33a576fbb195e6dcd2a26a5db40986541b1b596776898f9c3bd9188556d0841"
Z = "b972aed105d949759a14ce534060a0737dfcc02b7ba5f9aed363211ee19be846"
V = "bdbc14def17f3b80c5ff6754957f751010d41452f98d000735e53e5271d2f1bf"
MAIN = (
    "d1b6e2ff27dcf9aec210d22055703643a459c7aa37332915eb72822bb5d8bec8"
    "473926fbf7e9ba2722dfd0e8dd165f74a304b04b30d3353503fa293ce11f927a"
)
SUB0 = (
    "df28d5a303f7f126d9d1ac578e67187b3cd086252a162b4b366d2451b3d3f694"
    "d039e495a1916e639d1642e0d8d044ac181e217fccd5f834db8cd14b9087a087"
)
SUB1 = (
    "4158312a9411c7f1547af5b5f0c9f5803d09e83d451eaebdb924299f7513648e"
    "63dae9d14c865e7eff4ae9c264082c936b65b36073e05d5f3a01633a4dd2150b"
)
SUB2 = (
    "ab61a6ea624bda3fabbf95efba69a43172e2da1bd4e8c2cd2fec55ada78a626f"
    "eb2a4e1ccf3ddf666ae6030e1ef448cf3bdd3b35c7cca82e3a4703ca196b4a30"
)
SUB3 = (
    "1d84ae038d18f80ca6ef10755779fadfcf02a4ca273efb4e6461007c156b9fe3"
    "c36a032533993339d5b56c116691688b75ac4be5fecf0cda34d86733cf0fded8"
)

IDENTITIES = {"client_identity": CLIENT_IDENTITY, "server_identity": SERVER_IDENTITY}

# A point of order 2 on Ed25519 (y = -1): libsodium refuses it in every scalar multiplication.
ORDER_2_POINT = bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")


@attrs.frozen(kw_only=True)
class Exchange:
    secret: spoke.ServerSecret
    public: spoke.Public
    client_state: spoke.ClientState
    x: bytes
    packet_06: bytes
    packet_05: bytes
    client_keys: spoke.SharedKeys
    server_keys: spoke.SharedKeys


@pytest.fixture(scope="module")
def vector_exchange() -> Exchange:
    """The whole §4.5 exchange with its fixed scalars, computed once."""
    secret, public = spoke.generate(PASSWORD, salt=SALT, iterations=ITERATIONS, ciphers=(0, 2))
    client_state, x = spoke.hello(PASSWORD, public.encode(), scalar=X_SCALAR)
    server_state, packet_06 = spoke.server_compute(secret, x, scalar=Y_SCALAR, **IDENTITIES)
    client_keys, packet_05 = spoke.client_compute(client_state, packet_06, **IDENTITIES)
    return Exchange(
        secret=secret,
        public=public,
        client_state=client_state,
        x=x,
        packet_06=packet_06,
        packet_05=packet_05,
        client_keys=client_keys,
        server_keys=spoke.server_finalize(server_state, packet_05),
    )


# --- the vectors, one assertion each --------------------------------------------------------


def test_vector_scalars_are_sha256_of_x_and_y_masked():
    # How the vector scalars were made (docs/protocol.md §5.6); guards the constants above.
    assert spoke._mask_scalar(hashlib.sha256(b"x").digest()) == X_SCALAR
    assert spoke._mask_scalar(hashlib.sha256(b"y").digest()) == Y_SCALAR


def test_vector_public(vector_exchange):
    assert vector_exchange.public.encode().hex() == PUBLIC


def test_vector_mnkl():
    assert spoke.stretch(PASSWORD, SALT, ITERATIONS).hex() == MNKL


def test_vector_mnkl_is_not_rfc8018():
    # The trap of §4.2: the standard PBKDF2 writes the block index big-endian.
    standard = hashlib.pbkdf2_hmac("sha256", PASSWORD, SALT, ITERATIONS, 128)
    assert standard.hex() != MNKL


def test_vector_m():
    m, _, _, _ = spoke.split_stretch(bytes.fromhex(MNKL))
    assert m.hex() == M


def test_vector_n():
    _, n, _, _ = spoke.split_stretch(bytes.fromhex(MNKL))
    assert n.hex() == N


def test_vector_h_k_and_h_l_are_the_last_two_quarters():
    _, _, h_k, h_l = spoke.split_stretch(bytes.fromhex(MNKL))
    assert h_k.hex() == MNKL[128:192]
    assert h_l.hex() == MNKL[192:256]


def test_vector_l(vector_exchange):
    assert vector_exchange.secret.l.hex() == L


def test_vector_x(vector_exchange):
    assert vector_exchange.x.hex() == X


def test_vector_y(vector_exchange):
    assert vector_exchange.packet_06[:32].hex() == Y


def test_vector_z_and_v_on_the_server(vector_exchange):
    _, z, v = spoke.server_points(vector_exchange.secret, bytes.fromhex(X), Y_SCALAR)
    assert z.hex() == Z
    assert v.hex() == V


def test_vector_z_and_v_on_the_client(vector_exchange):
    z, v = spoke.client_points(vector_exchange.client_state, bytes.fromhex(Y))
    assert z.hex() == Z
    assert v.hex() == V


def test_vector_main():
    main = spoke.derive_main(
        client_identity=CLIENT_IDENTITY,
        server_identity=SERVER_IDENTITY,
        x=bytes.fromhex(X),
        y=bytes.fromhex(Y),
        z=bytes.fromhex(Z),
        h_k=bytes.fromhex(MNKL[128:192]),
        v=bytes.fromhex(V),
    )
    assert main.hex() == MAIN


@pytest.mark.parametrize("index, expected", [(0, SUB0), (1, SUB1), (2, SUB2), (3, SUB3)])
def test_vector_sub_keys(index, expected):
    assert spoke.derive_sub_key(bytes.fromhex(MAIN), index).hex() == expected


def test_vector_packet_06_carries_sub2(vector_exchange):
    assert vector_exchange.packet_06[32:].hex() == SUB2


def test_vector_packet_05_is_sub3(vector_exchange):
    assert vector_exchange.packet_05.hex() == SUB3


def test_vector_shared_keys(vector_exchange):
    keys = vector_exchange.client_keys
    assert keys.sender_to_receiver.hex() == SUB0
    assert keys.receiver_to_sender.hex() == SUB1
    assert keys.ciphers == (0, 2)
    assert vector_exchange.server_keys == keys


# --- full exchanges --------------------------------------------------------------------


def run_exchange(sender_password: bytes, receiver_password: bytes, **generate_options):
    secret, public = spoke.generate(sender_password, **generate_options)
    client_state, x = spoke.hello(receiver_password, public.encode())
    server_state, packet_06 = spoke.server_compute(secret, x, **IDENTITIES)
    client_keys, packet_05 = spoke.client_compute(client_state, packet_06, **IDENTITIES)
    return client_keys, spoke.server_finalize(server_state, packet_05)


def test_random_exchange_gives_equal_keys():
    client_keys, server_keys = run_exchange(b"a-good-password", b"a-good-password", iterations=64)
    assert client_keys == server_keys
    assert client_keys.ciphers == (0, 0)  # our default: GCM both ways
    assert len(client_keys.sender_to_receiver) == 64
    assert client_keys.sender_to_receiver != client_keys.receiver_to_sender


def test_two_exchanges_with_one_password_give_different_keys():
    first, _ = run_exchange(b"pw", b"pw", iterations=8)
    second, _ = run_exchange(b"pw", b"pw", iterations=8)
    assert first.sender_to_receiver != second.sender_to_receiver


def test_long_password_is_hashed_first_like_hmac():
    password = b"p" * 100  # longer than SHA-256's 64-byte block
    secret, public = spoke.generate(password, iterations=4)
    assert spoke.stretch(password, public.salt, 4) == spoke.stretch(
        hashlib.sha256(password).digest(), public.salt, 4
    )
    client_keys, server_keys = run_exchange(password, password, iterations=4)
    assert client_keys == server_keys


def test_default_iterations_within_cap():
    assert 1 <= spoke.DEFAULT_ITERATIONS <= spoke.MAX_ITERATIONS
    _, public = spoke.generate(b"pw")
    assert public.iterations == spoke.DEFAULT_ITERATIONS


def test_random_scalar_is_masked_and_nonzero():
    for _ in range(50):
        scalar = spoke.random_scalar()
        assert len(scalar) == 32
        assert scalar[0] & 7 == 0
        assert scalar[31] & 0x80 == 0
        assert any(scalar)


def test_identities_are_bound_into_the_keys(vector_exchange):
    with pytest.raises(spoke.SpokeError) as caught:
        spoke.client_compute(
            vector_exchange.client_state,
            vector_exchange.packet_06,
            client_identity=b"127.0.0.1:40002",
            server_identity=SERVER_IDENTITY,
        )
    assert caught.value.code == 1


# --- failures ---------------------------------------------------------------------------


def test_wrong_password_is_code_1_on_the_client():
    with pytest.raises(spoke.SpokeError) as caught:
        run_exchange(b"right-password", b"wrong-password", iterations=8)
    assert caught.value.code == spoke.FAILURE_BAD_CLIENT_VALIDATOR == 1


def test_tampered_packet_05_is_code_2_on_the_server(vector_exchange):
    secret = vector_exchange.secret
    server_state, _ = spoke.server_compute(secret, vector_exchange.x, scalar=Y_SCALAR, **IDENTITIES)
    tampered = bytearray(vector_exchange.packet_05)
    tampered[17] ^= 0x01
    with pytest.raises(spoke.SpokeError) as caught:
        spoke.server_finalize(server_state, bytes(tampered))
    assert caught.value.code == spoke.FAILURE_BAD_SERVER_VALIDATOR == 2


def test_truncated_packet_05_is_code_2(vector_exchange):
    server_state, _ = spoke.server_compute(
        vector_exchange.secret, vector_exchange.x, scalar=Y_SCALAR, **IDENTITIES
    )
    with pytest.raises(spoke.SpokeError) as caught:
        spoke.server_finalize(server_state, vector_exchange.packet_05[:63])
    assert caught.value.code == 2


def test_tampered_validator_in_packet_06_is_code_1(vector_exchange):
    tampered = bytearray(vector_exchange.packet_06)
    tampered[-1] ^= 0x80
    with pytest.raises(spoke.SpokeError) as caught:
        spoke.client_compute(vector_exchange.client_state, bytes(tampered), **IDENTITIES)
    assert caught.value.code == 1


@pytest.mark.parametrize(
    "bad_x",
    [
        pytest.param(b"\xff" * 32, id="not-a-point"),
        pytest.param(bytes(32), id="zero-bytes"),
        pytest.param(ORDER_2_POINT, id="order-2"),
        pytest.param(bytes.fromhex(M), id="X-equals-M"),  # X - M is the identity
        pytest.param(b"\x01" * 31, id="short"),
    ],
)
def test_bad_x_is_code_0_on_the_server(vector_exchange, bad_x):
    with pytest.raises(spoke.SpokeError) as caught:
        spoke.server_compute(vector_exchange.secret, bad_x, **IDENTITIES)
    assert caught.value.code == spoke.FAILURE_BAD_POINT == 0


def test_x_shifted_by_small_order_point_is_code_0(vector_exchange):
    # X - M lands exactly on a small-order point: the classic small-subgroup attack.
    shifted = sodium.crypto_core_ed25519_add(bytes.fromhex(M), ORDER_2_POINT)
    with pytest.raises(spoke.SpokeError) as caught:
        spoke.server_compute(vector_exchange.secret, shifted, **IDENTITIES)
    assert caught.value.code == 0


@pytest.mark.parametrize(
    "bad_y",
    [
        pytest.param(b"\xff" * 32, id="not-a-point"),
        pytest.param(ORDER_2_POINT, id="order-2"),
        pytest.param(bytes.fromhex(N), id="Y-equals-N"),
    ],
)
def test_bad_y_is_code_0_on_the_client(vector_exchange, bad_y):
    with pytest.raises(spoke.SpokeError) as caught:
        spoke.client_compute(vector_exchange.client_state, bad_y + bytes.fromhex(SUB2), **IDENTITIES)
    assert caught.value.code == 0


def test_short_packet_06_is_code_0(vector_exchange):
    with pytest.raises(spoke.SpokeError) as caught:
        spoke.client_compute(vector_exchange.client_state, vector_exchange.packet_06[:95], **IDENTITIES)
    assert caught.value.code == 0


def test_iteration_cap_is_code_3():
    too_many = spoke.Public(iterations=spoke.MAX_ITERATIONS + 1, cipher0=0, cipher1=0, salt=SALT)
    with pytest.raises(spoke.SpokeError) as caught:
        spoke.Public.decode(too_many.encode())
    assert caught.value.code == spoke.FAILURE_BAD_PUBLIC == 3
    with pytest.raises(spoke.SpokeError) as caught:
        spoke.hello(PASSWORD, too_many)
    assert caught.value.code == 3


def test_hostile_iteration_count_is_refused_before_any_work():
    hostile = bytearray.fromhex(PUBLIC)
    hostile[4:12] = (2**63).to_bytes(8, "big")
    with pytest.raises(spoke.SpokeError) as caught:
        spoke.hello(PASSWORD, bytes(hostile))
    assert caught.value.code == 3


def test_zero_iterations_is_code_3():
    public = bytearray.fromhex(PUBLIC)
    public[4:12] = bytes(8)
    with pytest.raises(spoke.SpokeError) as caught:
        spoke.Public.decode(bytes(public))
    assert caught.value.code == 3


def test_generate_refuses_a_public_it_could_not_accept():
    with pytest.raises(ValueError):
        spoke.generate(PASSWORD, iterations=spoke.MAX_ITERATIONS + 1)
    with pytest.raises(ValueError):
        spoke.generate(PASSWORD, ciphers=(0, 3))
    with pytest.raises(ValueError):
        spoke.generate(PASSWORD, salt=b"short")


# --- the public --------------------------------------------------------------------------


def test_public_decode_of_the_vector():
    public = spoke.Public.decode(bytes.fromhex(PUBLIC))
    assert public == spoke.Public(
        version=1, algorithm=2, iterations=16, cipher0=0, cipher1=2, hash=4, salt=SALT
    )
    assert public.ciphers == (0, 2)


def test_public_round_trip():
    public = spoke.Public(iterations=4096, cipher0=0, cipher1=1, salt=bytes(range(16)))
    encoded = public.encode()
    assert len(encoded) == spoke.PUBLIC_SIZE == 34
    assert spoke.Public.decode(encoded) == public
    assert spoke.Public.decode(encoded).encode() == encoded


def test_public_version_is_ignored_like_bob():
    public = bytearray.fromhex(PUBLIC)
    public[0:2] = b"\x00\x07"
    assert spoke.Public.decode(bytes(public)).version == 7


@pytest.mark.parametrize(
    "offset, value",
    [
        pytest.param(2, 1, id="algorithm-1"),
        pytest.param(2, 3, id="algorithm-3"),
        pytest.param(12, 3, id="cipher0-3"),
        pytest.param(14, 0xFFFF, id="cipher1-ffff"),
        pytest.param(16, 1, id="hash-1"),
        pytest.param(16, 5, id="hash-5"),
    ],
)
def test_public_rejects_unknown_ids(offset, value):
    public = bytearray.fromhex(PUBLIC)
    public[offset : offset + 2] = value.to_bytes(2, "big")
    with pytest.raises(spoke.SpokeError) as caught:
        spoke.Public.decode(bytes(public))
    assert caught.value.code == 3


@pytest.mark.parametrize("length", [0, 33, 35, 162])
def test_public_rejects_bad_length(length):
    data = (bytes.fromhex(PUBLIC) * 5)[:length]
    with pytest.raises(spoke.SpokeError) as caught:
        spoke.Public.decode(data)
    assert caught.value.code == 3


def test_secrets_stay_out_of_reprs(vector_exchange):
    for value in (vector_exchange.secret, vector_exchange.client_state, vector_exchange.client_keys):
        text = repr(value)
        assert SUB0 not in text and MNKL[128:192] not in text and X_SCALAR.hex() not in text


def test_spoke_error_message():
    error = spoke.SpokeError(1, "validator mismatch")
    assert error.code == 1
    assert "validator mismatch" in str(error)
