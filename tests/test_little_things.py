"""Issue 15, item 10 and 11: --version, --code, completions, the QR code, units, and ``-o FILE``."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from processes import child_env

CODE = "417-cobalt-lemon-unicycle"


def peer(*args: str, cwd=None, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peer", *args], cwd=cwd, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, env=child_env(**env), timeout=timeout,
    )


def transfer(relay, cwd: Path, paths: list[str], *recv_args: str) -> subprocess.CompletedProcess:
    """Send ``paths`` (from ``cwd``) with CODE and receive them with ``recv_args``; the receiver's result."""
    sender = subprocess.Popen(
        [sys.executable, "-m", "peer", "send", *relay.peer_args(), "--code", CODE, *paths],
        cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=child_env(),
    )
    try:
        received = peer("recv", *relay.peer_args(), "-y", *recv_args, CODE, cwd=cwd)
        if received.returncode == 0:
            assert sender.wait(60) == 0, sender.stderr.read()
        return received
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
        sender.stderr.close()


# --- -o like magic-wormhole (item 11) ----------------------------------------------------


@pytest.fixture
def files(tmp_path):
    source = tmp_path / "src"
    (source / "folder").mkdir(parents=True)
    (source / "hello.txt").write_text("hello\n")
    (source / "folder" / "inner.txt").write_text("inner\n")
    return source


