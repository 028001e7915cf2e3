"""The relay as a service: systemd units, socket activation, sd_notify and the watchdog,
graceful shutdown, and what the logs may (not) contain."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio

from relay import logs, systemd
from relay.logs import Anonymizer, LogSettings, RelayFormatter
from relay.pipe import CLOSE_MARKER
from relay.server import RelayConfig, serve

from processes import ROOT, child_env, finish, peer, start_relay
from test_relay_server import agree, enter_room, read_all, read_exactly

UNITS = ROOT / "systemd"
UNIT_FILES = sorted(UNITS.glob("peer-relay*"))
LIMIT = 20.0
"""Seconds any one step of these tests may take before it is a failure."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def connect_when_listening(port: int) -> socket.socket:
    """A connection to ``port`` as soon as something listens there (within LIMIT)."""
    deadline = time.monotonic() + LIMIT
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=LIMIT)
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.02)


def read_line(process: subprocess.Popen, timeout: float = LIMIT) -> str:
    """One line of the process's stdout, or a failure after ``timeout`` seconds."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "no line from the relay in time"
    return process.stdout.readline().decode()


def stop(process: subprocess.Popen, timeout: float = LIMIT) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


# -- the unit files ------------------------------------------------------------------------


def unit(name: str) -> dict[str, list[str]]:
    """``Key`` -> values of a unit file (sections merged; enough for these checks)."""
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_units(tmp_path):
    # verify checks that ExecStart= exists: point it at this Python, the rest unchanged.
    for path in UNIT_FILES:
        text = path.read_text().replace("ExecStart=/opt/peer-relay/bin/peer-relay",
                                        f"ExecStart={sys.executable} -m relay")
        (tmp_path / path.name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / p.name) for p in UNIT_FILES)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_the_service_is_a_hardened_notify_service_with_a_watchdog():
    service = unit("peer-relay.service")
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == ["/opt/peer-relay/bin/peer-relay"]
    assert service["Restart"] == ["on-failure"]
    assert service["WatchdogSec"] and service["ExecReload"]
    for key, expected in {"DynamicUser": "yes", "NoNewPrivileges": "yes",
                          "ProtectSystem": "strict", "ProtectHome": "yes",
                          "PrivateTmp": "yes", "CapabilityBoundingSet": ""}.items():
        assert service[key] == [expected], key
    assert set(service["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in service["SystemCallFilter"]
    assert int(service["LimitNOFILE"][0]) >= 65536
    # The stop timeout leaves room for the default shutdown grace (30 s).
    assert int(service["TimeoutStopSec"][0].rstrip("s")) > 30


def test_each_socket_unit_names_its_socket_for_the_relay():
    names = {path.name: unit(path.name)["FileDescriptorName"] for path in UNIT_FILES
             if path.suffix == ".socket"}
    assert names == {"peer-relay.socket": ["handshake"], "peer-relay-secure.socket": ["secure"],
                     "peer-relay-websocket.socket": ["websocket"]}
    assert all(name in systemd.SOCKET_NAMES for values in names.values() for name in values)


# -- the template unit: several instances on one host (docs/scaling.md) --------------------

TEMPLATE = "peer-relay@.service"
HARDENING = ("DynamicUser", "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
             "PrivateDevices", "CapabilityBoundingSet", "AmbientCapabilities",
             "RestrictAddressFamilies", "SystemCallFilter", "SystemCallErrorNumber", "UMask",
             "LimitNOFILE", "TimeoutStopSec", "KillMode", "WatchdogSec", "Type")


def example_instance_file() -> str:
    """The instance-1.toml shown in the template's comments, as TOML."""
    text = (UNITS / TEMPLATE).read_text()
    lines = re.findall(r"^#     ((?:[a-z-]+) = .*)$", text, re.MULTILINE)
    assert lines, "the template no longer shows an instance file"
    return "\n".join(lines) + "\n"


def test_the_template_reads_each_instance_s_own_file_and_is_hardened_as_the_service():
    template, service = unit(TEMPLATE), unit("peer-relay.service")
    assert template["ExecStart"] == [
        "/opt/peer-relay/bin/peer-relay --config /etc/peer-relay/instance-%i.toml"]
    # Without its file an instance would bind the default ports of another: refuse instead.
    assert template["AssertPathExists"] == ["/etc/peer-relay/instance-%i.toml"]
    for key in HARDENING:
        assert template[key] == service[key], key
    # The instances bind their own ports: no socket unit is shared between them.
    assert "Wants" not in template and "Also" not in template and "Sockets" not in template


