"""Images over HTTP(S): a streamed GET that survives dropped connections by resuming.

The body is never held in memory: :class:`ResumingReader` hands out ``read(n)``
chunks to the import pipeline, which hashes them as served. When the connection
drops (reset, EOF before Content-Length, read timeout) it asks again from the
byte it got to (``Range: bytes=<pos>-``, with ``If-Range`` so a file that
changed meanwhile is not spliced onto the old one's beginning) and accepts only a
206 that starts exactly there. A server that cannot resume makes the import fail:
restarting from zero would feed the same bytes twice into the same hash and
decompressor.

Only the standard library: urllib gives proxies (``https_proxy``, ``no_proxy``)
and certificate checks; redirects are followed here, not by urllib, so a loop,
a downgrade to plain HTTP or a non-HTTP target can be refused by name.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import PurePosixPath
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from bbsnap import __version__
from bbsnap.errors import BbsnapError, NotFoundError, UsageError

MAX_REDIRECTS = 10
# Pause before each resume attempt; their number is the retry limit. The first retry is
# immediate (a dropped connection is usually just that), later ones back off.
RETRY_DELAYS: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)
# A resumed connection that drops before delivering this much (unless the body ended) was
# no progress: a server that sends one byte per connection runs out of retries, not
# through 95,000 reconnections.
RESUME_MIN_BYTES = 1 << 20
# Resumes of one download, whatever each delivered: a real network that drops this often
# is better served by another tool and a local import.
MAX_RESUMES = 100
DEFAULT_MIN_RATE = 1024  # bytes/s over each http_timeout window (settings.http_min_rate)
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_MISSING_CODES = (404, 410)
_HEADERS = {
    "User-Agent": f"bbsnap/{__version__}",
    # The digest is of the bytes as served, and Range offsets count those bytes:
    # a transfer encoding added on the way would change both.
    "Accept-Encoding": "identity",
}

# Connection-level failures: worth a retry when resuming, reported when opening.
ConnectionFailure = (OSError, http.client.HTTPException)


def is_url(spec: str) -> bool:
    # "://" and not just a scheme: a local file may well be called "http:notes".
    return spec.lower().startswith(("http://", "https://"))


def check_url(url: str) -> str:
    """*url* if it names an HTTP(S) host; a usage error otherwise (before any connection)."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        valid = False
    if not valid:
        raise UsageError(f"'{url}' is not a valid http:// or https:// URL")
    # http.client sends the path as it is: it must already be percent-encoded ASCII.
    if not url.isascii() or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise UsageError(f"the URL {url!r} has spaces, control or non-ASCII characters",
                         hint="percent-encode them, e.g. %20 for a space")
    return url


def file_name(url: str) -> str:
    """The last path segment, decoded (what a SHA256SUMS file lists); "" for ``.../``."""
    return unquote(PurePosixPath(urlsplit(url).path).name)


