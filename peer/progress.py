"""Progress bars with rate and ETA, drawn by tqdm, and silent when nobody is watching."""

from __future__ import annotations

import sys
from typing import TextIO

from .offer import format_size


class Progress:
    """One bar for one transfer; a no-op when quiet or when stderr is not a terminal.

    Updates are throttled by tqdm itself (``mininterval``), so calling ``advance`` for every
    32 KiB record costs next to nothing on a fast transfer. With ``files`` (over one), the
    files done out of all of them go beside the bytes.
    """

    def __init__(
        self,
        total: int | None,
        *,
        label: str,
        quiet: bool = False,
        stream: TextIO | None = None,
        files: int = 0,
    ) -> None:
        self._stream = stream or sys.stderr
        self._quiet = quiet
        self._files = files
        self._begun = 0
        self._name = ""
        enabled = not quiet and self._stream.isatty()
        self._bar = (
            _binary_bar()(
                total=total,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                bar_format=_FORMAT if total is not None else _FORMAT_NO_TOTAL,
                file=self._stream,
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

    def resume_at(self, offset: int, size: int | None) -> None:
        """The current file continues at ``offset``: say so, and count those bytes as done
        but not as moving, so that the rate and the ETA are those of the bytes on the wire."""
        if not offset:
            return
        of = f" of {format_size(size)}" if size is not None else ""
        line = f"Resuming {self._name} at {format_size(offset)}{of}"
        if self._bar is not None:
            bar = self._bar
            bar.write(line, file=self._stream)
            # tqdm's rate is what moved between two refreshes (and n - initial overall):
            # moving all three marks together adds the offset to the count alone.
            bar.n += offset
            bar.last_print_n += offset
            bar.initial += offset
            bar.refresh()
        elif not self._quiet:
            print(line, file=self._stream, flush=True)

    def note(self, text: str) -> None:
        """Show what is being sent or received right now (a file name, as each one starts)."""
        self._begun += 1
        self._name = text
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(self._begun - 1), refresh=False)

    def _postfix(self, done: int) -> str:
        files = f"{done}/{self._files} files" if self._files > 1 else ""
        name = self._name[-40:] if done < max(self._files, 1) else ""
        return ", ".join(part for part in (files, name) if part)

    def close(self) -> None:
        if self._bar is not None:
            if self._files > 1 and self._bar.n == self._bar.total:
                self._bar.set_postfix_str(self._postfix(self._files), refresh=False)
            self._bar.close()
            self._bar = None


_FORMAT = "{l_bar}{bar}| {size_done}/{size_total} [{elapsed}<{remaining}, {speed}{postfix}]"
_FORMAT_NO_TOTAL = "{desc}: {size_done} [{elapsed}, {speed}{postfix}]"


def _binary_bar():
    """tqdm's bar with every figure in binary units (``459.0 MiB``, ``10.0 MiB/s``): tqdm
    scales the rate by 1000 whatever ``unit_divisor`` says, so the figures are made here."""
    from tqdm import tqdm  # imported only when a bar is drawn: it costs every start 20 ms

    class BinaryBar(tqdm):
        @property
        def format_dict(self):
            figures = super().format_dict
            rate = figures.get("rate")
            if rate is None and figures["elapsed"]:
                rate = (figures["n"] - figures["initial"]) / figures["elapsed"]
            figures["size_done"] = format_size(int(figures["n"]))
            total = figures.get("total")
            figures["size_total"] = format_size(int(total)) if total is not None else "?"
            figures["speed"] = f"{format_size(int(rate))}/s" if rate else "? B/s"
            return figures

    return BinaryBar