def test_the_template_s_example_instance_file_is_a_valid_configuration():
    from relay import config

    path = Path(tempfile.mkdtemp(prefix="instance-")) / "instance-1.toml"
    try:
        path.write_text(example_instance_file())
        values = config.read_file(path)
    finally:
        shutil.rmtree(path.parent)
    ports = [values["port"], values["secure-port"], values["ws-port"], values["metrics"][1]]
    assert len(set(ports)) == 4
    assert values["trust-proxy"] == ("127.0.0.1",)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_an_instance_of_the_template(tmp_path):
    # systemd loads "peer-relay@2.service" from the template with %i = 2.
    text = (UNITS / TEMPLATE).read_text().replace("ExecStart=/opt/peer-relay/bin/peer-relay",
                                                   f"ExecStart={sys.executable} -m relay")
    (tmp_path / "peer-relay@2.service").write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", "peer-relay@2.service"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_two_instances_run_side_by_side_from_their_files(tmp_path):
    """The template's command line, %i = 1 and 2, with loopback ports in the example file."""
    template = unit(TEMPLATE)["ExecStart"][0]
    relays = []
    try:
        for instance in ("1", "2"):
            ports = {name: free_port() for name in ("port", "secure-port", "ws-port")}
            text = re.sub(r"^(port|secure-port|ws-port) = \d+",
                          lambda m: f"{m[1]} = {ports[m[1]]}", example_instance_file(),
                          flags=re.MULTILINE)
            text = re.sub(r'^metrics = .*$', f'metrics = "127.0.0.1:{free_port()}"', text,
                          flags=re.MULTILINE)
            (tmp_path / f"instance-{instance}.toml").write_text(text + 'host = ["127.0.0.1"]\n')
            command = (template.replace("%i", instance)
                       .replace("/opt/peer-relay/bin/peer-relay", f"{sys.executable} -m relay")
                       .replace("/etc/peer-relay", str(tmp_path)))
            relay = subprocess.Popen(command.split(), stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=child_env())
            relays.append(relay)
            line = read_line(relay)
            assert (f"127.0.0.1:{ports['port']} (handshake) and 127.0.0.1:{ports['secure-port']} "
                    f"(secure room), 127.0.0.1:{ports['ws-port']} (websocket)") in line, line
        assert all(relay.poll() is None for relay in relays)
    finally:
        for relay in relays:
            assert stop(relay) == 0
            relay.stdout.close()


# -- socket activation ----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
def test_a_socket_activated_relay_serves_a_real_transfer(tmp_path):
    handshake, secure = free_port(), free_port()
    relay = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{handshake}", "-l", f"127.0.0.1:{secure}",
         "--fdname=handshake:secure",
         # The ports of the flags are not bound: systemd's sockets take their place.
         sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "1", "--secure-port", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env())
    try:
        (tmp_path / "hello.txt").write_bytes(b"socket activated\n" * 1000)
        relay_args = ["--relay", f"127.0.0.1:{handshake}", "--secure-port", str(secure)]
        # systemd-socket-activate starts the relay at the first connection to a socket.
        connect_when_listening(handshake).close()
        line = read_line(relay)
        sender = peer("send", *relay_args, "--password", "418-pebble-cactus-relay",
                      "hello.txt", cwd=tmp_path)
        assert f"127.0.0.1:{handshake} (handshake) and 127.0.0.1:{secure} (secure room)" in line
        receiver = peer("recv", *relay_args, "-y", "-o", f"{tmp_path / 'out'}/",
                        "418-pebble-cactus-relay", cwd=tmp_path)
        (s, _, s_err), (r, _, r_err) = finish(sender, LIMIT), finish(receiver, LIMIT)
        assert (s, r) == (0, 0), s_err + r_err
        assert (tmp_path / "out" / "hello.txt").read_bytes() == (tmp_path / "hello.txt").read_bytes()
    finally:
        assert stop(relay) == 0
        relay.stdout.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
def test_a_socket_with_an_unknown_name_stops_the_relay_with_a_clear_error():
    port = free_port()
    relay = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=relay",
         sys.executable, "-m", "relay"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
    try:
        with connect_when_listening(port):
            assert relay.wait(LIMIT) == 1
        err = relay.stderr.read().decode()
        assert "peer-relay: systemd passed a socket named 'relay'" in err
        assert "FileDescriptorName=" in err
    finally:
        stop(relay)
        relay.stderr.close()


