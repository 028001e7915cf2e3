"""The progress bar: after a resume, where it resumes and a rate of the bytes really moving;
files done out of all of them beside the bytes. Driven by a fake clock, not the wall's."""

from __future__ import annotations

import io
import re

import pytest

from peer.progress import Progress

MiB = 1024 * 1024


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("tqdm.std.time", clock)  # read by every bar made from here on
    return clock


def shown_rates(screen: str) -> list[str]:
    return re.findall(r"(\d+(?:\.\d+)? [KMGT]?i?B/s)", screen)


def visible_lines(screen: str) -> list[str]:
    """The terminal's lines as a person sees them: a carriage return goes back to the start
    of the line and what follows overwrites it (tqdm clears its bar with spaces)."""
    lines = []
    for physical in screen.split("\n"):
        shown: list[str] = []
        for piece in physical.split("\r"):
            shown[: len(piece)] = piece
        if "".join(shown).strip():
            lines.append("".join(shown).rstrip())
    return lines


def test_a_resumed_file_says_where_and_counts_only_the_moving_bytes(clock):
    screen = FakeTerminal()
    progress = Progress(1024 * MiB, label="Receiving", stream=screen, files=1)
    progress.note("big.bin")
    progress.resume_at(459 * MiB, 1024 * MiB)
    for _ in range(5):  # 10 MiB a second, for 5 seconds
        clock.now += 1
        progress.advance(10 * MiB)
    progress.close()
    text = screen.getvalue()
    lines = visible_lines(text)
    assert lines[0] == "Resuming big.bin at 459.0 MiB of 1.0 GiB", lines
    rates = shown_rates(text)
    assert rates and all(rate == "10.0 MiB/s" for rate in rates), rates
    # Counted from the resume point, and the ETA is that of the bytes left at that rate:
    # 515 MiB at 10 MiB/s is 00:51.
    assert lines[-1].startswith("Receiving:  50%|") and "509.0 MiB/1.0 GiB [00:05<00:51, 10.0 MiB/s" in lines[-1], lines


def test_without_resume_nothing_is_said_and_the_rate_is_unchanged(clock):
    screen = FakeTerminal()
    progress = Progress(100 * MiB, label="Sending", stream=screen, files=1)
    progress.note("a.bin")
    progress.resume_at(0, 100 * MiB)
    for _ in range(3):
        clock.now += 1
        progress.advance(10 * MiB)
    progress.close()
    assert "Resuming" not in screen.getvalue()
    rates = shown_rates(screen.getvalue())
    assert rates and all(rate == "10.0 MiB/s" for rate in rates), rates


def test_many_files_show_files_done_out_of_all(clock):
    screen = FakeTerminal()
    progress = Progress(3000, label="Receiving", stream=screen, files=3)
    for name in ("a", "b", "c"):
        progress.note(name)
        clock.now += 1
        progress.advance(1000)
    progress.close()
    text = screen.getvalue()
    assert "0/3 files, a" in text and "1/3 files, b" in text and "2/3 files, c" in text, text
    assert text.rstrip().endswith("3/3 files]"), text


def test_off_a_terminal_the_resume_point_is_still_one_line():
    stream = io.StringIO()
    progress = Progress(64 * MiB, label="Receiving", stream=stream, files=1)
    progress.note("big.bin")
    progress.resume_at(16 * MiB, 64 * MiB)
    progress.advance(48 * MiB)
    progress.close()
    assert stream.getvalue() == "Resuming big.bin at 16.0 MiB of 64.0 MiB\n"
    quiet = io.StringIO()
    progress = Progress(64 * MiB, label="Receiving", stream=quiet, quiet=True)
    progress.note("big.bin")
    progress.resume_at(16 * MiB, 64 * MiB)
    assert quiet.getvalue() == ""
