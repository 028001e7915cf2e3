"""Relay address forms accepted by --relay and PEER_RELAY."""

import pytest

from peer.address import AddressError, RelayAddress, parse_relay


@pytest.mark.parametrize(
    "text, expected",
    [
        ("relay.example.org", RelayAddress("relay.example.org", 9000, 9001)),
        ("relay.example.org:7000", RelayAddress("relay.example.org", 7000, 9001)),
        ("tcp://127.0.0.1:7000", RelayAddress("127.0.0.1", 7000, 9001)),
        ("tcp://127.0.0.1:7000/", RelayAddress("127.0.0.1", 7000, 9001)),
        ("TCP://host", RelayAddress("host", 9000, 9001)),
        ("[::1]:7000", RelayAddress("::1", 7000, 9001)),
        ("[::1]", RelayAddress("::1", 9000, 9001)),
        ("::1", RelayAddress("::1", 9000, 9001)),
        ("  10.0.0.1:1 ", RelayAddress("10.0.0.1", 1, 9001)),
    ],
)
def test_accepted_forms(text, expected):
    assert parse_relay(text) == expected


def test_secure_port_is_carried():
    assert parse_relay("h:1", secure_port=2) == RelayAddress("h", 1, 2)


@pytest.mark.parametrize(
    "text",
    ["", "h:", "h:0", "h:65536", "h:x", "udp://h:1", "[::1", "[::1]x", "[nope]:1", "a b:1",
     "user@h:1", "h:1:2:3"],
)
def test_rejected_forms(text):
    with pytest.raises(AddressError):
        parse_relay(text)


def test_str_round_trips():
    for text in ["h:7", "[::1]:7", "1.2.3.4:9000"]:
        assert str(parse_relay(text)) == text
