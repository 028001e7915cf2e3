"""Shared by the transport tests: test certificates, and a relay process with every port."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from peer import handshake
from peer.address import RelayAddress, parse_relay
from peer.channel import Channel
from peer.meeting import meet
from relay.server import BoundPorts, RelayConfig, serve

from processes import child_env, ready_line, stop_quietly

CODE = "123-cobalt-lemon-unicycle"
LIMIT = 20
"""Seconds: a bound on every in-process test."""

READY = re.compile(
    rb"listening on 127\.0\.0\.1:(\d+) \(handshake\) and 127\.0\.0\.1:(\d+) \(secure room\)"
    rb"(?:, 127\.0\.0\.1:(\d+) \(websocket\))?"
)


@attrs.frozen
class Certificates:
    """PEM files: an authority, and a server certificate it signed for 127.0.0.1/localhost."""

    ca: Path
    cert: Path
    key: Path


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def make_certificates(directory: Path, prefix: str = "test") -> Certificates:
    """A throw-away CA and a server certificate for 127.0.0.1, ::1 and localhost."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{prefix} peer-relay test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = Certificates(directory / f"{prefix}-ca.pem", directory / f"{prefix}-cert.pem",
                         directory / f"{prefix}-key.pem")
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


@attrs.frozen
class Relay:
    """A ``peer-relay`` process on loopback, and its ports."""

    process: subprocess.Popen
    port: int
    secure_port: int
    ws_port: int | None

    def tcp_args(self, scheme: str = "tcp") -> list[str]:
        return ["--relay", f"{scheme}://127.0.0.1:{self.port}", "--secure-port", str(self.secure_port)]

    def ws_args(self, scheme: str = "ws", host: str = "127.0.0.1") -> list[str]:
        return ["--relay", f"{scheme}://{host}:{self.ws_port}/"]

    def stop(self) -> None:
        stop_quietly(self.process)


def start_relay(*extra: str, timeout: float = 20.0) -> Relay:
    """``peer-relay`` on 127.0.0.1 with ephemeral ports (add ``--ws-port 0`` for WebSocket)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "0", "--secure-port", "0",
         "-q", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=child_env(),
    )
    match = ready_line(process, READY, timeout)
    ws = int(match[3]) if match[3] else None
    return Relay(process, int(match[1]), int(match[2]), ws)


# -- an in-process relay, and a transfer through it ----------------------------------------------


@contextlib.asynccontextmanager
async def running(**overrides):
    stop = trio.Event()
    config = RelayConfig(hosts=("127.0.0.1",), port=0, secure_port=0, ws_port=0, **overrides)
    async with trio.open_nursery() as nursery:
        ports: BoundPorts = await nursery.start(lambda task_status: serve(config, stop=stop, task_status=task_status))
        try:
            yield ports
        finally:
            stop.set()


def tcp_address(ports: BoundPorts, scheme: str = "tcp", **extra) -> RelayAddress:
    return RelayAddress("127.0.0.1", ports.port, ports.secure_port, scheme=scheme, **extra)


def ws_address(ports: BoundPorts, scheme: str = "ws", **extra) -> RelayAddress:
    return parse_relay(f"{scheme}://127.0.0.1:{ports.ws_port}/", **extra)


async def exchange(sender_address: RelayAddress, receiver_address: RelayAddress,
                   size: int = 1 << 20) -> None:
    """Both handshakes through the relay, then ``size`` bytes each way through the room."""
    password = CODE.encode()
    one, other = os.urandom(size), os.urandom(size // 2)
    results: dict[str, bytes] = {}

    async def run(name, address, machine, payload, sends_key) -> None:
        if name == "receiver":
            await trio.sleep(0.05)  # the sender registers first
        meeting = await meet(address, machine, notify=lambda event: None)
        keys = meeting.paired.keys
        mine, theirs = keys.sender_to_receiver, keys.receiver_to_sender
        channel = Channel(meeting.stream, send_key=mine if sends_key else theirs,
                          receive_key=theirs if sends_key else mine)
        async with trio.open_nursery() as nursery:
            async def send() -> None:
                for start in range(0, len(payload), 30000):
                    await channel.send(payload[start:start + 30000])
                await channel.flush()
            nursery.start_soon(send)
            received = bytearray()
            want = len(other) if name == "sender" else len(one)
            while len(received) < want:
                received += await channel.receive()
        results[name] = bytes(received)
        await channel.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "sender", sender_address, handshake.SenderHandshake(password), one, True)
        nursery.start_soon(run, "receiver", receiver_address, handshake.ReceiverHandshake(password), other, False)
    assert results == {"receiver": one, "sender": other}
