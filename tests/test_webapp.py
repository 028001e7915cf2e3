"""The browser peer's page on the relay's WebSocket port: ``relay.webapp``'s rules alone,
then a real relay answering over plain sockets, and ``peer send`` printing the page's link."""

from __future__ import annotations

import contextlib
import configparser
import http.client
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer.address import parse_relay
from relay import transports, webapp, wire
from relay.webapp import CSP, NOT_SERVED, WebApp, clean_path, file_of

from processes import ROOT, child_env, ready_line, stop_quietly
from transport_helpers import READY, make_certificates

APP = ROOT / "peer" / "browser"
WORDS = ROOT / "peer" / "words" / "eff_large.txt"
SECURITY = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
TRAVERSALS = [
    "/../relay/cli.py", "/%2e%2e/relay/cli.py", "/%2E%2E/%2e%2e/setup.cfg", "/..%2frelay/cli.py",
    "//etc/passwd", "/lib/", "/vendor", "/vendor/", "/vendor//noble.js", "/./vendor/noble.js",
    "/vendor/../vendor/noble.js", "/vendor/noble.js%00", "/vendor/noble.js\x00",
    "/vendor%2fnoble.js", "/vendor%2Fnoble.js", "/vendor%5cnoble.js", "/vendor\\noble.js",
    "/%ff", "/%25%32%65%25%32%65/relay/cli.py", "/__init__.py", "/../words/eff_large.txt",
    "/cli.py", "/vendor/noble.js/", "vendor/noble.js", "*", "/.hidden.js",
]


def served_on_disk() -> dict[str, bytes]:
    """What the relay must serve: every app file of a known type (not hidden), and the words."""
    files = {}
    for path in sorted(APP.rglob("*")):
        rel = path.relative_to(APP)
        if path.is_file() and webapp.content_type(path.name) is not None and \
                not any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            files[rel.as_posix()] = path.read_bytes()
    files["words.txt"] = WORDS.read_bytes()
    return files


def has_security_headers(headers, connection: str = "close") -> None:
    """``connection``: what the answer says of its connection (a served page over the wire
    keeps it for the browser's next request)."""
    got = {name: value for name, value in headers}
    for name, value in SECURITY.items():
        assert got.get(name) == value, (name, got.get(name))
    assert got.get("Connection") == connection
    assert "Content-Length" in got


@pytest.fixture(scope="module")
def app() -> WebApp:
    return WebApp.load()


# -- relay.webapp alone --------------------------------------------------------------------


def test_the_app_is_loaded_byte_for_byte_from_the_package(app):
    assert {name: found.body for name, found in app.files.items()} == served_on_disk()
    assert "vendor/noble.js" in app.files and "words.txt" in app.files


def test_the_index_is_served_at_the_root_or_its_absence_is_said():
    with_index = WebApp({"index.html": file_of(b"<!doctype html>\n", "index.html")})
    root = with_index.respond("GET", "/")
    assert (root.status, root.body) == (200, b"<!doctype html>\n")
    assert root.header("Content-Type") == "text/html; charset=utf-8"
    without = WebApp({"vendor/noble.js": file_of(b"x", "noble.js")})
    missing = without.respond("GET", "/")
    assert missing.status == 404
    assert missing.body == b"the browser peer's page is not installed on this relay (no index.html)\n"


def test_the_real_root_is_index_html(app):
    if not (APP / "index.html").exists():
        pytest.skip("peer/browser/index.html does not exist yet")
    root = app.respond("GET", "/")
    assert (root.status, root.body) == (200, (APP / "index.html").read_bytes())


@pytest.mark.parametrize("name, kind", [
    ("index.html", "text/html; charset=utf-8"), ("a.js", "text/javascript; charset=utf-8"),
    ("s.css", "text/css; charset=utf-8"), ("w.txt", "text/plain; charset=utf-8"),
    ("R.md", "text/plain; charset=utf-8"), ("LICENSE.noble", "text/plain; charset=utf-8"),
    ("LICENSE", "text/plain; charset=utf-8"), ("i.svg", "image/svg+xml"), ("i.png", "image/png"),
    ("app.webmanifest", "application/manifest+json"),
    ("x.py", None), ("build", None), ("x.json", None), ("x.map", None),
])
def test_content_types(name, kind):
    assert webapp.content_type(name) == kind
    found = file_of(b"body", name)
    if kind is None:
        assert found is None
    else:
        answer = WebApp({f"d/{name}": found}).respond("GET", f"/d/{name}")
        assert (answer.status, answer.header("Content-Type"), answer.body) == (200, kind, b"body")


