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


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tls://relay.example.org:7000", RelayAddress("relay.example.org", 7000, 9001, "tls")),
        ("tls://relay.example.org", RelayAddress("relay.example.org", 9000, 9001, "tls")),
        ("ws://127.0.0.1:8080", RelayAddress("127.0.0.1", 8080, 9001, "ws", "/")),
        ("ws://127.0.0.1:8080/", RelayAddress("127.0.0.1", 8080, 9001, "ws", "/")),
        ("ws://host", RelayAddress("host", 80, 9001, "ws", "/")),
        ("wss://relay.example.org", RelayAddress("relay.example.org", 443, 9001, "wss", "/")),
        ("WSS://relay.example.org/peer-relay", RelayAddress("relay.example.org", 443, 9001, "wss", "/peer-relay/")),
        ("wss://[::1]:8443/a/b/", RelayAddress("::1", 8443, 9001, "wss", "/a/b/")),
    ],
)
def test_tls_and_websocket_forms(text, expected):
    assert parse_relay(text) == expected


def test_one_websocket_address_names_both_endpoints():
    address = parse_relay("wss://relay.example.org/peer-relay/")
    assert address.endpoint_path("handshake") == "/peer-relay/handshake"
    assert address.endpoint_path("room") == "/peer-relay/room"
    assert address.host_header() == "relay.example.org"  # the default port is left out
    assert parse_relay("ws://[::1]:8080/").host_header() == "[::1]:8080"
    assert parse_relay("ws://h/").endpoint_path("room") == "/room"


def test_a_ca_certificate_is_carried_for_tls_schemes_only():
    assert parse_relay("wss://h/", cacert="ca.pem").cacert == "ca.pem"
    assert parse_relay("tls://h:1", cacert="ca.pem").cacert == "ca.pem"
    for text in ["h:1", "tcp://h:1", "ws://h/"]:
        with pytest.raises(AddressError, match="tls:// and wss://"):
            parse_relay(text, cacert="ca.pem")


@pytest.mark.parametrize("text", ["ws://h/x?y=1", "wss://h/#top", "ws://", "wss://h:0/", "tls://h:1/x",
                                  "http://h/", "ws://a b/"])
def test_rejected_tls_and_websocket_forms(text):
    with pytest.raises(AddressError):
        parse_relay(text)


def test_tls_and_websocket_addresses_print_as_urls():
    for text in ["tls://h:7", "ws://h:8080/", "wss://h/", "wss://[::1]:8443/p/"]:
        assert str(parse_relay(text)) == text