def test_o_names_the_one_file_offered(relay_process, files, tmp_path):
    result = transfer(relay_process, files, ["hello.txt"], "-o", str(tmp_path / "greeting.txt"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "greeting.txt").read_text() == "hello\n"
    assert f"as {tmp_path / 'greeting.txt'}" in result.stderr
    assert "existed already" not in result.stderr


def test_o_relative_name_in_the_current_directory(relay_process, files):
    result = transfer(relay_process, files, ["hello.txt"], "-o", "copy.txt")
    assert result.returncode == 0, result.stderr
    assert (files / "copy.txt").read_text() == "hello\n"


def test_o_with_a_directory_offer_creates_that_directory(relay_process, files, tmp_path):
    result = transfer(relay_process, files, ["folder"], "-o", str(tmp_path / "new"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "new" / "folder" / "inner.txt").read_text() == "inner\n"


def test_o_with_several_files_creates_that_directory(relay_process, files, tmp_path):
    result = transfer(relay_process, files, ["hello.txt", "folder"], "-o", str(tmp_path / "new"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "new" / "hello.txt").read_text() == "hello\n"
    assert (tmp_path / "new" / "folder" / "inner.txt").is_file()


def test_o_an_existing_directory_saves_into_it(relay_process, files, tmp_path):
    (tmp_path / "there").mkdir()
    result = transfer(relay_process, files, ["hello.txt"], "-o", str(tmp_path / "there"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "there" / "hello.txt").read_text() == "hello\n"


def test_o_with_a_trailing_slash_is_a_directory(relay_process, files, tmp_path):
    result = transfer(relay_process, files, ["hello.txt"], "-o", f"{tmp_path / 'made'}/")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "made" / "hello.txt").read_text() == "hello\n"


def test_o_an_existing_file_is_not_replaced(relay_process, files, tmp_path):
    (tmp_path / "taken.txt").write_text("mine\n")
    result = transfer(relay_process, files, ["hello.txt"], "-o", str(tmp_path / "taken.txt"))
    assert result.returncode == 1
    assert (tmp_path / "taken.txt").read_text() == "mine\n"
    assert "taken.txt" in result.stderr


def test_o_help_says_it():
    result = peer("recv", "--help")
    assert "saved as DEST" in " ".join(result.stdout.split())


# --- --version, --code, -q's help (item 10) -----------------------------------------------


def _installed_version() -> str:
    import configparser

    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    return config["metadata"]["version"]


def test_peer_version():
    result = peer("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"peer {_installed_version()}\n"


def test_peer_relay_version():
    result = subprocess.run([sys.executable, "-m", "relay", "--version"], capture_output=True, text=True,
                            env=child_env(), timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"peer-relay {_installed_version()}\n"


def test_version_from_the_installed_metadata(monkeypatch, tmp_path):
    from peer import version

    monkeypatch.setattr(version, "_SOURCE_TREE", tmp_path)  # not a source tree
    monkeypatch.setattr(version.importlib.metadata, "version", lambda name: "9.8.7")
    assert version.version() == "9.8.7"

    def missing(name):
        raise version.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(version.importlib.metadata, "version", missing)
    assert version.version() == "unknown"


def test_code_is_an_alias_of_password():
    from peer.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["send", "--code", "x-y", "f"]).password == "x-y"
    assert parser.parse_args(["send", "--password", "x-y", "f"]).password == "x-y"
    assert "--code" in peer("send", "--help").stdout


def test_quiet_help_mentions_the_generated_code_only_on_send():
    assert "generated code" not in " ".join(peer("recv", "--help").stdout.split())
    assert "(and a generated code)" in " ".join(peer("send", "--help").stdout.split())


# --- completions ----------------------------------------------------------------------------


def _every_option() -> dict[str, set[str]]:
    from peer.cli import build_parser
    from peer.completion import describe

    top, commands = describe(build_parser())
    found = {"": {name for option in top for name in option.names}}
    for command in commands:
        found[command.name] = {name for option in command.options for name in option.names}
    assert {"--relay", "--code", "--qr", "--no-qr", "--limit-rate"} <= found["send"]
    assert {"-o", "--output", "--as-typed", "--stdout"} <= found["recv"]
    assert "--version" in found[""]
    return found


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_mentions_every_option(shell):
    result = peer("completion", shell)
    assert result.returncode == 0, result.stderr
    for command, names in _every_option().items():
        assert command in result.stdout
        for name in names:
            spelled = name if shell != "fish" else (f"-l {name[2:]}" if name.startswith("--") else f"-s {name[1:]}")
            assert spelled in result.stdout, (shell, name)


def test_unknown_shell_is_a_usage_error():
    result = peer("completion", "tcsh")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


@pytest.mark.parametrize("shell, check", [("bash", ["bash", "-n"]), ("fish", ["fish", "-n"]), ("zsh", ["zsh", "-n"])])
def test_completion_script_parses(shell, check, tmp_path):
    if shutil.which(check[0]) is None:
        pytest.skip(f"{check[0]} is not installed here")
    script = tmp_path / f"peer.{shell}"
    script.write_text(peer("completion", shell).stdout)
    result = subprocess.run([*check, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _bash_complete(tmp_path, *words: str) -> list[str]:
    """What bash offers for ``peer WORDS...`` (the last word is the one being completed)."""
    script = tmp_path / "peer.bash"
    script.write_text(peer("completion", "bash").stdout)
    line = " ".join(["peer", *words])
    quoted = " ".join(shlex.quote(word) for word in words)
    program = (
        f"source {script}\n"
        f"COMP_WORDS=(peer {quoted})\n"
        f"COMP_CWORD={len(words)}\n"
        f"COMP_LINE='{line}'\n"
        "_peer\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(["bash", "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [word for word in result.stdout.splitlines() if word]


def test_bash_completes_commands_options_and_paths(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed here")
    (tmp_path / "report.pdf").write_text("x")
    assert _bash_complete(tmp_path, "re") == ["recv"]
    assert _bash_complete(tmp_path, "send", "--re") == ["--relay"]
    assert set(_bash_complete(tmp_path, "recv", "--o")) == {"--output", "--overwrite"}
    assert _bash_complete(tmp_path, "send", "rep") == ["report.pdf"]
    assert _bash_complete(tmp_path, "recv", "-o", "rep") == ["report.pdf"]
    assert _bash_complete(tmp_path, "send", "--relay", "") == []
    assert _bash_complete(tmp_path, "completion", "f") == ["fish"]


# --- the QR code ---------------------------------------------------------------------------


def _sender_screen(relay, cwd: Path, *args: str, stdout_tty: bool, expect_qr: bool) -> tuple[str, str]:
    """Start a sender with a generated code; its code, and its stderr up to the line after
    'On the other machine run' (the QR code, if any, comes right after that line)."""
    import os
    import pty
    import select
    import time

    (cwd / "hello.txt").write_text("hello\n")
    if stdout_tty:
        reader, writer = pty.openpty()
    else:
        reader, writer = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-m", "peer", "send", *relay.peer_args(), *args, "hello.txt"],
        cwd=cwd, stdin=subprocess.DEVNULL, stdout=writer, stderr=subprocess.PIPE, env=child_env(),
    )
    os.close(writer)
    try:
        err, out = b"", b""
        deadline = time.monotonic() + 60  # a bound, not a measurement
        while b"On the other machine" not in err or err.count(b"\n", err.index(b"On the other machine")) < 2:
            assert time.monotonic() < deadline, err
            ready, _, _ = select.select([process.stderr, reader], [], [], 1.0)
            if process.stderr in ready:
                chunk = os.read(process.stderr.fileno(), 65536)
                assert chunk, err
                err += chunk
            if reader in ready:
                try:
                    out += os.read(reader, 65536)
                except OSError:
                    pass
        while b"\n" not in out:  # the code is printed before the announcement
            assert time.monotonic() < deadline, out
            if select.select([reader], [], [], 1.0)[0]:
                out += os.read(reader, 65536)
        code = out.decode().split("Code: ", 1)[1].split()[0]
        if expect_qr:  # wait for the whole QR code (the status line may follow it at once)
            from peer import qr

            while qr.render(code).encode() not in err:
                assert time.monotonic() < deadline, err
                if select.select([process.stderr], [], [], 1.0)[0]:
                    err += os.read(process.stderr.fileno(), 65536)
        return code, err.decode()
    finally:
        process.kill()
        process.wait(10)
        process.stderr.close()
        os.close(reader)


def test_qr_code_when_stdout_is_a_terminal(relay_process, tmp_path):
    from peer import qr

    code, screen = _sender_screen(relay_process, tmp_path, stdout_tty=True, expect_qr=True)
    assert qr.render(code) in screen


def test_no_qr_code_when_stdout_is_a_pipe(relay_process, tmp_path):
    _, screen = _sender_screen(relay_process, tmp_path, stdout_tty=False, expect_qr=False)
    assert "█" not in screen and "▀" not in screen


def test_qr_and_no_qr(relay_process, tmp_path):
    from peer import qr

    code, screen = _sender_screen(relay_process, tmp_path, "--qr", stdout_tty=False, expect_qr=True)
    assert qr.render(code) in screen
    _, screen = _sender_screen(relay_process, tmp_path, "--no-qr", stdout_tty=True, expect_qr=False)
    assert "█" not in screen and "▀" not in screen


def test_qr_code_is_compact():
    from peer import qr

    lines = qr.render("417-cobalt-lemon-unicycle").splitlines()
    assert len(lines) <= 16 and max(len(line) for line in lines) <= 40


# --- one unit system ----------------------------------------------------------------------


def test_sizes_are_binary_everywhere(relay_process, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "data.bin").write_bytes(b"x" * 3000)
    sender = subprocess.Popen(
        [sys.executable, "-m", "peer", "send", *relay_process.peer_args(), "--code", CODE, "data.bin"],
        cwd=source, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=child_env(),
    )
    try:
        received = peer("recv", *relay_process.peer_args(), "-y", "-o", str(tmp_path / "out"), CODE)
        assert received.returncode == 0, received.stderr
        assert sender.wait(60) == 0
        sent = sender.stderr.read()
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
        sender.stderr.close()
    for text in (received.stderr, sent):
        assert "2.9 KiB" in text, text
        for decimal in ("kB", "KB", " MB", " GB", "3.0 K"):
            assert decimal not in text, text


def test_fish_completes_commands_and_options(tmp_path):
    if shutil.which("fish") is None:
        pytest.skip("fish is not installed here")
    script = tmp_path / "peer.fish"
    script.write_text(peer("completion", "fish").stdout)
    program = f'source {script}; complete -C "peer send --re"; complete -C "peer re"'
    result = subprocess.run(["fish", "--no-config", "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    offered = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert offered == ["--relay", "recv"]
