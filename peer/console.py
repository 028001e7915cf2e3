"""What the user sees and answers: one-line messages on stderr and yes/no prompts."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import trio

PROGRAM = "peer"


class Console:
    """Messages go to stderr (stdout carries only the code, so scripts can capture it)."""

    def __init__(self, *, quiet: bool = False, assume_yes: bool = False) -> None:
        self.quiet = quiet
        self.assume_yes = assume_yes

    def info(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"{PROGRAM}: warning: {message}", file=sys.stderr, flush=True)

    def error(self, message: str) -> None:
        print(f"{PROGRAM}: {message}", file=sys.stderr, flush=True)

    @property
    def interactive(self) -> bool:
        return sys.stdin is not None and sys.stdin.isatty()

    async def ask(self, question: str) -> bool:
        """y or yes accept, n or no refuse; so does an empty line on a terminal (bob's rule,
        Enter means yes). End of input refuses: ``peer recv < /dev/null`` or a closed pipe
        must not accept what nobody read. Only -y accepts unasked."""
        if self.assume_yes:
            return True
        prompt = f"{question} [Y/n]: "
        while True:
            print(prompt, end="", file=sys.stderr, flush=True)
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                print(file=sys.stderr, flush=True)
                return False
            answer = line.strip().lower()
            if answer in ("y", "yes") or (answer == "" and self.interactive):
                return True
            if answer in ("n", "no"):
                return False
            prompt = f"Please answer y or n. {question} [Y/n]: "

    def read_code_line(self, complete: Callable[[str], list[str]] | None = None) -> str:
        """Ask for the code on the terminal, with line editing and Tab completion.

        Synchronous on purpose: it runs before trio starts, in the main thread, so Ctrl-C
        reaches readline, which puts the terminal back as it found it. The prompt goes to
        the terminal even when stdout is a pipe (``--stdout > file``). An empty answer asks
        again; end of input raises EOFError.
        """
        prompt = "Code: "
        editing = sys.stdin.isatty() and (sys.stdout.isatty() or sys.stderr.isatty())
        with _line_editing(complete if editing else None):
            while True:
                if editing:
                    with _stdout_on_terminal():
                        line = input(prompt)
                else:
                    print(prompt, end="", file=sys.stderr, flush=True)
                    line = sys.stdin.readline()
                    if not line:
                        raise EOFError("no code given")
                if line.strip():
                    return line.strip()
                prompt = "You must enter the code: "

    def ask_now(self, question: str, *, default: bool = True) -> bool:
        """A yes/no question asked before trio starts (about the code, not the offer, so
        -y does not answer it). End of input is no."""
        prompt = f"{question} {'[Y/n]' if default else '[y/N]'}: "
        while True:
            print(prompt, end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                print(file=sys.stderr, flush=True)
                return False
            answer = line.strip().lower()
            if answer in ("y", "yes"):
                return True
            if answer in ("n", "no"):
                return False
            if answer == "":
                return default
            prompt = f"Please answer y or n. {prompt}"


@contextlib.contextmanager
def _line_editing(complete: Callable[[str], list[str]] | None) -> Iterator[None]:
    """readline for the duration of one prompt: Tab completes a word of the code from
    ``complete`` (words are separated by dashes or spaces). Without readline (some
    platforms), the prompt is a plain line."""
    try:
        import readline
    except ImportError:
        yield
        return
    old = (readline.get_completer(), readline.get_completer_delims())
    matches: list[str] = []

    def completer(text: str, state: int) -> str | None:
        nonlocal matches
        if state == 0:
            matches = complete(text) if complete is not None else []
            if len(matches) == 1:
                matches = [matches[0] + "-"]  # done with this word: on to the next one
        return matches[state] if state < len(matches) else None

    readline.set_completer(completer)
    readline.set_completer_delims(" -\t\n")
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    try:
        yield
    finally:
        readline.set_completer(old[0])
        readline.set_completer_delims(old[1])


@contextlib.contextmanager
def _stdout_on_terminal() -> Iterator[None]:
    """``input`` edits the line only when stdin and stdout are terminals, and writes its
    prompt to stdout. With stdout redirected (``--stdout > file``) and stderr on the
    terminal, point file descriptor 1 at stderr for the prompt: nothing else is written
    to stdout yet, and the prompt must not end up in the file."""
    if sys.stdout.isatty():
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
