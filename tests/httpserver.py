"""A threaded HTTP server on 127.0.0.1 that misbehaves on request, for import-by-URL tests.

Each path serves a :class:`Resource` whose fields choose a behaviour: an error
status, a redirect, no Range support, a connection dropped (cleanly or with a
reset) or stalled part-way, a resume from the wrong offset, a file that changes
between requests, a body that never ends, a trickle, one byte per connection.
Every request is recorded so tests can assert what the client
asked for (e.g. ``Range: bytes=N-``). Unknown paths answer 404.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Resource:
    body: bytes = b""
    status: int = 200                   # anything but 200: send_error(status)
    location: str | None = None         # answer 302 with this Location
    ranges: bool = True                 # honour "Range: bytes=N-"
    etag: str | None = '"v1"'
    last_modified: str | None = None
    drop_after: int | None = None       # full responses: send this many body bytes, then close
    drops: int = 1                      # ... for this many responses
    reset: bool = False                 # drop with a TCP reset instead of a clean close
    stall_after: int | None = None      # the first full response stops sending after this many
    resume_body: bool = True            # False: 206 headers, then close without a body byte
    range_shift: int = 0                # 206 from a start this many bytes off the one asked
    changed: Resource | None = None     # served (as a new version) to Range requests
    endless: bytes | None = None        # after body, send this again and again (no length)
    trickle: float | None = None        # the first full response sends a byte every this many s
    trickle_bytes: int = 40             # ... this many of them, then drops the connection
    per_connection: int | None = None   # every response sends this many bytes, then closes


@dataclass
class Seen:
    path: str
    headers: dict[str, str]

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class HttpServer:
    host: str = "127.0.0.1"
    port: int = 0
    resources: dict[str, Resource] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)  # ends stalls
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def serve(self, path: str, body: bytes = b"", **behaviour: object) -> str:
        self.resources[path] = Resource(body=body, **behaviour)  # type: ignore[arg-type]
        return self.url(path)

    def requests(self, path: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path == path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output clean

    def do_GET(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        with state.lock:
            state.seen.append(Seen(path, {k.lower(): v for k, v in self.headers.items()}))
            resource = state.resources.get(path)
        if resource is None:
            self.send_error(404)
            return
        if resource.location is not None:
            self.send_response(302)
            self.send_header("Location", resource.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if resource.status != 200:
            self.send_error(resource.status)
            return
        start = self._range_start(resource)
        if start is not None and resource.changed is not None:
            self._send_full(resource.changed, allow_faults=False)
        elif start is not None:
            self._send_partial(resource, start)
        else:
            self._send_full(resource, allow_faults=True)

    def _range_start(self, resource: Resource) -> int | None:
        value = self.headers.get("Range", "")
        if not resource.ranges or not value.startswith("bytes=") or not value.endswith("-"):
            return None
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range not in (resource.etag, resource.last_modified):
            return None  # RFC 9110: a changed validator means "send the whole new file"
        return int(value[len("bytes="):-1])

    def _headers(self, resource: Resource, status: int, length: int | None) -> None:
        self.send_response(status)
        if length is not None:
            self.send_header("Content-Length", str(length))
        if resource.etag:
            self.send_header("ETag", resource.etag)
        if resource.last_modified:
            self.send_header("Last-Modified", resource.last_modified)
        if resource.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.send_header("Connection", "close")

    def _send_full(self, resource: Resource, *, allow_faults: bool) -> None:
        body = resource.body
        if resource.endless is not None:
            self._send_endless(resource)
            return
        self._headers(resource, 200, len(body))
        self.end_headers()
        if resource.per_connection is not None:
            self._write(body[:resource.per_connection])
            self._drop(reset=False)
            return
        with self.server.state.lock:
            trickle, resource.trickle = resource.trickle, None
        if trickle is not None and allow_faults:
            self._send_trickle(body[:resource.trickle_bytes], trickle)
            return
        drop_at = stall_at = None
        with self.server.state.lock:  # faults happen once (or `drops` times), then it behaves
            if allow_faults and resource.drop_after is not None and resource.drops > 0:
                resource.drops -= 1
                drop_at = resource.drop_after
            elif allow_faults and resource.stall_after is not None:
                stall_at, resource.stall_after = resource.stall_after, None
        if drop_at is not None:
            self._write(body[:drop_at])
            self._drop(resource.reset)
        elif stall_at is not None:
            self._write(body[:stall_at])
            self.server.state.release.wait()  # until the test ends; the client times out first
            self._drop(reset=False)
        else:
            self._write(body)

    def _send_endless(self, resource: Resource) -> None:
        """No Content-Length: the body ends when the connection does, which it never does
        from this side (until the test ends)."""
        assert resource.endless is not None
        self._headers(resource, 200, None)
        self.end_headers()
        sent = self._write(resource.body)
        while sent and not self.server.state.release.is_set():
            sent = self._write(resource.endless)

    def _send_trickle(self, data: bytes, interval: float) -> None:
        """A byte every *interval* seconds: never slow enough for a read timeout."""
        for offset in range(len(data)):
            if self.server.state.release.wait(interval) or not self._write(data[offset:offset + 1]):
                return
        self._drop(reset=False)

    def _send_partial(self, resource: Resource, asked: int) -> None:
        start = max(0, asked + resource.range_shift)
        body = resource.body
        self._headers(resource, 206, len(body) - start)
        self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if resource.per_connection is not None:
            self._write(body[start:start + resource.per_connection])
            self._drop(reset=False)
        elif resource.resume_body:
            self._write(body[start:])
        else:
            self._drop(reset=False)

    def _write(self, data: bytes) -> bool:
        """Send *data*; False if the client went away (that is its business)."""
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            return False
        return True

    def _drop(self, reset: bool) -> None:
        self.close_connection = True
        try:
            if reset:  # SO_LINGER 0: close() sends RST, not FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.connection.close()
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HttpServer


@contextmanager
def running() -> Iterator[HttpServer]:
    """A server on 127.0.0.1 and a free port, stopped (stalls released) on exit."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = HttpServer(port=server.server_address[1])
    # A short poll interval: shutdown() waits for it, at every test's teardown.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              name="test-http", daemon=True)
    thread.start()
    try:
        yield server.state
    finally:
        server.state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