def test_every_answer_carries_the_security_headers(app):
    etag = app.files["vendor/noble.js"].etag
    answers = [
        app.respond("GET", "/vendor/noble.js"),
        app.respond("HEAD", "/vendor/noble.js"),
        app.respond("GET", "/vendor/noble.js", [(b"if-none-match", etag.encode())]),
        app.respond("GET", "/nothing"),
        app.respond("POST", "/"),
        app.error(503, "too many connections to the relay"),
        WebApp({}, enabled=False).respond("GET", "/"),
    ]
    assert [a.status for a in answers] == [200, 200, 304, 404, 405, 503, 404]
    for answer in answers:
        has_security_headers(answer.headers)
        assert answer.header("Cache-Control") == "no-cache"
        # A raw head, parsed back: the same headers, one per line.
        head = answer.encode().split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        assert head[0].startswith(f"HTTP/1.1 {answer.status} ")
        assert head[1:] == [f"{k}: {v}" for k, v in answer.headers]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_nothing_outside_the_app_is_ever_named(app, target):
    answer = app.respond("GET", target)
    assert answer.status == 404, target
    assert answer.body == b"not found\n"
    assert clean_path(target) not in app.files


def test_paths_decode_once_and_drop_the_query(app):
    noble = (APP / "vendor" / "noble.js").read_bytes()
    for target in ("/vendor/noble.js", "/vendor/noble.js?v=1", "/vendor/nobl%65.js",
                   "/%76endor/noble.js?x=/../..", "http://relay.example.org/vendor/noble.js"):
        answer = app.respond("GET", target)
        assert (answer.status, answer.body) == (200, noble), target
    assert clean_path("/a%2520b") == "a%20b"  # decoded once: %25 is %, nothing more


def test_head_has_no_body_but_the_length_of_one(app):
    get, head = app.respond("GET", "/vendor/noble.js"), app.respond("HEAD", "/vendor/noble.js")
    assert head.body == b"" and get.body
    assert head.header("Content-Length") == get.header("Content-Length") == str(len(get.body))
    assert head.headers == get.headers
    missing = app.respond("HEAD", "/nothing")
    assert missing.status == 404 and missing.body == b"" and missing.header("Content-Length") == "10"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "get"])
def test_only_get_and_head(app, method):
    answer = app.respond(method, "/vendor/noble.js")
    assert answer.status == 405
    assert answer.header("Allow") == "GET, HEAD"
    assert answer.body == b"only GET and HEAD are served here\n"


def test_a_strong_etag_answers_if_none_match_with_304(app):
    etag = app.files["vendor/noble.js"].etag
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)  # strong: no W/
    assert app.respond("GET", "/vendor/noble.js").header("ETag") == etag
    for condition in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        answer = app.respond("GET", "/vendor/noble.js", [("If-None-Match", condition)])
        assert (answer.status, answer.body, answer.header("ETag")) == (304, b"", etag), condition
        assert answer.header("Content-Length") == str(len(app.files["vendor/noble.js"].body))
    stale = app.respond("GET", "/vendor/noble.js", [("if-none-match", '"0123"')])
    assert stale.status == 200 and stale.body == app.files["vendor/noble.js"].body
    # Another file's tag does not match this one.
    other = app.files["vendor/README.md"].etag
    assert app.respond("GET", "/vendor/noble.js", [("If-None-Match", other)]).status == 200


def test_switched_off_every_request_gets_the_same_404():
    app = WebApp.load(enabled=False)
    for method, target in (("GET", "/"), ("GET", "/vendor/noble.js"), ("POST", "/"),
                           ("GET", "/../relay/cli.py")):
        answer = app.respond(method, target)
        assert (answer.status, answer.body) == (404, NOT_SERVED.encode() + b"\n")
    app.enabled = True
    assert app.respond("GET", "/vendor/noble.js").status == 200


