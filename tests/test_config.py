"""The configuration: every option in the TOML file and on the command line, flags over the
file, errors with file and line, ``--check-config``, and SIGHUP reloading a running relay."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from relay import config, wire
from relay.cli import build_parser, main
from relay.config import OPTIONS, ConfigError
from relay.limits import Limits
from relay.logs import LogSettings
from relay.server import RelayConfig, RelayServer

from processes import child_env, first_line
from test_relay_server import Peer

LIMIT = 15

# A value other than the default for every option, as TOML and as a flag.
NON_DEFAULT = {
    "host": (["127.0.0.1", "::1"], ["--host", "127.0.0.1", "--host", "::1"]),
    "port": (7000, ["--port", "7000"]),
    "secure-port": (7001, ["--secure-port", "7001"]),
    "ws-port": (7002, ["--ws-port", "7002"]),
    "web-app": (False, ["--no-web-app"]),
    "tls-cert": ("/etc/ssl/relay.pem", ["--tls-cert", "/etc/ssl/relay.pem"]),
    "tls-key": ("/etc/ssl/relay.key", ["--tls-key", "/etc/ssl/relay.key"]),
    "trust-proxy": (["10.0.0.0/8"], ["--trust-proxy", "10.0.0.0/8"]),
    "timeout": (1800, ["--timeout", "1800"]),
    "hello-timeout": (12.5, ["--hello-timeout", "12.5"]),
    "room-timeout": (45, ["--room-timeout", "45"]),
    "upgrade-timeout": (4, ["--upgrade-timeout", "4"]),
    "max-outbox": (32768, ["--max-outbox", "32768"]),
    "shutdown-grace": (5, ["--shutdown-grace", "5"]),
    "max-connections": (500, ["--max-connections", "500"]),
    "max-connections-per-address": (8, ["--max-connections-per-address", "8"]),
    "hello-rate": (0.5, ["--hello-rate", "0.5"]),
    "hello-burst": (4, ["--hello-burst", "4"]),
    "max-rooms": (7, ["--max-rooms", "7"]),
    "room-rate": (1_000_000, ["--room-rate", "1000000"]),
    "limit-exempt": (["192.0.2.0/24"], ["--limit-exempt", "192.0.2.0/24"]),
    "max-failed-handshakes-per-address": (2, ["--max-failed-handshakes-per-address", "2"]),
    "max-failed-handshakes-per-sender": (9, ["--max-failed-handshakes-per-sender", "9"]),
    "failed-handshake-window": (90, ["--failed-handshake-window", "90"]),
    "max-senders-per-nameplate": (7, ["--max-senders-per-nameplate", "7"]),
    "metrics": ("127.0.0.1:9100", ["--metrics", "127.0.0.1:9100"]),
    "log-level": ("debug", ["--log-level", "debug"]),
    "log-format": ("json", ["--log-format", "json"]),
    "anonymize-addresses": (True, ["--anonymize-addresses"]),
}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def expected_settings() -> tuple[RelayConfig, LogSettings]:
    relay = RelayConfig(
        hosts=("127.0.0.1", "::1"), port=7000, secure_port=7001, ws_port=7002,
        tls_cert="/etc/ssl/relay.pem", tls_key="/etc/ssl/relay.key",
        trusted_proxies=("10.0.0.0/8",), timeout=1800.0, hello_timeout=12.5,
        room_timeout=45.0, upgrade_timeout=4.0, max_outbox=32768, shutdown_grace=5.0,
        limits=Limits(max_connections=500, max_connections_per_address=8, hello_rate=0.5,
                      hello_burst=4, max_rooms=7, room_rate=1_000_000,
                      exempt=("192.0.2.0/24",), max_failed_handshakes_per_address=2,
                      max_failed_handshakes_per_sender=9, failed_handshake_window=90.0,
                      max_senders_per_nameplate=7),
        metrics=("127.0.0.1", 9100), web_app=False,
    )
    return relay, LogSettings("debug", "json", True)


def test_the_table_covers_every_option_of_the_command_line():
    assert set(NON_DEFAULT) == {option.name for option in OPTIONS}
    flags = {flag for action in build_parser()._actions for flag in action.option_strings}
    for option in OPTIONS:
        assert f"--{option.name}" in flags


def test_every_option_is_read_from_the_file(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text("".join(f"{name} = {toml_value(value)}\n"
                            for name, (value, _) in NON_DEFAULT.items()))
    settings = config.load(path, {})
    assert (settings.relay, settings.log) == expected_settings()


def test_every_option_is_read_from_the_command_line():
    argv = [arg for _, flags in NON_DEFAULT.values() for arg in flags]
    settings = config.load(None, config.from_arguments(build_parser().parse_args(argv)))
    assert (settings.relay, settings.log) == expected_settings()


def test_nothing_set_means_the_documented_defaults():
    settings = config.load(None, config.from_arguments(build_parser().parse_args([])))
    assert settings.relay == RelayConfig()
    assert settings.log == LogSettings()
    assert settings.relay.limits == Limits()


def test_flags_override_the_file_and_the_rest_of_the_file_stays(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text('max-rooms = 5\nhello-timeout = 9\nhost = ["127.0.0.1"]\n')
    args = build_parser().parse_args(["--max-rooms", "6", "-v", "--host", "::1"])
    settings = config.load(path, config.from_arguments(args))
    assert settings.relay.limits.max_rooms == 6
    assert settings.relay.hello_timeout == 9.0
    assert settings.relay.hosts == ("::1",)
    assert settings.log.level == "debug"


def test_the_failed_handshake_limits_come_from_the_file_and_0_turns_them_off(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text("max-failed-handshakes-per-address = 0\n"
                    "max-failed-handshakes-per-sender = 6\n"
                    "failed-handshake-window = 3600\n")
    limits = config.load(path, {}).relay.limits
    assert (limits.max_failed_handshakes_per_address, limits.max_failed_handshakes_per_sender,
            limits.failed_handshake_window) == (0, 6, 3600.0)
    assert Limits().max_failed_handshakes_per_address == 5
    assert Limits().max_failed_handshakes_per_sender == 20
    path.write_text("failed-handshake-window = 0\n")
    with pytest.raises(config.ConfigError, match="failed-handshake-window: must be a positive"):
        config.load(path, {})


def test_an_empty_list_in_the_file_exempts_nobody(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text("limit-exempt = []\n")
    assert config.load(path, {}).relay.limits.exempt == ()


@pytest.mark.parametrize("text, line, column, message", [
    ("port = 9000\nsecure-port = = 2\n", 2, 15, "invalid TOML: invalid value"),
    ('port = 9000\n\nhello-timeout = "soon"\n', 3, None,
     "hello-timeout: not a number of seconds: 'soon'"),
    ("# comment\nmax_rooms = 3\n", 2, None, "unknown option 'max_rooms' (did you mean 'max-rooms'?)"),
    ("port = 1\n[limits]\nmax-rooms = 3\n", 2, None, "unknown section 'limits'"),
    ("port = 70000\n", 1, None, "port: must be a port number 0-65535, not 70000"),
    ('log-level = "loud"\n', 1, None, "log-level: must be one of debug, info, warning, error"),
    ("anonymize-addresses = 1\n", 1, None, "anonymize-addresses: must be true or false"),
    ('host = [\n  "127.0.0.1",\n]\nmetrics = "9100"\n', 4, None, "metrics: must be ADDR:PORT"),
    ('trust-proxy = ["10.0.0.0/8",\n  "nowhere"]\n', 1, None, "trust-proxy: not an IP address"),
    ('port = 1\ntls-key = "k.pem"\n', 2, None, "tls-key: a TLS key needs a certificate"),
    ("max-outbox = 100\n", 1, None, "max-outbox: must hold at least one packet"),
    ("hello-burst = 0\n", 1, None, "hello-burst: must be at least 1 when hello-rate is set"),
])
def test_errors_name_the_file_and_the_line(tmp_path, text, line, column, message):
    path = tmp_path / "relay.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config.load(path, {})
    error = caught.value
    assert (error.path, error.line) == (str(path), line)
    if column is not None:
        assert error.column == column
    assert message in str(error)
    where = f"{path}:{line}:{column}: " if column else f"{path}:{line}: "
    assert str(error).startswith(where)


def test_a_bad_value_from_a_flag_is_not_blamed_on_the_file(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text("port = 1\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path, {"tls-key": "k.pem"})
    assert str(caught.value) == "--tls-key: a TLS key needs a certificate (tls-cert)"


def test_an_unreadable_file_is_an_error_that_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read the configuration: no such file"):
        config.load(tmp_path / "nope.toml", {})
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"port = 1\n\xff\n")
    with pytest.raises(ConfigError, match=r"binary\.toml:2: not UTF-8"):
        config.load(binary, {})


def test_the_default_file_is_read_only_if_it_exists(tmp_path, monkeypatch):
    default = tmp_path / "peer-relay.toml"
    monkeypatch.setattr(config, "DEFAULT_PATH", default)
    assert config.config_path(None) is None
    default.write_text("max-rooms = 3\n")
    assert config.config_path(None) == default
    assert config.config_path("/elsewhere.toml") == Path("/elsewhere.toml")


def test_check_config_says_ok_or_shows_the_error_and_exits_2(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text("max-rooms = 3\nport = 0\n")
    assert main(["--config", str(good), "--check-config"]) == 0
    assert f"configuration OK: {good}" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("max-rooms = 3\nroom-timeout = -1\n")
    assert main(["--config", str(bad), "--check-config"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"peer-relay: {bad}:2: room-timeout: must be a positive number of seconds, not -1")


def test_check_config_loads_the_tls_certificate(tmp_path, capsys):
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate\n")
    assert main(["--tls-cert", str(cert), "--check-config"]) == 2
    assert "cannot use the TLS certificate" in capsys.readouterr().err


def test_live_changes_split_live_options_from_restart_ones():
    old = config.merge({})
    new = config.merge({"max-rooms": 3, "port": 1, "log-level": "debug"})
    assert config.live_changes(old, new) == (["max-rooms", "log-level"], ["port"])


async def test_reconfigure_applies_new_limits_to_new_connections_and_keeps_the_sockets():
    first = RelayConfig(hosts=("127.0.0.1",), port=0, secure_port=0,
                        limits=Limits(exempt=()))
    server = RelayServer(first)
    stop = trio.Event()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(lambda task_status: server.run(stop=stop, task_status=task_status))
            kept = await Peer.connect("127.0.0.1", ports.port)
            restart = server.reconfigure(RelayConfig(
                hosts=("127.0.0.1",), port=1234, secure_port=0, hello_timeout=5.0,
                room_timeout=7.0, limits=Limits(exempt=(), max_connections_per_address=1)))
            assert restart == ["port"]
            assert server.config.port == 0  # what cannot change is kept
            assert server.config.hello_timeout == 5.0 and server.rooms.ttl == 7.0
            refused = await Peer.connect("127.0.0.1", ports.port)
            assert await refused.stream.receive_some(64) == wire.encode(0, wire.Timeout())
            await kept.send(0, wire.HelloClient())
            await kept.expect(0, wire.ClientIdentity(kept.identity))
            await kept.close()
            await refused.close()
            stop.set()


async def read_line(stream: trio.abc.ReceiveStream, seen: bytearray, needle: bytes) -> None:
    """Read the relay's stderr until ``needle`` appears (the caller bounds the time)."""
    while needle not in seen:
        chunk = await stream.receive_some(4096)
        assert chunk, f"the relay's log ended without {needle!r}: {bytes(seen)!r}"
        seen += chunk


