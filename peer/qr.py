"""The code as a QR code in the terminal, so that a phone can read it instead of a person.

It holds the code itself, exactly as printed; or, when the relay is a WebSocket relay, the
browser link ``https://RELAY/#receive/CODE`` (``RelayAddress.page_link``): a phone's camera
then opens the relay's page, which receives with the code filled in. Drawn by segno (well
kept, pure Python, no image library) with half blocks, two rows of modules per line of text.
"""

from __future__ import annotations

import io


def render(code: str) -> str:
    """The QR code of ``code`` (or a link) as lines of text, ready for a terminal."""
    import segno  # only when a QR code is drawn: the sender's other paths do not pay for it

    out = io.StringIO()
    segno.make(code, micro=False).terminal(out=out, compact=True, border=2)
    return out.getvalue()