def with_suffix(url: str, suffix: str) -> str:
    """*url* with *suffix* added to its path: ``h/a.qcow2?x=1`` -> ``h/a.qcow2.json?x=1``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path + suffix, fragment=""))


def display(url: str) -> str:
    """*url* for messages: without user:password and query (signed URLs carry secrets there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Make every 3xx surface as an HTTPError, so :func:`request` decides where to go."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


def request(url: str, *, timeout: float,
            headers: Mapping[str, str] | None = None) -> http.client.HTTPResponse:
    """GET *url*, following redirects; any 2xx response is returned, open.

    An HTTP error status raises NotFoundError (404, 410) or BbsnapError with the
    status in the message. Connection failures (refused, reset, timeout, TLS)
    propagate as OSError / HTTPException: the caller retries or reports them.
    """
    check_url(url)
    # Built per call: ProxyHandler reads the *_proxy environment when it is made.
    opener = urllib.request.build_opener(_NoRedirects())
    all_headers = {**_HEADERS, **(headers or {})}
    visited = [url]
    current = url
    while True:
        try:
            response = opener.open(urllib.request.Request(current, headers=all_headers),
                                   timeout=timeout)
            return response  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location") if exc.code in _REDIRECT_CODES else None
            exc.close()
            if not location:
                raise _status_error(current, exc.code, exc.reason) from None
        target = urljoin(current, location.strip())
        _check_redirect(current, target)
        if target in visited:
            raise BbsnapError(f"{display(url)} redirects in a loop (back to {display(target)})")
        if len(visited) > MAX_REDIRECTS:
            raise BbsnapError(f"{display(url)} redirects more than {MAX_REDIRECTS} times")
        visited.append(target)
        current = target


def _check_redirect(source: str, target: str) -> None:
    try:
        check_url(target)
    except UsageError:
        raise BbsnapError(f"{display(source)} redirects to something other than an http:// or "
                          f"https:// URL ({target[:100]!r})") from None
    scheme = urlsplit(target).scheme.lower()
    if scheme == "http" and urlsplit(source).scheme.lower() == "https":
        raise BbsnapError(f"{display(source)} redirects from HTTPS to plain HTTP "
                          f"({display(target)})", hint="use the plain HTTP address if you trust it")


def _status_error(url: str, code: int, reason: object) -> BbsnapError:
    message = f"{display(url)}: HTTP {code} {reason}".rstrip()
    if code in _MISSING_CODES:
        return NotFoundError(message)
    return BbsnapError(message)


def describe(exc: BaseException) -> str:
    """One line for a connection-level failure."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, str):
        exc = exc.reason  # type: ignore[assignment, unused-ignore]
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection closed in the middle of a chunk"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    text = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def connection_error(url: str, exc: BaseException, timeout: float) -> BbsnapError:
    reason = describe(exc)
    hint = "raise http_timeout (BBSNAP_HTTP_TIMEOUT)" if reason == "timed out" else None
    if reason == "timed out":
        reason = f"timed out after {timeout:g} s"
    return BbsnapError(f"cannot download {display(url)}: {reason}", hint=hint)


def fetch(url: str, *, timeout: float, max_bytes: int, what: str,
          missing_ok: bool = False) -> bytes | None:
    """A small document (checksum list, sidecar) of at most *max_bytes*.

    None when it does not exist (404, 410) and *missing_ok*. Errors name *what* failed.
    """
    try:
        with request(url, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except NotFoundError as exc:
        if missing_ok:
            return None
        raise NotFoundError(f"the {what}: {exc.message}") from None
    except BbsnapError as exc:
        raise type(exc)(f"the {what}: {exc.message}", hint=exc.hint) from None
    except ConnectionFailure as exc:
        error = connection_error(url, exc, timeout)
        raise BbsnapError(f"the {what}: {error.message}", hint=error.hint) from exc
    if len(data) > max_bytes:
        raise BbsnapError(f"the {what} {display(url)} is larger than {max_bytes} bytes")
    return data


def open_url(url: str, *, timeout: float, min_rate: int = DEFAULT_MIN_RATE) -> ResumingReader:
    """Start downloading *url*: the response headers are in, the body not yet read.

    The body must keep arriving at *min_rate* bytes/s or more, measured over windows of
    *timeout* seconds (0: no minimum): a per-read timeout alone lets a server trickle one
    byte a second for ever.
    """
    try:
        response = request(url, timeout=timeout)
    except ConnectionFailure as exc:
        raise connection_error(url, exc, timeout) from exc
    if response.status != 200:
        response.close()
        raise BbsnapError(f"{display(url)}: HTTP {response.status} {response.reason} "
                          "(expected 200 with the file)")
    return ResumingReader(url, response, timeout=timeout, min_rate=min_rate)


class ResumingReader:
    """``read(n)`` over an HTTP body, reconnecting with a Range request after a drop.

    Reads go through ``read1`` (one receive at a time) so a timeout or reset never
    takes bytes already received with it; ``position`` counts the bytes handed
    out, and a resume asks for exactly the next one. Retries are counted per
    stall: each attempt that delivers less than ``RESUME_MIN_BYTES`` uses one of
    ``RETRY_DELAYS``; a connection that delivers that much resets the count, so a
    long download survives many separate drops (up to ``MAX_RESUMES``) but a server
    that stopped serving, or serves a byte per connection, is given up on quickly.
    Throughout, the body must arrive at ``min_rate`` bytes/s per ``timeout`` window.
    """

    def __init__(self, url: str, response: http.client.HTTPResponse, *, timeout: float,
                 min_rate: int = DEFAULT_MIN_RATE) -> None:
        self.url = url
        # None when chunked or not sent: then only a chunked stream's own framing tells a
        # drop from the end (the decompressor and the checksum catch the rest).
        self.length: int | None = response.length
        self._etag = response.headers.get("ETag")
        self._last_modified = response.headers.get("Last-Modified")
        self._response: http.client.HTTPResponse | None = response
        self._timeout = timeout
        self._ended = False          # a body of unknown length ended with its connection
        self._failure = ""           # why the last connection was lost
        self._fruitless = 0          # consecutive resume attempts that delivered too little
        self._resumes = 0            # resume requests made, in all
        self._connection_bytes = 0   # delivered by the current connection
        self._min_rate = min_rate
        self._window = (time.monotonic(), 0)  # (start, position) of the rate window
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        """Up to *size* bytes (fewer only at the end, or just after a drop); b"" at the end."""
        if size is None or size < 0:
            return self._read_all()
        # Collect up to *size*: the pipeline finds holes in whole 64 KiB blocks of a read.
        buffer = bytearray()
        while len(buffer) < size and not self._finished():
            if self._response is None:
                if buffer:
                    break  # hand out what arrived before the drop, resume on the next call
                self._resume()
            buffer += self._receive(size - len(buffer))
        return bytes(buffer)

    def _finished(self) -> bool:
        return self._ended or (self.length is not None and self.position >= self.length)

    def _receive(self, size: int) -> bytes:
        """Bytes from the current response; on a drop, b"" with the response closed."""
        assert self._response is not None
        try:
            data = self._response.read1(size)
        except ConnectionFailure as exc:
            self._lost(describe(exc))
            return b""
        if data:
            self.position += len(data)
            self._connection_bytes += len(data)
            if self._connection_bytes >= RESUME_MIN_BYTES or self._finished():
                self._fruitless = 0
            self._check_rate()
        elif self.length is None:
            self._ended = True  # no length to fall short of: the end of the body
        else:
            self._lost(f"the connection closed at byte {self.position} of {self.length}")
        return data

    def _check_rate(self) -> None:
        """Refuse a body slower than min_rate over the last window of `timeout` seconds."""
        started, at = self._window
        elapsed = time.monotonic() - started
        if self._min_rate <= 0 or elapsed < self._timeout:
            return
        if self.position - at < self._min_rate * elapsed:
            raise BbsnapError(
                f"the download of {display(self.url)} is too slow: {self.position - at} bytes "
                f"in the last {elapsed:.0f} s, under the minimum of {self._min_rate} bytes/s; "
                "nothing was imported",
                hint="lower http_min_rate (BBSNAP_HTTP_MIN_RATE) if the link is that slow")
        self._window = (time.monotonic(), self.position)

    def _lost(self, reason: str) -> None:
        self._failure = reason
        self._close_response()

    def _read_all(self) -> bytes:
        parts = []
        while chunk := self.read(1 << 20):
            parts.append(chunk)
        return b"".join(parts)

    def _resume(self) -> None:
        reason = self._failure
        while True:
            if self._fruitless >= len(RETRY_DELAYS):
                raise BbsnapError(
                    f"download of {display(self.url)} failed at byte {self.position}"
                    f"{self._of_length()}: {reason}; gave up after {len(RETRY_DELAYS)} attempts "
                    f"to resume (none delivered {RESUME_MIN_BYTES} bytes)")
            if self._resumes >= MAX_RESUMES:
                raise BbsnapError(
                    f"download of {display(self.url)} failed at byte {self.position}"
                    f"{self._of_length()}: {reason}; the connection dropped {MAX_RESUMES + 1} "
                    "times, bbsnap gives up", hint="download it with another tool and import "
                    "the local copy")
            delay = RETRY_DELAYS[self._fruitless]
            self._fruitless += 1
            self._resumes += 1
            if delay:
                time.sleep(delay)
            headers = {"Range": f"bytes={self.position}-"}
            validator = self._validator()
            if validator:
                headers["If-Range"] = validator
            try:
                response = request(self.url, timeout=self._timeout, headers=headers)
            except ConnectionFailure as exc:
                reason = describe(exc)
                continue
            self._response = self._check_resumed(response)
            self._connection_bytes = 0
            return

    def _validator(self) -> str | None:
        # RFC 9110: If-Range takes a strong entity tag only; else the modification date.
        if self._etag and not self._etag.startswith("W/"):
            return self._etag
        return self._last_modified

    def _check_resumed(self, response: http.client.HTTPResponse) -> http.client.HTTPResponse:
        where = f"byte {self.position}{self._of_length()}"
        if response.status == 200:
            response.close()
            if self._changed(response):
                raise BbsnapError(f"{display(self.url)} changed on the server during the "
                                  f"download (dropped at {where}); nothing was imported",
                                  hint="run the import again")
            raise BbsnapError(
                f"the download of {display(self.url)} dropped at {where} and the server cannot "
                "resume (it answered a Range request with the whole file); nothing was imported",
                hint="download the file with another tool and import the local copy")
        if response.status != 206:
            response.close()
            raise BbsnapError(f"{display(self.url)}: HTTP {response.status} {response.reason} "
                              f"to a request to resume at {where}")
        start, total = parse_content_range(response.headers.get("Content-Range"))
        if start != self.position:
            response.close()
            sent = "no valid Content-Range" if start is None else f"data from byte {start}"
            raise BbsnapError(f"{display(self.url)}: asked to resume at byte {self.position}, "
                              f"the server sent {sent}")
        if total is not None and self.length is not None and total != self.length:
            response.close()
            raise BbsnapError(f"{display(self.url)} changed on the server during the download "
                              f"({self.length} bytes at first, now {total})")
        return response

    def _changed(self, response: http.client.HTTPResponse) -> bool:
        etag, modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
        return bool((self._etag and etag and etag != self._etag)
                    or (self._last_modified and modified and modified != self._last_modified))

    def _of_length(self) -> str:
        return f" of {self.length}" if self.length is not None else ""

    def _close_response(self) -> None:
        if self._response is not None:
            try:
                self._response.close()
            except ConnectionFailure:
                pass  # it already failed; closing is best effort
            self._response = None

    def close(self) -> None:
        self._close_response()


def parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/200`` -> (100, 200); ``bytes 100-199/*`` -> (100, None)."""
    try:
        unit, _, spec = (value or "").strip().partition(" ")
        span, _, total = spec.partition("/")
        first = span.partition("-")[0]
        if unit.lower() != "bytes" or not first.isdigit():
            return None, None
        return int(first), (int(total) if total.isdigit() else None)
    except ValueError:
        return None, None
