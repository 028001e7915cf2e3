"""The man pages: clean under ``mandoc -T lint``, every option of both commands documented,
and installed with the package."""

from __future__ import annotations

import argparse
import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from peer.cli import build_parser as peer_parser
from relay.cli import build_parser as relay_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = {"peer.1": ROOT / "man" / "peer.1", "peer-relay.8": ROOT / "man" / "peer-relay.8"}
ELSEWHERE = re.compile(r"referenced manual not found: Xr (journalctl|systemctl|systemd\.\w+) \d")
"""Other projects' pages: whether they are installed depends on the machine, not on us."""


@pytest.mark.skipif(shutil.which("mandoc") is None,
                    reason="mandoc is not installed (apt-get install mandoc)")
def test_mandoc_lint_is_clean(tmp_path):
    # Our two pages refer to each other: lint them as they will be installed.
    for name, path in PAGES.items():
        section = tmp_path / f"man{name[-1]}"
        section.mkdir(exist_ok=True)
        shutil.copy(path, section / name)
    result = subprocess.run(
        ["mandoc", "-T", "lint", "-W", "style", *map(str, PAGES.values())],
        capture_output=True, text=True, timeout=60, env={"MANPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and not ELSEWHERE.search(line) and "mandoc.db" not in line]
    assert problems == []


def documented(page: Path) -> set[str]:
    """The flags the page describes in its option lists (``.It Fl ...`` lines)."""
    flags = set()
    for line in page.read_text().splitlines():
        if line.startswith(".It "):
            text = line.replace("\\-", "-")
            flags.update("-" + word for word in re.findall(r"\bFl (\S+)", text))
    return {flag.rstrip(",") for flag in flags}


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_every_relay_option_is_in_peer_relay_8():
    assert options(relay_parser()) - documented(PAGES["peer-relay.8"]) == set()


def test_every_peer_option_is_in_peer_1():
    commands = next(a for a in peer_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = {f"{name} {flag}" for name, sub in commands.choices.items()
               for flag in options(sub) - documented(PAGES["peer.1"])}
    assert missing == set()


@pytest.mark.parametrize("page, statuses", [("peer.1", ["0", "1", "2", "130"]),
                                            ("peer-relay.8", ["0", "1", "2"])])
def test_exit_statuses_environment_files_and_examples_are_there(page, statuses):
    text = PAGES[page].read_text()
    for section in ("EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES"):
        assert f"\n.Sh {section}\n" in text
    exit_section = text.split(".Sh EXIT STATUS\n", 1)[1].split("\n.Sh ", 1)[0]
    assert re.findall(r"^\.It (\d+)$", exit_section, re.MULTILINE) == statuses


def test_the_pages_are_installed_with_the_package():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    installed = setup.get("options.data_files", "share/man/man1", fallback="") + \
        setup.get("options.data_files", "share/man/man8", fallback="")
    assert "man/peer.1" in installed and "man/peer-relay.8" in installed
