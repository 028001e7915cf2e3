"""What we are waiting for, in one line on stderr, so that a long wait is never silent.

On a terminal the line is rewritten in place (``\\r`` and clear-to-end-of-line) and the
progress bar takes it over; in a log or a pipe each new state is one plain line, so a
script's stderr still tells the story in order.
"""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

from .console import Console

CLEAR = "\x1b[K"
"""Clear to the end of the line (ANSI EL): a shorter state leaves no tail of a longer one."""


class StatusLine:
    """The current state (``Waiting for the sender...``); silent when quiet."""

    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self._stream = stream
        self._text: str | None = None
        self._drawn = False

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    @property
    def terminal(self) -> bool:
        return self.stream.isatty()

    def show(self, text: str) -> None:
        """Say that we are now in this state (nothing if it is the one shown already)."""
        if self.quiet or text == self._text:
            return
        self._text = text
        if self.terminal:
            self._draw()
        else:
            print(text, file=self.stream, flush=True)

    def clear(self) -> None:
        """Wipe the line (on a terminal) so that a message or a prompt starts on a clean one."""
        if self._drawn:
            self.stream.write("\r" + CLEAR)
            self.stream.flush()
            self._drawn = False

    def redraw(self) -> None:
        """Show the current state again below a message that interrupted it."""
        if not self.quiet and self._text is not None and self.terminal and not self._drawn:
            self._draw()

    def hand_over(self, text: str) -> None:
        """The transfer starts: a terminal gets the progress bar on this line instead, a log
        gets this last state."""
        if not self.terminal:
            self.show(text)
        self.end()

    def end(self) -> None:
        """Hand the line over for good (to a progress bar, or to the final messages)."""
        self.clear()
        self._text = None

    def _draw(self) -> None:
        # Cut to the terminal's width: a wrapped line cannot be rewritten by \r.
        width = shutil.get_terminal_size((80, 24)).columns - 1
        text = self._text if len(self._text) <= width else self._text[: max(width - 3, 0)] + "..."
        self.stream.write("\r" + text + CLEAR)
        self.stream.flush()
        self._drawn = True


class StatusConsole(Console):
    """A console whose messages and prompts first wipe the status line, then restore it."""

    def __init__(self, status: StatusLine, **options) -> None:
        super().__init__(**options)
        self.status = status

    def info(self, message: str) -> None:
        self.status.clear()
        super().info(message)
        self.status.redraw()

    def warn(self, message: str) -> None:
        self.status.clear()
        super().warn(message)
        self.status.redraw()

    def error(self, message: str) -> None:
        self.status.end()
        super().error(message)

    async def ask(self, question: str) -> bool:
        self.status.end()
        return await super().ask(question)

    def read_code_line(self, *args, **options) -> str:
        self.status.end()
        return super().read_code_line(*args, **options)

    def ask_now(self, *args, **options) -> bool:
        self.status.end()
        return super().ask_now(*args, **options)