def test_answers_are_counted_by_status():
    app = WebApp({"a.js": file_of(b"1", "a.js")})
    app.respond("GET", "/a.js")
    app.respond("HEAD", "/a.js")
    app.respond("GET", "/b.js")
    app.respond("POST", "/a.js")
    app.respond("GET", "/a.js", [("if-none-match", app.files["a.js"].etag)])
    assert dict(app.requests) == {200: 2, 404: 1, 405: 1, 304: 1}


def test_hidden_files_and_unknown_types_are_never_loaded(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "a.js").write_bytes(b"a")
    (tmp_path / ".secret.js").write_bytes(b"s")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config.txt").write_bytes(b"g")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.txt").write_bytes(b"c")
    (tmp_path / "build.sh").write_bytes(b"#!/bin/sh")
    (tmp_path / "lib" / "loop").symlink_to(tmp_path)  # a loop: bounded by MAX_DEPTH
    files = webapp.load_files(tmp_path)
    assert "lib/a.js" in files
    assert not any(name.startswith(".") or "/." in name or "__pycache__" in name
                   or name.endswith(".sh") for name in files)
    assert max(name.count("/") for name in files) <= webapp.MAX_DEPTH


def test_setup_cfg_ships_every_type_the_relay_serves():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    patterns = setup.get("options.package_data", "peer").split()
    for suffix in webapp.TYPES:
        assert f"browser/**/*{suffix}" in patterns, suffix
    assert "browser/**/LICENSE*" in patterns
    assert "words/*.txt" in patterns


# -- a real relay --------------------------------------------------------------------------


class RealRelay:
    def __init__(self, *extra: str, tls: bool = False) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "0",
             "--secure-port", "0", "--ws-port", "0", "--metrics", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env())
        match = ready_line(self.process, READY, 20)
        self.ws_port = int(match[3])
        self.metrics_port = int(re.search(rb"metrics on 127\.0\.0\.1:(\d+)", match.string)[1])
        self.tls = tls

    def stop(self) -> None:
        stop_quietly(self.process)


@pytest.fixture(scope="module")
def relay():
    running = RealRelay("-q")
    try:
        yield running
    finally:
        running.stop()


