"""The browser peer's page, served on the relay's WebSocket port: answers without I/O.

A browser that opens the relay's WebSocket address over http(s) gets a small static app
(``peer/browser/``, shipped in the Python package) that is a full peer: it runs the same
handshake and record layer over the relay's ``/handshake`` and ``/room`` endpoints. This
module only decides what to answer to one plain HTTP request; ``relay.transports`` reads
the request and writes the answer.

What can be served is fixed when the relay starts: the app's files are read once, and a
request can only ever name one of them (plus ``/words.txt``, the code word list). Paths are
compared after decoding each segment once; anything that could climb out of the folder or
mean two things (``..``, ``.``, a backslash, NUL, an encoded slash, empty segments) is not
found. Files of a type not listed in ``TYPES`` (the Python files of the package, caches)
are never loaded.

Every answer, errors included, carries the same security headers (``SECURITY_HEADERS``): a
strict Content-Security-Policy (scripts, styles and connections to this origin only), no
MIME sniffing, no referrer (the code lives in the URL's fragment, which browsers never
send, but a referrer header must not even try), and isolation from other origins.
"""

from __future__ import annotations

import collections
import hashlib
import http
import importlib.resources
import urllib.parse
from importlib.resources.abc import Traversable
from typing import Iterable, Mapping

import attrs

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; worker-src 'self'; frame-src 'self'; manifest-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Permissions-Policy", "camera=(), microphone=(), geolocation=()"),
)
TEXT = "text/plain; charset=utf-8"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": TEXT,
    ".md": TEXT,
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".webmanifest": "application/manifest+json",
}
"""The only files loaded, by how their name ends (``LICENSE*`` files are text too)."""
INDEX = "index.html"
WORDS_PATH = "words.txt"
"""Where the page finds the code words, for completion: the peers' own list."""
MAX_DEPTH = 8
"""Folders deeper than this in the app are not read (a symlink loop cannot hang the start)."""
NOT_SERVED = "this relay does not serve the browser peer"


