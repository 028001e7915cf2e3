"""peer send --skip-unreadable: what cannot be read inside a directory is left out, listed on
the sender's stderr and in the offer (the receiver's prompt names it); the default stays strict.

Unreadable means unreadable for real: as root, chmod 000 is no obstacle, so the sender
switches to the unprivileged user ``nobody`` (os.setuid) once Python is loaded.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from peer.errors import ProtocolError
from peer.offer import DIRECTORY, FILE, Offer, OfferEntry

from processes import child_env, finish, peer

CODE = "987-cobalt-lemon-unicycle"

# Loaded as root, then run as nobody: the interpreter's own files may be out of nobody's
# reach (a Python under /root), so everything the send needs is imported and read first.
AS_NOBODY = """
import encodings.idna, os, pwd, sys  # idna: loaded lazily by getaddrinfo
import peer.cli, peer.codes
peer.codes.load_wordlist()
user = pwd.getpwnam("nobody")
os.setgroups([]); os.setgid(user.pw_gid); os.setuid(user.pw_uid)
sys.exit(peer.cli.main(sys.argv[1:]))
"""


@pytest.fixture
def tree():
    """d/ok.txt readable; d/secret.txt and d/locked/ (holding a file) not, for this user."""
    root = Path(tempfile.mkdtemp(prefix="peer-skip-"))  # not under pytest's 0700 directory
    try:
        root.chmod(0o755)
        (root / "d" / "locked").mkdir(parents=True)
        (root / "d").chmod(0o755)
        (root / "d" / "ok.txt").write_text("readable\n")
        (root / "d" / "ok.txt").chmod(0o644)
        (root / "d" / "secret.txt").write_text("not for you\n")
        (root / "d" / "locked" / "inside.txt").write_text("nor this\n")
        (root / "d" / "secret.txt").chmod(0)
        (root / "d" / "locked").chmod(0)
        yield root
    finally:
        (root / "d" / "locked").chmod(0o755)
        shutil.rmtree(root)


def send_as_unprivileged(*args: str, cwd: Path) -> subprocess.Popen:
    if os.geteuid() != 0:
        return peer("send", *args, cwd=cwd)
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root with no user 'nobody' to switch to: chmod 000 cannot stop root")
    return subprocess.Popen(
        [sys.executable, "-c", AS_NOBODY, "send", *args], cwd=cwd, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
    )


def test_by_default_one_unreadable_file_stops_the_send(relay_process, tree):
    s, _, s_err = finish(send_as_unprivileged(*relay_process.peer_args(), "--password", CODE, "d", cwd=tree))
    assert s == 1, s_err
    assert s_err.strip().splitlines() == ["peer: cannot read d/secret.txt: permission denied"], s_err


def test_skip_unreadable_sends_the_rest_and_both_sides_name_what_was_left_out(relay_process, tree, tmp_path):
    out = tmp_path / "out"
    sender = send_as_unprivileged(*relay_process.peer_args(), "--skip-unreadable", "--password", CODE, "d", cwd=tree)
    receiver = peer("recv", *relay_process.peer_args(), "-y", "-o", f"{out}/", CODE, cwd=tmp_path)
    (r, _, r_err), (s, _, s_err) = finish(receiver), finish(sender)
    assert (s, r) == (0, 0), s_err + r_err
    assert "peer: warning: skipped d/locked: permission denied" in s_err.splitlines(), s_err
    assert "peer: warning: skipped d/secret.txt: permission denied" in s_err.splitlines(), s_err
    assert "  the sender skipped 2 unreadable files: d/secret.txt, d/locked" in r_err.splitlines(), r_err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["d", "d/ok.txt"]
    assert (out / "d" / "ok.txt").read_text() == "readable\n"


def test_the_skipped_list_is_an_optional_field_of_the_offer():
    entries = [OfferEntry(DIRECTORY, "d"), OfferEntry(FILE, "d/ok.txt", 9)]
    plain = Offer(entries)
    assert b"skipped" not in plain.to_json()  # what every sender sent before
    offer = Offer(entries, skipped=["d/secret.txt"])
    document = offer.to_json(features=["resume"])
    assert b'"skipped":["d/secret.txt"]' in document
    parsed, _, _ = Offer.from_json(document)
    assert parsed.skipped == ("d/secret.txt",)
    assert parsed.listing() == ["  the sender skipped 1 unreadable file: d/secret.txt"]
    # The entries and totals are the same with or without it, so a receiver that ignores
    # unknown keys (every one so far) takes the same offer.
    assert (parsed.entries, parsed.file_count, parsed.total_bytes) == (plain.entries, 1, 9)
    for bad in (b'"skipped":"d/secret.txt"', b'"skipped":[1]'):
        with pytest.raises(ProtocolError, match="skipped"):
            Offer.from_json(document.replace(b'"skipped":["d/secret.txt"]', bad))