def test_listen_sockets_ignores_variables_meant_for_another_process():
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2",
               "LISTEN_FDNAMES": "handshake:secure", "OTHER": "kept"}
    assert systemd.listen_sockets(environ) == {}
    assert environ == {"OTHER": "kept"}  # a child of ours must not take them either
    assert systemd.listen_sockets({}) == {}


# -- sd_notify and the watchdog ------------------------------------------------------------


class NotifySocket:
    """The service manager's end of NOTIFY_SOCKET, for a test."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="notify-", dir="/tmp")  # short: sun_path
        self.path = os.path.join(self.directory, "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.received: list[str] = []

    def wait_for(self, wanted: str, timeout: float = LIMIT) -> str:
        """The next message holding line ``wanted``, keeping every message received."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {wanted!r} from the relay: {self.received}"
            self.socket.settimeout(remaining)
            message = self.socket.recv(4096).decode()
            self.received.append(message)
            if wanted in message.split("\n"):
                return message

    def close(self) -> None:
        self.socket.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def test_the_relay_says_ready_pings_the_watchdog_reloads_and_says_stopping():
    manager = NotifySocket()
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "0", "--secure-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env=child_env(NOTIFY_SOCKET=manager.path, WATCHDOG_USEC="200000"))
    try:
        ready = manager.wait_for("READY=1")
        assert "STATUS=listening on 127.0.0.1:" in ready
        for _ in range(3):  # every 0.1 s: half the watchdog interval (wait_for bounds each)
            manager.wait_for("WATCHDOG=1")
        relay.send_signal(signal.SIGHUP)
        reloading = manager.wait_for("RELOADING=1")
        assert re.search(r"^MONOTONIC_USEC=\d+$", reloading, re.MULTILINE)
        manager.wait_for("READY=1")
        relay.send_signal(signal.SIGTERM)
        manager.wait_for("STOPPING=1")
        assert relay.wait(LIMIT) == 0
    finally:
        stop(relay)
        relay.stdout.close()
        manager.close()


def test_no_watchdog_pings_for_another_process_and_none_without_a_socket():
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "4000000",
                                      "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert systemd.watchdog_interval({}) is None
    assert not systemd.Notifier({}).ready()


def test_an_abstract_notify_socket_is_reached_too():
    name = f"peer-relay-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name)
        manager.settimeout(5)
        notifier = systemd.Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.stopping("bye")
        assert manager.recv(4096) == b"STOPPING=1\nSTATUS=bye"
        notifier.close()


# -- graceful shutdown -----------------------------------------------------------------------


def test_sigterm_during_a_transfer_lets_it_finish_and_exits_0(tmp_path):
    data = os.urandom(5 << 20)
    (tmp_path / "big.bin").write_bytes(data)
    # 2.5 MB/s per room: a two-second transfer, so that SIGTERM surely falls inside it.
    # A grace far longer than any wait below: the relay must exit when the room ends.
    relay = start_relay("--room-rate", "2500000", "--shutdown-grace", "600")
    out = tmp_path / "out"
    try:
        sender = peer("send", *relay.peer_args(), "--password", "417-cobalt-lemon-unicycle",
                      "big.bin", cwd=tmp_path)
        receiver = peer("recv", *relay.peer_args(), "-y", "-o", f"{out}/",
                        "417-cobalt-lemon-unicycle", cwd=tmp_path)
        deadline = time.monotonic() + LIMIT
        while not any(p.stat().st_size for p in out.glob("*.peer-part")):
            assert time.monotonic() < deadline and receiver.poll() is None, "no transfer started"
            time.sleep(0.01)
        relay.process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        while True:  # it soon stops accepting
            try:
                socket.create_connection(("127.0.0.1", relay.port), timeout=2).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < stopped_at + LIMIT, "still accepting after SIGTERM"
            time.sleep(0.02)
        (s, _, s_err), (r, _, r_err) = finish(sender, LIMIT), finish(receiver, LIMIT)
        assert (s, r) == (0, 0), s_err + r_err
        assert (out / "big.bin").read_bytes() == data
        assert relay.process.wait(LIMIT) == 0  # when the room ended, not at the 600 s grace
    finally:
        stop(relay.process)
        relay.process.stdout.close()


