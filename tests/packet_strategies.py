"""Hypothesis strategies for handshake packets, shared by the fuzz and adversarial suites."""

from hypothesis import strategies as st

from relay import wire

uids = st.integers(0, 0xFFFF)
identities = st.binary(max_size=wire.MAX_IDENTITY).filter(lambda b: b"\0" not in b and b"\n" not in b)
publics = st.binary(min_size=34, max_size=34)
validators = st.binary(min_size=64, max_size=64)
points = st.binary(min_size=32, max_size=32)

packets = st.one_of(
    st.builds(wire.HelloServer, publics),
    st.just(wire.HelloClient()),
    st.builds(wire.ServerIdentity, identities),
    st.builds(wire.ClientIdentity, identities),
    st.builds(wire.NewServer, uids, publics, identities),
    st.builds(wire.ClientValidator, validators),
    st.builds(wire.YAndServerValidator, points, validators),
    st.builds(wire.XAndClientIdentity, points, identities),
    st.just(wire.Agreement()),
    st.builds(wire.Closed, uids),
    st.just(wire.Accepted()),
    st.just(wire.Refused()),
    st.builds(wire.RelayFailure, st.sampled_from([b"C", b"S", b"H", b"N"]), uids),
    st.builds(wire.SpokeFailure, st.integers(0, 4)),
    st.just(wire.Done()),
    st.just(wire.Timeout()),
)
"""Every packet type with arbitrary (but well-formed) fields."""