async def test_sighup_reloads_the_file_and_a_bad_file_keeps_the_running_configuration(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text('host = ["127.0.0.1"]\nport = 0\nsecure-port = 0\nlimit-exempt = []\n')
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "--config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    log = bytearray()
    try:
        with trio.fail_after(LIMIT):
            line = await first_line(process)
            port = int(line.decode().split("127.0.0.1:")[1].split()[0])
            path.write_text('host = ["127.0.0.1"]\nport = 1\nsecure-port = 0\nlimit-exempt = []\n'
                            "max-connections-per-address = 1\n")
            process.send_signal(signal.SIGHUP)
            await read_line(process.stderr, log, b"reload: port changed but take effect only "
                            b"after a restart")
            assert b"changed max-connections-per-address" in log
            first = await Peer.connect("127.0.0.1", port)
            await first.send(0, wire.HelloClient())
            await first.expect(0, wire.ClientIdentity(first.identity))
            second = await Peer.connect("127.0.0.1", port)
            assert await second.stream.receive_some(64) == wire.encode(0, wire.Timeout())
            await second.close()
            path.write_text("max-connections-per-address = [\n")
            process.send_signal(signal.SIGHUP)
            await read_line(process.stderr, log, b"the running configuration is kept")
            assert f"{path}:1:".encode() in log
            third = await Peer.connect("127.0.0.1", port)  # still limited to one
            assert await third.stream.receive_some(64) == wire.encode(0, wire.Timeout())
            await third.close()
            await first.close()
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