@attrs.frozen
class Response:
    """A complete HTTP answer: what ``encode`` writes. It says ``Connection: close``
    unless encoded to keep the connection for another request."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or None."""
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)

    def encode(self, *, keep_alive: float | None = None) -> bytes:
        """The bytes to send; with ``keep_alive`` (seconds the connection waits idle for the
        next request) the connection is kept, and the client told how long."""
        try:
            phrase = http.HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Error"
        headers = list(self.headers)
        if keep_alive is not None:
            headers = [(k, v) for k, v in headers if k.lower() != "connection"]
            headers += [("Connection", "keep-alive"), ("Keep-Alive", f"timeout={keep_alive:g}")]
        lines = [f"HTTP/1.1 {self.status} {phrase}", *(f"{k}: {v}" for k, v in headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


@attrs.frozen
class File:
    body: bytes
    content_type: str
    etag: str
    """A strong validator: a hash of the bytes, so it changes exactly when they do."""


def content_type(name: str) -> str | None:
    """The type a file of this name is served with, or None if it is never served."""
    if name.startswith("LICENSE"):
        return TEXT
    dot = name.rfind(".")
    return TYPES.get(name[dot:]) if dot > 0 else None


def file_of(body: bytes, name: str) -> File | None:
    kind = content_type(name)
    if kind is None:
        return None
    return File(body, kind, '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"')


def load_files(root: Traversable, words: Traversable | None = None) -> dict[str, File]:
    """The app's files by their path under ``root`` (``lib/spoke.js``), read now."""
    files: dict[str, File] = {}

    def walk(folder: Traversable, prefix: str, depth: int) -> None:
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.name.startswith(".") or entry.name == "__pycache__":
                continue
            if entry.is_dir():
                if depth < MAX_DEPTH:
                    walk(entry, f"{prefix}{entry.name}/", depth + 1)
            elif entry.is_file() and (found := file_of(entry.read_bytes(), entry.name)):
                files[prefix + entry.name] = found

    if root.is_dir():
        walk(root, "", 0)
    if words is not None and words.is_file():
        files[WORDS_PATH] = file_of(words.read_bytes(), WORDS_PATH)  # type: ignore[assignment]
    return files


def clean_path(target: str) -> str | None:
    """The app file a request target names (``""`` for ``/``), or None if it cannot name one.

    The query is dropped; each segment is percent-decoded exactly once, and a segment that
    is empty, ``.`` or ``..``, or holds a slash, a backslash or NUL after decoding, names
    nothing. The absolute form (``http://host/path``) is reduced to its path.
    """
    if not target.startswith("/"):
        if not target.lower().startswith(("http://", "https://")):
            return None
        target = urllib.parse.urlsplit(target).path or "/"
    path = target.split("?", 1)[0].split("#", 1)[0]
    if path == "/":
        return ""
    segments = []
    for raw in path[1:].split("/"):
        try:
            segment = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return None
        if segment in ("", ".", "..") or any(c in segment for c in "/\\\x00"):
            return None
        segments.append(segment)
    return "/".join(segments)


def _matches(if_none_match: str, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (weak comparison, as RFC 9110 asks here)."""
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


class WebApp:
    """The page's files and the rules for serving them; ``respond`` answers one request.

    ``enabled`` follows the relay's ``web_app`` option (it may change on a reload); while
    it is false every request gets 404 saying so. ``requests`` counts the answers by
    status, for the metrics.
    """

    def __init__(self, files: Mapping[str, File], *, enabled: bool = True) -> None:
        self.files = dict(files)
        self.enabled = enabled
        self.requests: collections.Counter[int] = collections.Counter()

    @classmethod
    def load(cls, *, enabled: bool = True) -> WebApp:
        """The app shipped in the package (``peer/browser/``) and the peers' word list."""
        package = importlib.resources.files("peer")
        return cls(load_files(package / "browser", package / "words" / "eff_large.txt"),
                   enabled=enabled)

    def respond(self, method: str, target: str,
                headers: Iterable[tuple[bytes | str, bytes | str]] = ()) -> Response:
        """The answer to ``method target`` with these request headers (names in any case)."""
        if not self.enabled:
            return self.error(404, NOT_SERVED, head=method == "HEAD")
        if method not in ("GET", "HEAD"):
            return self.error(405, "only GET and HEAD are served here", [("Allow", "GET, HEAD")])
        path = clean_path(target)
        name = INDEX if path == "" else path
        found = self.files.get(name) if name is not None else None
        if found is None:
            if path == "":
                return self.error(404, "the browser peer's page is not installed on this relay "
                                       f"(no {INDEX})", head=method == "HEAD")
            return self.error(404, "not found", head=method == "HEAD")
        cache = [("ETag", found.etag), ("Cache-Control", "no-cache")]
        condition = _header(headers, "if-none-match")
        if condition is not None and _matches(condition, found.etag):
            return self._count(Response(304, (*SECURITY_HEADERS, *cache,
                                              ("Content-Length", str(len(found.body))),
                                              ("Connection", "close"))))
        return self._count(Response(200, (
            *SECURITY_HEADERS,
            ("Content-Type", found.content_type),
            *cache,
            ("Content-Length", str(len(found.body))),
            ("Connection", "close"),
        ), b"" if method == "HEAD" else found.body))

    def error(self, status: int, reason: str, extra: Iterable[tuple[str, str]] = (),
              *, head: bool = False) -> Response:
        """An error answer whose body is ``reason`` on one line (none for HEAD)."""
        body = reason.encode("utf-8", "replace") + b"\n"
        return self._count(Response(status, (
            *SECURITY_HEADERS,
            ("Content-Type", TEXT),
            ("Cache-Control", "no-cache"),
            *extra,
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ), b"" if head else body))

    def _count(self, response: Response) -> Response:
        self.requests[response.status] += 1
        return response


def _header(headers: Iterable[tuple[bytes | str, bytes | str]], name: str) -> str | None:
    """Every value of request header ``name`` joined by commas (as HTTP allows), or None."""
    values = []
    for key, value in headers:
        key = key.decode("latin-1") if isinstance(key, bytes) else key
        if key.lower() == name:
            values.append(value.decode("latin-1") if isinstance(value, bytes) else value)
    return ", ".join(values) if values else None
