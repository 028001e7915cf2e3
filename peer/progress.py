"""Progress bars with rate and ETA, drawn by tqdm, and silent when nobody is watching."""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """One bar for one transfer; a no-op when quiet or when stderr is not a terminal.

    Updates are throttled by tqdm itself (``mininterval``), so calling ``advance`` for every
    32 KiB record costs next to nothing on a fast transfer.
    """

    def __init__(
        self, total: int | None, *, label: str, quiet: bool = False, stream: TextIO | None = None
    ) -> None:
        stream = stream or sys.stderr
        enabled = not quiet and stream.isatty()
        if enabled:
            from tqdm import tqdm  # imported only when a bar is drawn: it costs every start 20 ms
        self._bar = (
            tqdm(
                total=total,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=stream,
                mininterval=0.2,
                leave=True,
                dynamic_ncols=True,
            )
            if enabled
            else None
        )

    def advance(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def note(self, text: str) -> None:
        """Show what is being sent or received right now (a file name)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text[-40:], refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
