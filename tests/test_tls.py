"""TLS on the relay's ports (tls:// and wss://): transfers, certificate checks, stalled handshakes."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time

import pytest
import trio

from peer import handshake
from peer.address import parse_relay
from peer.meeting import HandshakeFailed, meet
from peer.rendezvous import RelayError
from peer.transport import client_tls_context

from processes import child_env, finish, peer
from transport_helpers import LIMIT, exchange, make_certificates, running, start_relay, tcp_address, ws_address

CODE = "123-cobalt-lemon-unicycle"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """A second authority, which did not sign the relay's certificate."""
    return make_certificates(tmp_path_factory.mktemp("other"), prefix="other")


def tls_settings(certificates) -> dict:
    return {"tls_cert": str(certificates.cert), "tls_key": str(certificates.key)}


@pytest.mark.parametrize("sender, receiver", [("tls", "wss"), ("wss", "tls"), ("wss", "wss")])
async def test_rooms_pair_across_tls_transports(certificates, sender, receiver):
    with trio.fail_after(LIMIT):
        async with running(**tls_settings(certificates)) as ports:
            ca = str(certificates.ca)
            address = {"tls": tcp_address(ports, "tls", cacert=ca),
                       "wss": ws_address(ports, "wss", cacert=ca)}
            await exchange(address[sender], address[receiver])


@pytest.mark.parametrize("scheme", ["tls", "wss"])
async def test_a_certificate_from_another_authority_is_refused_in_one_line(certificates, other_ca, scheme):
    with trio.fail_after(LIMIT):
        async with running(**tls_settings(certificates)) as ports:
            port = ports.port if scheme == "tls" else ports.ws_port
            address = parse_relay(f"{scheme}://127.0.0.1:{port}/", cacert=str(other_ca.ca))
            with pytest.raises(RelayError) as failure:
                await meet(address, handshake.ReceiverHandshake(CODE.encode()), notify=lambda e: None)
    message = str(failure.value)
    assert "certificate verify failed: unable to get local issuer certificate" in message
    assert "\n" not in message


async def test_the_name_is_checked_too(certificates):
    """The certificate names localhost and 127.0.0.1: another name for the same relay fails."""
    with trio.fail_after(LIMIT):
        async with running(**tls_settings(certificates)) as ports:
            context = client_tls_context(str(certificates.ca))
            tcp = await trio.open_tcp_stream("127.0.0.1", ports.port)
            stream = trio.SSLStream(tcp, context, server_hostname="relay.elsewhere.example")
            with pytest.raises(trio.BrokenResourceError) as failure:
                await stream.do_handshake()
            await trio.aclose_forcefully(stream)
    assert isinstance(failure.value.__cause__, ssl.SSLCertVerificationError)


async def test_stalled_tls_handshakes_are_closed_while_a_transfer_completes(certificates):
    with trio.fail_after(LIMIT):
        # 2 s: the honest pair's TLS handshakes must beat it on a loaded CI machine.
        async with running(upgrade_timeout=2.0, **tls_settings(certificates)) as ports:
            waited: dict[int, float] = {}

            async def stall(port: int) -> None:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
                started = trio.current_time()
                try:
                    while await stream.receive_some(4096):
                        pass
                except trio.BrokenResourceError:
                    pass
                waited[port] = trio.current_time() - started

            async with trio.open_nursery() as nursery:
                for port in (ports.port, ports.secure_port, ports.ws_port):
                    nursery.start_soon(stall, port)
                ca = str(certificates.ca)
                await exchange(tcp_address(ports, "tls", cacert=ca), ws_address(ports, "wss", cacert=ca))
    assert len(waited) == 3
    assert all(1.9 < seconds < 30 for seconds in waited.values()), waited


async def test_plain_tcp_to_a_tls_port_fails_without_harm(certificates):
    with trio.fail_after(LIMIT):
        async with running(**tls_settings(certificates)) as ports:
            with pytest.raises(HandshakeFailed, match="closed the connection without answering Hello"):
                await meet(tcp_address(ports), handshake.ReceiverHandshake(CODE.encode()),
                           notify=lambda e: None)
            ca = str(certificates.ca)
            await exchange(tcp_address(ports, "tls", cacert=ca), tcp_address(ports, "tls", cacert=ca))


def test_an_unusable_certificate_stops_the_relay_with_one_line(tmp_path):
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    for args, expected in [(["--tls-cert", str(tmp_path / "missing.pem")], "no such file"),
                           (["--tls-cert", str(tmp_path / "bad.pem")], "cannot use the TLS certificate")]:
        result = subprocess.run(
            [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "0", "--secure-port", "0", *args],
            capture_output=True, text=True, timeout=30, env=child_env(),
        )
        assert result.returncode == 1
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- real processes: the peers verify with the system store (SSL_CERT_FILE points it at our CA) --


@pytest.fixture(scope="module")
def tls_relay(certificates):
    relay = start_relay("--ws-port", "0", "--tls-cert", str(certificates.cert),
                        "--tls-key", str(certificates.key))
    try:
        yield relay
    finally:
        relay.stop()


@pytest.mark.parametrize("sender, receiver", [("tls", "wss"), ("wss", "tls")])
def test_peer_processes_over_tls(tls_relay, certificates, tmp_path, sender, receiver):
    data = os.urandom(2 * 1024 * 1024 + 3)
    (tmp_path / "data.bin").write_bytes(data)
    args = {"tls": tls_relay.tcp_args("tls"), "wss": tls_relay.ws_args("wss", host="localhost")}
    trust = {"SSL_CERT_FILE": str(certificates.ca)}
    code = ("6" if sender == "tls" else "7") + CODE[1:]
    out = tmp_path / "out"
    sending = peer("send", *args[sender], "--password", code, "data.bin", cwd=tmp_path, **trust)
    time.sleep(0.3)
    receiving = peer("recv", *args[receiver], "-y", "-o", f"{out}/", code, cwd=tmp_path, **trust)
    r, _, r_err = finish(receiving)
    s, _, s_err = finish(sending)
    assert (s, r) == (0, 0), s_err + r_err
    assert (out / "data.bin").read_bytes() == data


@pytest.mark.parametrize("scheme", ["tls", "wss"])
def test_a_peer_that_cannot_verify_the_relay_exits_1_with_one_line(tls_relay, other_ca, tmp_path, scheme):
    args = tls_relay.tcp_args("tls") if scheme == "tls" else tls_relay.ws_args("wss")
    receiving = peer("recv", *args, "-y", "-o", f"{tmp_path / 'out'}/", CODE, cwd=tmp_path,
                     SSL_CERT_FILE=str(other_ca.ca))
    r, _, r_err = finish(receiving)
    assert r == 1
    # One line says why (the one before it is the status line: connecting to the relay).
    assert len([line for line in r_err.splitlines() if line.startswith("peer:")]) == 1, r_err
    assert "certificate verify failed" in r_err
