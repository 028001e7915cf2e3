"""docs/nginx.conf run by a real nginx in front of a real relay: wss:// through the proxy.

Uses /usr/sbin/nginx (Debian's nginx or nginx-light package) and installs nothing; where it is
missing the test is skipped and says so.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from processes import ROOT, finish, peer, stop_quietly
from transport_helpers import CODE, make_certificates, start_relay

NGINX = Path("/usr/sbin/nginx")
EXAMPLE = ROOT / "docs" / "nginx.conf"

pytestmark = pytest.mark.skipif(
    not NGINX.exists(),
    reason="nginx is not installed (/usr/sbin/nginx); CI installs Debian's nginx-light package",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def configure(workdir: Path, listen_port: int, relay_ws_port: int, cert: Path, key: Path) -> Path:
    """docs/nginx.conf with loopback ports, test certificates and paths inside ``workdir``."""
    server = EXAMPLE.read_text()
    substitutions = [
        (r"listen 443 ssl;", f"listen 127.0.0.1:{listen_port} ssl;"),
        (r"\n\s*listen \[::\]:443 ssl;", ""),  # loopback IPv4 only in tests
        (r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};"),
        (r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};"),
        (r"proxy_pass http://127\.0\.0\.1:9002/;", f"proxy_pass http://127.0.0.1:{relay_ws_port}/;"),
    ]
    for pattern, replacement in substitutions:
        server, count = re.subn(pattern, replacement, server)
        assert count == 1, f"docs/nginx.conf no longer has {pattern!r}"
    temp = {name: workdir / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    config = "\n".join([
        "daemon off;",
        "master_process on;",
        "worker_processes 1;",
        # As root the workers would run as nobody, who cannot enter pytest's private tmp.
        "user root;" if os.geteuid() == 0 else "",
        f"pid {workdir / 'nginx.pid'};",
        f"error_log {workdir / 'error.log'} info;",
        "events { worker_connections 64; }",
        "http {",
        "    access_log off;",
        *(f"    {name}_temp_path {path};" for name, path in
          [("client_body", temp["body"]), ("proxy", temp["proxy"]), ("fastcgi", temp["fastcgi"]),
           ("uwsgi", temp["uwsgi"]), ("scgi", temp["scgi"])]),
        server,
        "}",
    ])
    path = workdir / "nginx.conf"
    path.write_text(config)
    return path


def wait_listening(port: int, process: subprocess.Popen, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited: {log.read_text() if log.exists() else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nginx did not listen on {port}: {log.read_text() if log.exists() else ''}")


@pytest.fixture
def nginx_in_front(tmp_path):
    """A relay (TCP ports and a plain WebSocket port) behind nginx terminating wss://."""
    certificates = make_certificates(tmp_path)
    relay = start_relay("--ws-port", "0", "--trust-proxy", "127.0.0.1")
    workdir = tmp_path / "nginx"
    workdir.mkdir()
    port = free_port()
    config = configure(workdir, port, relay.ws_port, certificates.cert, certificates.key)
    process = subprocess.Popen(
        [str(NGINX), "-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_listening(port, process, workdir / "error.log")
        yield relay, port, certificates
    finally:
        stop_quietly(process, signal.SIGQUIT)  # graceful: finish, then exit
        relay.stop()


def test_a_transfer_through_nginx_to_a_tcp_peer(nginx_in_front, tmp_path):
    relay, port, certificates = nginx_in_front
    data = os.urandom(4 * 1024 * 1024 + 5)
    (tmp_path / "data.bin").write_bytes(data)
    out = tmp_path / "out"
    through_nginx = ["--relay", f"wss://localhost:{port}/peer-relay/"]
    trust = {"SSL_CERT_FILE": str(certificates.ca)}
    sending = peer("send", *through_nginx, "--password", CODE, "data.bin", cwd=tmp_path, **trust)
    time.sleep(0.3)
    receiving = peer("recv", *relay.tcp_args(), "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
    r, _, r_err = finish(receiving)
    s, _, s_err = finish(sending)
    assert (s, r) == (0, 0), s_err + r_err
    assert (out / "data.bin").read_bytes() == data
    # The relay named the sender by the address nginx forwarded (loopback here).
    assert re.search(r"127\.0\.0\.1:\d+ offers data\.bin", r_err), r_err


def test_both_peers_through_nginx(nginx_in_front, tmp_path):
    _, port, certificates = nginx_in_front
    (tmp_path / "note.txt").write_text("through the proxy both ways\n")
    out = tmp_path / "out"
    through_nginx = ["--relay", f"wss://127.0.0.1:{port}/peer-relay/"]
    trust = {"SSL_CERT_FILE": str(certificates.ca)}
    sending = peer("send", *through_nginx, "--password", CODE, "note.txt", cwd=tmp_path, **trust)
    time.sleep(0.3)
    receiving = peer("recv", *through_nginx, "-y", "-o", f"{out}/", CODE, cwd=tmp_path, **trust)
    r, _, r_err = finish(receiving)
    s, _, s_err = finish(sending)
    assert (s, r) == (0, 0), s_err + r_err
    assert (out / "note.txt").read_text() == "through the proxy both ways\n"


def test_the_browser_peers_page_through_nginx(nginx_in_front):
    """The relay's / is the page, under nginx's prefix, over https, with its headers intact."""
    import http.client
    import ssl

    from relay.webapp import CSP

    _, port, certificates = nginx_in_front
    context = ssl.create_default_context(cafile=str(certificates.ca))

    def fetch(target: str, headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPSConnection("localhost", port, timeout=10, context=context)
        try:
            connection.request("GET", target, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    index = ROOT / "peer" / "browser" / "index.html"
    status, headers, body = fetch("/peer-relay/")
    if index.exists():
        assert (status, body) == (200, index.read_bytes())
        assert headers["Content-Type"] == "text/html; charset=utf-8"
    else:
        assert status == 404 and b"no index.html" in body
    assert headers["Content-Security-Policy"] == CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    noble = ROOT / "peer" / "browser" / "vendor" / "noble.js"
    status, headers, body = fetch("/peer-relay/vendor/noble.js")
    assert (status, body) == (200, noble.read_bytes())
    assert headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert headers["Content-Security-Policy"] == CSP
    status, _, body = fetch("/peer-relay/vendor/noble.js", {"If-None-Match": headers["ETag"]})
    assert (status, body) == (304, b"")
