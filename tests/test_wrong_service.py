"""Issue 15, item 6 and item 10's reachability check: a relay address that is another service
(or nothing at all) ends `peer send` and `peer recv` with one clear line and exit 1, instead
of a wait without end, and `peer send` prints no code for a relay it could not reach.

The fake services are plain sockets on loopback, each in a thread; the peers are real
processes, bounded by ``subprocess.run``'s timeout (generous: the verdict comes in seconds).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from processes import child_env

CODE = "417-cobalt-lemon-unicycle"
HTTP_ANSWER = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
               b"\r\nbad request\n")
HTTP_NOT_FOUND = (b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 9\r\n"
                  b"\r\nnot here\n")
HTTP_PAGE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 7\r\n"
             b"\r\n<html>\n")


class FakeService:
    """A TCP service on an ephemeral loopback port that is not a relay: ``behaviour`` is
    "silent" (accepts and says nothing), "http" (reads, answers ``answer``, stays open) or
    "close" (closes each connection at once)."""

    def __init__(self, behaviour: str, answer: bytes = HTTP_ANSWER) -> None:
        self.behaviour = behaviour
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeService:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        for conn in self._held:
            conn.close()
        self.listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            if self.behaviour == "close":
                conn.close()
                continue
            self._held.append(conn)
            if self.behaviour == "http":
                conn.settimeout(5)
                try:
                    conn.recv(4096)
                    conn.sendall(self.answer)
                except OSError:
                    pass


def peer(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peer", *args], stdin=subprocess.DEVNULL,
        capture_output=True, text=True, env=child_env(), timeout=timeout,
    )


def run_side(side: str, relay: list[str]) -> subprocess.CompletedProcess:
    if side == "send":
        return peer("send", *relay, "-y", "--text", "hello")  # a generated code
    return peer("recv", *relay, "-y", CODE)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("peer: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


SIDES = ["send", "recv"]


@pytest.mark.parametrize("side", SIDES)
def test_a_silent_service_is_not_a_relay(side):
    with FakeService("silent") as service:
        result = run_side(side, ["--relay", f"127.0.0.1:{service.port}"])
    line = one_error_line(result)
    assert f"127.0.0.1:{service.port} is not a peer-relay relay (no answer to Hello within" in line
    assert "Code:" not in result.stdout
    if side == "recv":
        assert service.accepted == 2  # the scoped Hello (10), then its fallback to 01


@pytest.mark.parametrize("side", SIDES)
def test_an_http_server_is_not_a_relay(side):
    with FakeService("http") as service:
        result = run_side(side, ["--relay", f"127.0.0.1:{service.port}"])
    line = one_error_line(result)
    assert (f"127.0.0.1:{service.port} is not a peer-relay relay "
            "(it answered with something else: 'HTTP/1.1 400 Bad Request')") in line
    assert "Code:" not in result.stdout


@pytest.mark.parametrize("side", SIDES)
def test_a_service_that_closes_at_once(side):
    with FakeService("close") as service:
        result = run_side(side, ["--relay", f"127.0.0.1:{service.port}"])
    line = one_error_line(result)
    assert f"127.0.0.1:{service.port} closed the connection without answering Hello" in line
    assert "not a peer-relay relay" in line
    assert "Code:" not in result.stdout


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("answer, shown", [(HTTP_NOT_FOUND, "HTTP 404: not here"), (HTTP_PAGE, "HTTP 200: <html>")],
                         ids=["404", "200"])
def test_a_web_server_at_a_websocket_url(side, answer, shown):
    with FakeService("http", answer) as service:
        result = run_side(side, ["--relay", f"ws://127.0.0.1:{service.port}/"])
    line = one_error_line(result)
    assert (f"ws://127.0.0.1:{service.port}/ is not a peer-relay relay "
            f"(it answered the WebSocket upgrade with {shown})") in line
    assert "Code:" not in result.stdout


def test_a_secure_port_that_is_another_service(relay_process):
    """The handshake goes through a real relay; the secure port named is a web server."""
    with FakeService("http") as service:
        relay = ["--relay", relay_process.address, "--secure-port", str(service.port)]
        sender = subprocess.Popen(
            [sys.executable, "-m", "peer", "send", *relay, "--code", CODE, "--text", "hello"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=child_env(),
        )
        try:
            received = peer("recv", *relay, "-y", CODE)
            sent_status = sender.wait(90)
            sent_errors = sender.stderr.read()
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait(10)
            sender.stderr.close()
    line = one_error_line(received)
    assert f"secure port {service.port} is not a peer-relay secure room" in line
    assert "something else: 'HT'" in line
    assert sent_status == 1, sent_errors


def test_send_prints_no_code_when_the_relay_is_down():
    """Item 10: the relay is reached (and answers) before the code is shown."""
    with socket.socket() as unused:  # an ephemeral port nothing listens on once closed
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = peer("send", "--relay", f"127.0.0.1:{port}", "--text", "hello")
    line = one_error_line(result)
    assert f"cannot reach the relay at 127.0.0.1:{port}: connection refused" in line
    assert "Code:" not in result.stdout
    assert "peer recv" not in result.stdout + result.stderr


def test_send_prints_the_code_once_the_relay_answered(relay_process):
    """The reachability check does not hide the code from a sender whose relay works."""
    sender = subprocess.Popen(
        [sys.executable, "-m", "peer", "send", *relay_process.peer_args(), "--text", "hello"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, env=child_env(),
    )
    try:
        timer = threading.Timer(60, sender.kill)  # bounds the readline
        timer.start()
        try:
            first = sender.stdout.readline()
        finally:
            timer.cancel()
        assert first.startswith("Code: "), first
        code = first.split()[1]
        received = peer("recv", *relay_process.peer_args(), "-y", code)
        assert received.returncode == 0, received.stderr
        assert received.stdout == "hello\n"
        assert sender.wait(60) == 0
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
        sender.stdout.close()
