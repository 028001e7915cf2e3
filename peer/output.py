"""``peer recv -o PATH``: a directory to save into, or the new name of the one file offered.

magic-wormhole users type ``-o notes.txt`` to save the offered file as ``notes.txt``. So a
PATH that does not exist and does not end in ``/`` is decided only once the offer is known:
one file, and nothing else, is saved under that name beside it; anything else (a directory,
several files) goes into PATH, created as a directory as before. An existing directory, or a
trailing ``/``, always means "save into".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .destination import Destination, DestinationError
from .offer import Offer, os_reason


def names_a_file(output: str) -> bool:
    """Whether ``-o output`` may be the new name of a single offered file."""
    return not output.endswith(("/", os.sep)) and not os.path.lexists(output)


class OutputDestination:
    """A Destination whose root is chosen by the offer (see the module): PATH's parent with
    ``single_name``, or PATH itself, created. Everything else is the chosen Destination's."""

    def __init__(self, output: str | os.PathLike[str], **options) -> None:
        self.path = Path(output)
        self._options = options
        self._inner = Destination(self.path, **options)
        self.as_file = False
        """Whether the offer turned out to be one file, saved as `path`."""

    def plan(self, offer: Offer, **options) -> list[Path]:
        files = [entry for entry in offer.entries if entry.is_file]
        self.as_file = len(offer.entries) == 1 and len(files) == 1 and offer.text is None
        if self.as_file:
            parent = self.path.parent
            self._inner = Destination(parent, single_name=self.path.name, **self._options)
        else:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise DestinationError(f"cannot use {self.path} as the destination: {os_reason(error)}") from None
            self._inner = Destination(self.path, **self._options)
        return self._inner.plan(offer, **options)

    @contextlib.contextmanager
    def all_or_nothing(self) -> Iterator[OutputDestination]:
        """Like Destination's, but aborts whichever Destination `plan` chose."""
        try:
            yield self
        except BaseException:
            self._inner.abort()
            raise

    def __getattr__(self, name: str):
        return getattr(self._inner, name)