async def test_a_room_still_open_when_the_grace_ends_is_ended():
    config = RelayConfig(hosts=("127.0.0.1",), port=0, secure_port=0, shutdown_grace=0.5)
    stop_event = trio.Event()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(
                lambda task_status: serve(config, stop=stop_event, task_status=task_status))
            server, client = await agree("127.0.0.1", ports)
            a = await enter_room("127.0.0.1", ports.secure_port, client.identity)
            b = await enter_room("127.0.0.1", ports.secure_port, server.identity)
            assert await read_exactly(a, 2) == b"00"
            assert await read_exactly(b, 2) == b"00"
            stopped = trio.current_time()
            stop_event.set()
            await trio.sleep(0.1)
            await a.send_all(b"after the stop")  # the room still carries bytes
            assert await read_exactly(b, 14) == b"after the stop"
            assert await read_all(b) == CLOSE_MARKER  # then the grace ends it
            ended = trio.current_time() - stopped
            assert 0.45 <= ended < 3
            assert await read_all(a) == CLOSE_MARKER
            await a.aclose()
            await b.aclose()
        assert trio.current_time() - stopped < 5  # and serve returned


# -- logs --------------------------------------------------------------------------------------


def test_logs_hold_no_code_no_payload_and_anonymized_addresses(tmp_path):
    code = "602-zebra-unicycle-lantern"
    marker = b"PAYLOAD-NEVER-LOGGED-"
    (tmp_path / "secret.txt").write_bytes(marker * 2000)
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", "0", "--secure-port", "0",
         "--log-level", "debug", "--log-format", "json", "--anonymize-addresses"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    try:
        match = re.search(r"127\.0\.0\.1:(\d+) \(handshake\) and 127\.0\.0\.1:(\d+)", read_line(relay))
        relay_args = ["--relay", f"127.0.0.1:{match[1]}", "--secure-port", match[2]]
        sender = peer("send", *relay_args, "--password", code, "secret.txt", cwd=tmp_path)
        receiver = peer("recv", *relay_args, "-y", "-o", f"{tmp_path / 'out'}/", code, cwd=tmp_path)
        (s, _, s_err), (r, _, r_err) = finish(sender, LIMIT), finish(receiver, LIMIT)
        assert (s, r) == (0, 0), s_err + r_err
    finally:
        assert stop(relay) == 0
        relay.stdout.close()
    err = relay.stderr.read().decode()
    relay.stderr.close()
    entries = [json.loads(line) for line in err.splitlines()]
    messages = " ".join(entry["message"] for entry in entries)
    assert "room open between" in messages and "accepted" in messages
    for secret in (code, *code.split("-")[1:], marker.decode(), marker.hex()):
        assert secret not in err
    assert "127.0.0.1" not in messages  # every address is the network and a hash
    assert re.search(r"127\.0\.0\.0/24~[0-9a-f]{6}:\d+", messages)


def test_log_lines_are_printable_and_journal_lines_carry_their_priority(tmp_path, monkeypatch):
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        assert logs.under_journal(stream)
        logger = logs.configure(LogSettings("debug", "plain", False), stream)
        logger.getChild("test").warning("ticket %r refused", "\x1b[31mred\nforged line")
        logger.getChild("test").debug("quiet")
        logger.handlers[:] = []
    lines = path.read_text().splitlines()
    assert lines == ["<4>WARNING relay.test: ticket '\\x1b[31mred\\nforged line' refused",
                     "<7>DEBUG relay.test: quiet"]


def test_anonymized_addresses_keep_the_network_and_follow_one_client():
    anonymizer = Anonymizer(b"k" * 16)
    text = anonymizer.text("from 203.0.113.9:4000 and [2001:db8:1:2::5]:443, again 203.0.113.9:4001")
    assert "203.0.113.9" not in text and "2001:db8:1:2::5" not in text
    first, second = re.findall(r"203\.0\.113\.0/24~[0-9a-f]{6}", text)
    assert first == second  # one client, one pseudonym within a run
    assert re.search(r"\[2001:db8:1::/48~[0-9a-f]{6}\]:443", text)
    assert re.fullmatch(r"refused 2001:db8:1::/48~[0-9a-f]{6}: too many",
                        anonymizer.text("refused 2001:db8:1:2::5: too many"))
    assert anonymizer.text("at 12:30:45, listening on 0.0.0.0:9000") == \
        "at 12:30:45, listening on 0.0.0.0:9000"
    assert Anonymizer(b"j" * 16).text("203.0.113.9") != anonymizer.text("203.0.113.9")


def test_json_lines_escape_what_they_carry():
    record = logs.logging.LogRecord("relay.x", logs.logging.INFO, __file__, 1,
                                    "bad %s", ("\x00\n\"quote",), None)
    line = RelayFormatter("json").format(record)
    assert "\n" not in line
    assert json.loads(line)["message"] == "bad \x00\n\"quote"


