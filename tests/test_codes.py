import importlib.resources
import math
import re
import socket
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer import codes
from processes import child_env

CODE_SHAPE = re.compile(r"[1-9][0-9]{2}(-[a-z]+)+")


def test_word_file_is_clean():
    raw = (importlib.resources.files("peer") / "words" / codes.WORDLIST_FILE).read_text("ascii")
    lines = raw.splitlines()
    assert raw.endswith("\n")
    assert all(re.fullmatch(r"[a-z]+", line) for line in lines)
    assert len(lines) == len(set(lines)) == 7772
    assert codes.load_wordlist() == tuple(lines)


def test_generated_codes_have_the_promised_shape():
    words = set(codes.load_wordlist())
    for _ in range(500):
        code = codes.generate_code()
        assert CODE_SHAPE.fullmatch(code)
        nameplate, *parts = code.split("-")
        assert int(nameplate) in codes.NAMEPLATES
        assert len(parts) == codes.DEFAULT_WORDS
        assert set(parts) <= words
        assert codes.normalize_code(code) == code
        assert codes.check_code(code) is None


def test_longer_codes():
    assert len(codes.generate_code(5).split("-")) == 1 + 5


def test_codes_differ():
    assert len({codes.generate_code() for _ in range(200)}) == 200


def test_entropy():
    assert codes.code_entropy_bits() >= codes.MIN_ENTROPY_BITS == 32
    assert codes.code_entropy_bits(3) == pytest.approx(3 * math.log2(7772))
    assert codes.code_entropy_bits(3) == pytest.approx(38.77, abs=0.01)


@pytest.mark.parametrize("words", [-1, 0, 1, 2])
def test_too_short_codes_are_refused(words):
    with pytest.raises(ValueError):
        codes.generate_code(words)


def test_words_come_from_secrets(monkeypatch):
    picks = iter(["abacus", "lemon", "zoom"])
    calls = []

    def fake_choice(sequence):
        calls.append(sequence)
        return next(picks)

    monkeypatch.setattr(codes.secrets, "choice", fake_choice)
    monkeypatch.setattr(codes.secrets, "randbelow", lambda n: n - 1)
    assert codes.generate_code() == "999-abacus-lemon-zoom"
    assert calls == [codes.load_wordlist()] * 3


@pytest.mark.parametrize(
    "typed, expected",
    [
        ("cobalt-lemon-fig", "cobalt-lemon-fig"),
        ("  Cobalt Lemon  FIG\n", "cobalt-lemon-fig"),
        ("cobalt - lemon -- fig", "cobalt-lemon-fig"),
        ("\tcobalt\t-lemon fig-", "cobalt-lemon-fig"),
        ("toto", "toto"),
        ("p@ss.w0rd!", "p@ss.w0rd!"),
        ("   ", ""),
    ],
)
def test_normalize(typed, expected):
    assert codes.normalize_code(typed) == expected


@settings(max_examples=200)
@given(st.text())
def test_normalize_is_idempotent_and_shell_friendly(text):
    once = codes.normalize_code(text)
    assert codes.normalize_code(once) == once
    assert once == once.strip()
    assert "--" not in once and not once.startswith("-") and not once.endswith("-")


def test_typo_hint_names_the_word_and_a_suggestion():
    hint = codes.check_code("abacus lemno zoom")
    assert hint is not None
    assert "'lemno'" in hint and "'lemon'" in hint


def test_typo_hint_for_several_words():
    hint = codes.check_code("abacis-lemon-zoomm")
    assert "'abacus'" in hint and "'zoom'" in hint


def test_hint_without_a_close_word():
    hint = codes.check_code("abacus-qqqqqqqq-zoom")
    assert hint == "'qqqqqqqq' is not in the word list"


@pytest.mark.parametrize(
    "text",
    [
        "abacus-lemon-zoom",  # all known
        "wei-widwagamboostu",  # a bob password: too few words
        "toto",
        "hello-world",
        "qqq-www-eee",  # no known word: someone's own password
        "abacus-lemon-z00m",  # not letters only
        "",
    ],
)
def test_no_hint_when_it_is_not_a_mistyped_code(text):
    assert codes.check_code(text) is None


def test_closest_word():
    assert codes.closest_word("lemon") == "lemon"
    assert codes.closest_word("lemno") == "lemon"
    assert codes.closest_word("zzzzzzzzzzzz") is None


@pytest.mark.parametrize(
    "a, b, distance",
    [
        ("", "", 0),
        ("abc", "abc", 0),
        ("abc", "", 3),
        ("kitten", "sitting", 3),
        ("lemon", "lemno", 1),
        ("lemon", "elmon", 1),
        ("ca", "abc", 3),
    ],
)
def test_edit_distance(a, b, distance):
    assert codes._edit_distance(a, b, limit=10) == distance
    assert codes._edit_distance(a, b, limit=1) == min(distance, 2)


