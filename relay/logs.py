"""The relay's log lines: plain or JSON, on stderr, in the journal's terms under systemd.

What the relay logs is its own decisions (who connected, UIDs, pairings, refusals and why
a connection closed); the code never passes a password, a key or a payload byte to a log
call, and the relay never holds a password or key at all. What peers *say* can still reach
a message (a secure-room ticket, a proxy's header), so every message is made printable
here: a hostile peer cannot forge log lines or send escape sequences to a terminal.

With ``anonymize``, IP addresses in messages keep only their network (/24 for IPv4, /48
for IPv6) followed by a short keyed hash of the whole address, e.g. ``203.0.113.0/24~5a1c9e``:
one client's lines can still be followed within a run, but the key is made anew by every
process and never written anywhere, so the address cannot be recovered from the logs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import sys
import time
from typing import IO

import attrs

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
FORMATS = ("plain", "json")
LOGGER = "relay"
"""Every relay module logs under this name."""

_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}
_KEEP_BITS = {4: 24, 6: 48}

_IPV6 = r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?"
_IPV4 = r"\d{1,3}(?:\.\d{1,3}){3}"
_ADDRESS = re.compile(rf"(?<![\w:.])(?:{_IPV6}(?![\w.]|:[0-9A-Fa-f])|{_IPV4}(?![\w.]))")
"""Candidates only: each is checked with ``ipaddress`` before it is replaced."""
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


@attrs.frozen
class LogSettings:
    level: str = attrs.field(default="info", validator=attrs.validators.in_(LEVELS))
    format: str = attrs.field(default="plain", validator=attrs.validators.in_(FORMATS))
    anonymize: bool = False


class Anonymizer:
    """Replaces IP addresses in text by their network and a keyed hash (see the module)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(16)

    def address(self, text: str) -> str:
        """One address, anonymized; anything that is not an address comes back as it was."""
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return text
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_unspecified:  # 0.0.0.0 or :: ("listening on every address"): nobody's
            return text
        network = ipaddress.ip_network((address, _KEEP_BITS[address.version]), strict=False)
        tag = hashlib.blake2b(address.packed, key=self._key, digest_size=3).hexdigest()
        return f"{network}~{tag}"

    def text(self, text: str) -> str:
        return _ADDRESS.sub(self._replace, text)

    def _replace(self, match: re.Match) -> str:
        found = match.group()
        if found.endswith(":") and not found.endswith("::"):  # "from 2001:db8::1: refused"
            return self.address(found[:-1]) + ":"
        return self.address(found)


def printable(text: str) -> str:
    """Control characters escaped (``\\x1b``), so that a message stays one harmless line."""
    def escape(match: re.Match) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"

    return _UNPRINTABLE.sub(escape, text.replace("\n", "\\n"))


class RelayFormatter(logging.Formatter):
    """Plain (``time level logger: message``) or JSON lines, optionally with a syslog
    ``<N>`` prefix (the journal reads it as the line's priority and adds its own time)."""

    def __init__(self, style: str = "plain", *, anonymizer: Anonymizer | None = None,
                 journal: bool = False) -> None:
        super().__init__()
        self.style = style
        self.anonymizer = anonymizer
        self.journal = journal

    def _clean(self, text: str) -> str:
        if self.anonymizer is not None:
            text = self.anonymizer.text(text)
        return text

    def format(self, record: logging.LogRecord) -> str:
        message = self._clean(record.getMessage())
        failure = self._clean(self.formatException(record.exc_info)) if record.exc_info else ""
        if self.style == "json":
            entry = {
                "time": _iso_time(record.created),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": message,
            }
            if failure:
                entry["exception"] = failure
            line = json.dumps(entry, ensure_ascii=True)
        else:
            line = printable(message)
            if failure:
                line += " | " + printable(failure)
            line = f"{record.levelname} {record.name}: {line}"
            if not self.journal:
                line = f"{_plain_time(record.created)} {line}"
        if self.journal:
            line = f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def _iso_time(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def _plain_time(created: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) + f",{int(created % 1 * 1000):03d}"


def under_journal(stream: IO[str] | None = None, environ: dict[str, str] | None = None) -> bool:
    """Whether ``stream`` (stderr) is connected to the journal: ``JOURNAL_STREAM`` names its
    device and inode (systemd sets it for the service's own stdout/stderr only)."""
    environ = os.environ if environ is None else environ
    expected = environ.get("JOURNAL_STREAM", "")
    stream = sys.stderr if stream is None else stream
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


_anonymizer: Anonymizer | None = None


def configure(settings: LogSettings, stream: IO[str] | None = None) -> logging.Logger:
    """Send the relay's logs to ``stream`` (stderr) as ``settings`` say; callable again on reload.

    The anonymization key is made once per process, so a reload keeps pseudonyms stable.
    """
    global _anonymizer
    stream = sys.stderr if stream is None else stream
    anonymizer = None
    if settings.anonymize:
        if _anonymizer is None:
            _anonymizer = Anonymizer()
        anonymizer = _anonymizer
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RelayFormatter(settings.format, anonymizer=anonymizer,
                                        journal=under_journal(stream)))
    logger = logging.getLogger(LOGGER)
    logger.handlers[:] = [handler]
    logger.setLevel(LEVELS[settings.level])
    logger.propagate = False
    return logger