def fetch(port: int, target: str, method: str = "GET", headers: dict | None = None,
          context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        connection = http.client.HTTPSConnection("localhost", port, timeout=10, context=context)
    try:
        connection.request(method, target, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_the_relay_serves_the_page_with_every_header(relay):
    status, headers, body = fetch(relay.ws_port, "/")
    if (APP / "index.html").exists():
        assert (status, body) == (200, (APP / "index.html").read_bytes())
        assert headers["Content-Type"] == "text/html; charset=utf-8"
    else:
        assert status == 404 and b"no index.html" in body
    has_security_headers(headers.items(), "keep-alive")
    assert headers["Content-Length"] == str(len(body))
    for name, expected in served_on_disk().items():
        status, headers, body = fetch(relay.ws_port, "/" + name)
        assert (status, body) == (200, expected), name
        assert headers["Content-Type"] == webapp.content_type(Path(name).name)
        assert re.fullmatch(r'"[0-9a-f]{32}"', headers["ETag"])
        has_security_headers(headers.items(), "keep-alive")


def test_head_404_405_and_304_over_the_wire(relay):
    status, headers, body = fetch(relay.ws_port, "/vendor/noble.js", "HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == str((APP / "vendor" / "noble.js").stat().st_size)
    # http.client would not show a HEAD's stray body: read the bytes themselves.
    raw = raw_request(relay.ws_port, b"HEAD /vendor/noble.js HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
    assert raw.endswith(b"\r\n\r\n") and raw.startswith(b"HTTP/1.1 200 ")
    status, headers, body = fetch(relay.ws_port, "/nothing.js")
    assert (status, body) == (404, b"not found\n")
    has_security_headers(headers.items(), "keep-alive")
    status, headers, body = fetch(relay.ws_port, "/", "POST")
    assert (status, headers["Allow"], body) == (405, "GET, HEAD", b"only GET and HEAD are served here\n")
    etag = fetch(relay.ws_port, "/vendor/noble.js")[1]["ETag"]
    status, headers, body = fetch(relay.ws_port, "/vendor/noble.js", headers={"If-None-Match": etag})
    assert (status, body, headers["ETag"]) == (304, b"", etag)


@pytest.mark.parametrize("target", [t for t in TRAVERSALS if t.startswith("/") and "\x00" not in t
                                    and "\\" not in t])
def test_traversal_over_the_wire(relay, target):
    answer = raw_request(relay.ws_port, b"GET " + target.encode() + b" HTTP/1.1\r\nHost: r\r\n"
                                        b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:100]
    assert answer.endswith(b"\r\n\r\nnot found\n")


class Answers:
    """HTTP answers read one by one from a raw socket (head, then Content-Length bytes)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def next(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, f"the relay closed the connection instead of answering: {self.buffer[:200]!r}"
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        length = int(headers["Content-Length"])
        while len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            assert chunk, "the relay closed the connection in the middle of an answer"
            self.buffer += chunk
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    def closed_within(self, seconds: float) -> bool:
        """Whether the relay closes the connection (nothing more said) within ``seconds``."""
        self.sock.settimeout(seconds)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False


@contextlib.contextmanager
def kept_connection(relay):
    """A raw connection to the relay's WebSocket port, and its answers."""
    with socket.create_connection(("127.0.0.1", relay.ws_port), timeout=10) as sock:
        yield sock, Answers(sock)


def get(path: str, *extra: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: r", *extra, "", ""]).encode()


def test_one_connection_serves_the_page_file_after_file(relay):
    # A browser loads the page's thirty-odd files over a few kept connections, not one
    # connection (and, over TLS, one handshake) each.
    names = list(served_on_disk())
    with kept_connection(relay) as (sock, answers):
        for name in names:
            sock.sendall(get("/" + name))
            status, headers, body = answers.next()
            assert (status, body) == (200, served_on_disk()[name]), name
            assert (headers["Connection"], headers["Keep-Alive"]) == ("keep-alive", "timeout=5")
        sock.sendall(get("/nothing.js"))  # a 404 is an answer too: the connection stays
        assert answers.next()[0] == 404
        sock.sendall(get("/", "Connection: close"))  # the client's last request
        status, headers, _ = answers.next()
        assert (status, headers["Connection"]) == (200, "close")
        assert answers.closed_within(5)


def test_a_kept_connection_is_closed_when_idle_or_used_up_or_old_http(relay):
    with kept_connection(relay) as (sock, answers):
        sock.sendall(get("/app.js"))
        assert answers.next()[0] == 200
        started = time.monotonic()
        assert answers.closed_within(15)  # KEEP_ALIVE_IDLE, 5 s, with room for a slow host
        assert time.monotonic() - started > 3
    with kept_connection(relay) as (sock, answers):
        for count in range(1, transports.MAX_PAGE_REQUESTS + 1):
            sock.sendall(get("/style.css"))
            status, headers, _ = answers.next()
            assert status == 200
            assert headers["Connection"] == ("close" if count == transports.MAX_PAGE_REQUESTS else "keep-alive")
        assert answers.closed_within(5)
    with kept_connection(relay) as (sock, answers):
        sock.sendall(b"GET /app.js HTTP/1.0\r\n\r\n")
        assert answers.next()[1]["Connection"] == "close"
        assert answers.closed_within(5)
    with kept_connection(relay) as (sock, answers):
        sock.sendall(get("/app.js") + get("/style.css"))  # pipelined: answered, then closed
        assert answers.next()[1]["Connection"] == "close"
        assert answers.closed_within(5)


def test_a_websocket_upgrade_may_follow_pages_on_one_connection(relay):
    with kept_connection(relay) as (sock, answers):
        sock.sendall(get("/app.js"))
        assert answers.next()[0] == 200
        sock.sendall(b"GET /handshake HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101 "), head[:100]


def test_a_bad_request_line_gets_400(relay):
    answer = raw_request(relay.ws_port, b"GET /vendor/noble.js\x00 HTTP/1.1\r\nHost: r\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


def test_an_endpoint_without_the_upgrade_gets_426(relay):
    status, headers, body = fetch(relay.ws_port, "/handshake")
    assert status == 426 and headers["Upgrade"] == "websocket"
    assert body == b"not a WebSocket upgrade request: /handshake takes WebSocket upgrades only\n"


def test_websocket_upgrades_work_beside_the_page(relay):
    assert say_hello(relay.ws_port).startswith(b"127.0.0.1:")
    # An upgrade to another path keeps its 404, page or no page.
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    for path in ("/", "/vendor/noble.js"):
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{relay.ws_port}{path}", open_timeout=10).close()
        assert refused.value.response.status_code == 404
        assert b"no such endpoint" in refused.value.response.body


def say_hello(port: int, context: ssl.SSLContext | None = None) -> bytes:
    """A Hello over a WebSocket to /handshake: the identity the relay answers."""
    from websockets.sync.client import connect

    scheme, host = ("ws", "127.0.0.1") if context is None else ("wss", "localhost")
    with connect(f"{scheme}://{host}:{port}/handshake", ssl=context, open_timeout=10) as ws:
        ws.send(wire.encode(0, wire.HelloClient()))
        parser = wire.Parser()
        while (frame := parser.next_frame()) is None:
            parser.feed(ws.recv(timeout=10))
        assert isinstance(frame.packet, wire.ClientIdentity)
        return frame.packet.identity


def test_the_metric_counts_page_answers(relay):
    before = scrape_web_requests(relay.metrics_port)
    fetch(relay.ws_port, "/vendor/noble.js")
    fetch(relay.ws_port, "/vendor/noble.js")
    fetch(relay.ws_port, "/nothing")
    fetch(relay.ws_port, "/", "DELETE")
    after = scrape_web_requests(relay.metrics_port)
    assert after.get("200", 0) - before.get("200", 0) == 2
    assert after.get("404", 0) - before.get("404", 0) == 1
    assert after.get("405", 0) - before.get("405", 0) == 1


def scrape(port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        return connection.getresponse().read().decode()
    finally:
        connection.close()


def scrape_web_requests(port: int) -> dict[str, int]:
    return {status: int(float(value)) for status, value in
            re.findall(r'^peer_relay_web_requests_total\{status="(\d+)"\} (\S+)$', scrape(port), re.M)}


def metric(port: int, name: str) -> float | None:
    found = re.search(rf"^{name} (\S+)$", scrape(port), re.M)
    return float(found[1]) if found else None


def test_no_web_app_and_its_reload(tmp_path):
    settings = tmp_path / "relay.toml"
    settings.write_text("web-app = false\n")
    running = RealRelay("--config", str(settings))
    try:
        status, headers, body = fetch(running.ws_port, "/")
        assert (status, body) == (404, b"this relay does not serve the browser peer\n")
        has_security_headers(headers.items(), "keep-alive")
        assert fetch(running.ws_port, "/vendor/noble.js")[0] == 404
        assert say_hello(running.ws_port).startswith(b"127.0.0.1:")  # the endpoints stay
        settings.write_text("web-app = true\n")
        running.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20  # a bound, not a measurement
        while fetch(running.ws_port, "/vendor/noble.js")[0] != 200:
            assert time.monotonic() < deadline, "the reload did not turn the page on"
            time.sleep(0.05)
    finally:
        running.stop()
    off = RealRelay("--no-web-app")
    try:
        assert fetch(off.ws_port, "/vendor/README.md")[:3:2] == (404, NOT_SERVED.encode() + b"\n")
    finally:
        off.stop()


def test_a_refused_page_request_gets_503_with_the_headers():
    running = RealRelay("--max-connections", "1")
    try:
        # One connection that has not finished its request holds the only place.
        with socket.create_connection(("127.0.0.1", running.ws_port), timeout=10) as holder:
            holder.sendall(b"GET / HTTP/1.1\r\n")
            deadline = time.monotonic() + 20  # a bound, not a measurement
            while metric(running.metrics_port, "peer_relay_connections_admitted") != 1:
                assert time.monotonic() < deadline, "the relay never admitted the first connection"
                time.sleep(0.02)
            status, headers, body = fetch(running.ws_port, "/")
        assert (status, body) == (503, b"too many connections to the relay\n")
        has_security_headers(headers.items())
        assert scrape_web_requests(running.metrics_port) == {"503": 1}
    finally:
        running.stop()


def test_the_page_over_https_on_the_wss_port(tmp_path):
    certificates = make_certificates(tmp_path)
    running = RealRelay("-q", "--tls-cert", str(certificates.cert), "--tls-key", str(certificates.key))
    try:
        context = ssl.create_default_context(cafile=str(certificates.ca))
        status, headers, body = fetch(running.ws_port, "/vendor/noble.js", context=context)
        assert (status, body) == (200, (APP / "vendor" / "noble.js").read_bytes())
        has_security_headers(headers.items(), "keep-alive")
        assert say_hello(running.ws_port, context).startswith(b"127.0.0.1:")
    finally:
        running.stop()


# -- peer send prints the link -------------------------------------------------------------


@pytest.mark.parametrize("relay_text, link", [
    ("ws://127.0.0.1:9002/", "http://127.0.0.1:9002/#receive/7-a-b"),
    ("wss://relay.example.org/peer-relay/", "https://relay.example.org/peer-relay/#receive/7-a-b"),
    ("wss://relay.example.org:8443", "https://relay.example.org:8443/#receive/7-a-b"),
    ("ws://[::1]:80/p/", "http://[::1]/p/#receive/7-a-b"),
    ("tcp://127.0.0.1:9000", None),
    ("tls://relay.example.org:9000", None),
])
def test_the_link_of_a_relay(relay_text, link):
    assert parse_relay(relay_text).page_link("7-a-b") == link
    if link is not None:
        assert parse_relay(relay_text).page_link() == link.split("#", 1)[0]
        assert parse_relay(relay_text).page_link("a b/c?d#e").endswith("#receive/a%20b%2Fc%3Fd%23e")


def sender_lines(relay: RealRelay, tmp_path: Path, *args: str, done) -> str:
    """Start ``peer send`` through the relay's ws:// address; its stderr once ``done(it)``."""
    import os
    import select

    (tmp_path / "hello.txt").write_text("hello\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "peer", "send", "--relay", f"ws://127.0.0.1:{relay.ws_port}/",
         *args, "hello.txt"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=child_env())
    try:
        err = b""
        deadline = time.monotonic() + 60  # a bound, not a measurement
        while not done(err.decode(errors="replace")):
            assert time.monotonic() < deadline, err
            if select.select([process.stderr], [], [], 1.0)[0]:
                chunk = os.read(process.stderr.fileno(), 65536)
                assert chunk, err
                err += chunk
        return err.decode()
    finally:
        process.kill()
        process.wait(10)
        process.stdout.close()
        process.stderr.close()


def link_in(screen: str, port: int) -> str | None:
    """The link ``peer send`` printed for its generated code, if it did already."""
    code = re.search(r"peer recv --relay \S+ (\S+)\n", screen)
    return code and f"http://127.0.0.1:{port}/#receive/{code[1]}"


def test_peer_send_prints_the_link_and_its_qr_code(relay, tmp_path):
    from peer import qr

    def qr_of_link_shown(screen: str) -> bool:
        link = link_in(screen, relay.ws_port)
        return link is not None and qr.render(link) in screen

    screen = sender_lines(relay, tmp_path, "--qr", done=qr_of_link_shown)
    link = link_in(screen, relay.ws_port)
    assert f"\nOr open in a browser: {link}\n" in screen
    code = link.rsplit("/", 1)[1]
    # The QR code holds the link (a phone's camera opens the page), not the bare code.
    assert qr.render(code) not in screen


def test_a_chosen_code_stays_out_of_the_link(relay, tmp_path):
    screen = sender_lines(relay, tmp_path, "--password", "my-own-secret",
                          done=lambda text: "type the code there\n" in text)
    assert f"Or open http://127.0.0.1:{relay.ws_port}/ in a browser and type the code there" in screen
    assert "my-own-secret" not in screen
