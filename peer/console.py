"""What the user sees and answers: one-line messages on stderr and yes/no prompts."""

from __future__ import annotations

import sys

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

    async def read_code(self) -> str:
        """Ask for the code on the terminal; an empty answer asks again."""
        prompt = "Code: "
        while True:
            print(prompt, end="", file=sys.stderr, flush=True)
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                raise EOFError("no code given")
            if line.strip():
                return line.strip()
            prompt = "You must enter the code: "