@settings(max_examples=300)
@given(st.text("abc", max_size=7), st.text("abc", max_size=7), st.integers(0, 4))
def test_edit_distance_early_exit_agrees_with_the_full_computation(a, b, limit):
    full = codes._edit_distance(a, b, limit=100)
    assert codes._edit_distance(a, b, limit=limit) == min(full, limit + 1)


@pytest.mark.parametrize(
    "typed, password",
    [
        ("417-cobalt-lemon-unicycle", b"417-cobalt-lemon-unicycle"),
        ("  417 Cobalt  lemon-UNICYCLE ", b"417-cobalt-lemon-unicycle"),
        ("cobalt lemon unicycle", b"cobalt-lemon-unicycle"),
        # Not our code: used byte for byte, so bob's and users' passwords keep working.
        ("Hello World", b"Hello World"),
        ("wei-widwagamboostu", b"wei-widwagamboostu"),
        ("  toto\n", b"toto"),
        ("417-Cobalt-lemno", b"417-Cobalt-lemno"),
    ],
)
def test_password_bytes(typed, password):
    assert codes.password_bytes(typed) == password


def test_typo_hint_ignores_the_nameplate():
    assert "lemon" in codes.check_code("417-cobalt-lemno-unicycle")
    assert codes.check_code("417-cobalt-lemon-unicycle") is None


# --- codes questioned before they are tried (issue 15, item 3) ---------------------------


def test_review_offers_the_whole_corrected_code():
    suspect = codes.review_code("263-dizzy-finite-disparitx")
    assert suspect.unknown == ("disparitx",)
    assert suspect.correction == "263-dizzy-finite-disparity"
    assert suspect.describe() == "'disparitx' is not in the word list"


def test_review_normalises_what_was_typed():
    suspect = codes.review_code("  263 Dizzy fnite-disparity ")
    assert suspect.correction == "263-dizzy-finite-disparity"
    assert suspect.typed == "263 Dizzy fnite-disparity"


def test_review_without_a_close_word_has_no_correction():
    suspect = codes.review_code("263-dizzy-finite-qqqqqqqqqq")
    assert suspect.correction is None
    assert suspect.describe() == "'qqqqqqqqqq' is not in the word list"


@pytest.mark.parametrize(
    "text",
    [
        "263-dizzy-finite-disparity",  # all known
        "dizzy-finite-disparitx",  # no nameplate: not one of ours, a chosen password
        "263-dizzy-disparitx",  # fewer words than any code we generate
        "263-qqq-www-eee",  # no list word at all
        "263-dizzy-finite-disp4rity",  # not letters only
        "wei-widwagamboostu",  # bob's
        "263",
        "",
        "correct horse battery staple",
    ],
)
def test_review_lets_other_passwords_through(text):
    assert codes.review_code(text) is None


def test_completions_are_list_words_with_the_prefix():
    assert codes.completions("dizz") == ["dizziness", "dizzy"]
    assert codes.completions("DIZZY") == ["dizzy"]
    assert codes.completions("qqq") == []
    assert len(codes.completions("")) == len(codes.load_wordlist())


def _peer(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peer", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=child_env(), timeout=timeout,
    )


@pytest.fixture
def listener():
    """A loopback port that would see any connection a peer made to its "relay"."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        yield server


def _nobody_came(server: socket.socket) -> bool:
    try:
        connection, _ = server.accept()
    except BlockingIOError:
        return True
    connection.close()
    return False


def test_a_typo_without_a_terminal_is_refused_before_the_relay(listener):
    port = listener.getsockname()[1]
    result = _peer("recv", "--relay", f"127.0.0.1:{port}", "263-dizzy-finite-disparitx")
    assert result.returncode == 2, result.stderr
    assert "did you mean 263-dizzy-finite-disparity?" in result.stderr
    assert "--as-typed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _nobody_came(listener)


def test_a_typo_in_the_environment_is_refused_too(listener):
    port = listener.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "peer", "recv", "--relay", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        env=child_env(PEER_PASSWORD="263-dizzy-fnite-disparity"),
    )
    assert result.returncode == 2, result.stderr
    assert "263-dizzy-finite-disparity" in result.stderr
    assert _nobody_came(listener)


def test_as_typed_tries_the_code(relay_process, tmp_path):
    """A sender's own password shaped like our codes goes through with --as-typed."""
    code = "263-dizzy-finite-disparitx"
    (tmp_path / "hello.txt").write_text("hello\n")
    out = tmp_path / "out"
    sender = subprocess.Popen(
        [sys.executable, "-m", "peer", "send", *relay_process.peer_args(), "--code", code, "hello.txt"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=child_env(),
    )
    try:
        received = _peer("recv", *relay_process.peer_args(), "-y", "--as-typed", "-o", f"{out}/", code)
        assert received.returncode == 0, received.stderr
        assert (out / "hello.txt").read_text() == "hello\n"
        assert sender.wait(60) == 0
        assert "looks like a generated code" in sender.stderr.read()
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
        sender.stderr.close()
