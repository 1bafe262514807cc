"""The distribution HTTP API v2, over http.client: the calls bbsnap needs and nothing else.

Why not a library: what pushing VM disks needs is what the Python OCI clients lack
(README, *Registries*): uploads in chunks that resume from the offset the registry
reports after a cut connection or a killed process, cross-repository mounts, blob reads
that resume with ``Range``, are bounded by the size the manifest gives and hashed as they
stream, and a registry treated as hostile (bounded answers, no redirect to plain HTTP,
credentials never sent to another host).

One persistent connection per client; a dropped connection is opened again. Basic and
Bearer (token server) challenges are answered from auth.lookup's credentials.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from typing import Protocol

from bbsnap import __version__
from bbsnap.errors import (BbsnapError, HostileImageError, NotFoundError, RegistryAuthError,
                           RegistryError)
from bbsnap.lazy_dataclass import dataclass
from bbsnap.registry import auth
from bbsnap.registry.reference import Reference

MAX_SMALL_BODY = 4 << 20        # manifests, configs, token and error answers
MAX_REDIRECTS = 5
RETRY_DELAYS = (0.0, 0.5, 1.0, 2.0, 4.0)   # attempts after a dropped connection
DEFAULT_CHUNK = 32 << 20
ConnectionFailure = (OSError, http.client.HTTPException)


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


class Endpoint:
    """Where requests for one registry go: scheme, host, port, proxy."""

    def __init__(self, scheme: str, host: str, port: int | None, timeout: float) -> None:
        self.scheme, self.host, self.timeout = scheme, host, timeout
        self.port = port or (443 if scheme == "https" else 80)

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def connect(self) -> tuple[http.client.HTTPConnection, bool]:
        """A new connection, and whether requests on it name the absolute URL (a plain
        HTTP proxy). Proxies as for URL import: ``https_proxy``/``http_proxy``/``no_proxy``."""
        proxies = urllib.request.getproxies_environment()
        proxy = proxies.get(self.scheme)
        if proxy and urllib.request.proxy_bypass(self.host):
            proxy = None
        context = ssl.create_default_context() if self.scheme == "https" else None
        if proxy:
            parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if self.scheme == "https":
                conn = http.client.HTTPSConnection(parts.hostname or "", parts.port or 80,
                                                   timeout=self.timeout, context=context)
                conn.set_tunnel(self.host, self.port)
                return conn, False
            return http.client.HTTPConnection(parts.hostname or "", parts.port or 80,
                                              timeout=self.timeout), True
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=context), False
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout), False


class RegistryClient:
    """Requests to one registry for one operation (its token covers *scopes*)."""

    def __init__(self, ref: Reference, *, insecure: bool = False, timeout: float = 30.0,
                 scopes: Iterable[str] = (), chunk_size: int = DEFAULT_CHUNK) -> None:
        self.ref = ref
        # HTTPS always, except with --insecure; a registry on this machine may speak plain
        # HTTP (test and development registries): TLS is tried first, and a server that
        # answers the handshake with something else is spoken to in plain HTTP (as docker
        # does for localhost). A certificate that does not verify is never a reason to.
        scheme = "http" if insecure else "https"
        self._may_be_plain = ref.loopback and not insecure
        host = ref.hostname if ref.api_host == ref.host else ref.api_host
        self.endpoint = Endpoint(scheme, host, ref.port, timeout)
        self.scopes = list(scopes) or [f"repository:{ref.repository}:pull"]
        self.chunk_size = chunk_size
        self.bytes_sent = 0       # request bodies, retries included (what was uploaded)
        self.bytes_received = 0   # blob bodies
        self._conn: http.client.HTTPConnection | None = None
        self._absolute = False
        self._authorization: str | None = None
        self._credentials: auth.Credentials | None = None
        self._looked_up = False

    def use_credentials(self, credentials: auth.Credentials) -> None:
        """Answer challenges with *credentials* instead of the stored ones (login)."""
        self._credentials, self._looked_up = credentials, True

    # -- plumbing ---------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"{self.endpoint.scheme}://{self.endpoint.netloc}{path}"

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn, self._absolute = self.endpoint.connect()
            if self._may_be_plain and not self._absolute:
                self._probe_tls()
        return self._conn

    def _probe_tls(self) -> None:
        """Settle a loopback registry's scheme on the first connection."""
        assert self._conn is not None
        try:
            self._conn.connect()
        except ssl.SSLCertVerificationError:
            self.close()
            raise
        except (ssl.SSLError, ConnectionResetError):
            self._conn.close()
            self.endpoint.scheme, self.endpoint.port = "http", self.ref.port or 80
            self._conn, self._absolute = self.endpoint.connect()
        except BaseException:
            self.close()
            raise
        self._may_be_plain = False

    def _target(self, path: str) -> str:
        return self.url(path) if self._absolute else path

    def _send(self, method: str, path: str, headers: dict[str, str],
              body: bytes | Readable | None, length: int) -> http.client.HTTPResponse:
        conn = self._connection()
        all_headers = {"User-Agent": f"bbsnap/{__version__}", "Accept-Encoding": "identity",
                       **headers}
        if self._authorization:
            all_headers["Authorization"] = self._authorization
        if body is not None or method in ("PUT", "PATCH", "POST"):
            all_headers["Content-Length"] = str(length)
        try:
            conn.putrequest(method, self._target(path), skip_accept_encoding=True)
            for name, value in all_headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            if isinstance(body, bytes):
                conn.send(body)
                self.bytes_sent += len(body)
            elif body is not None:
                self._send_stream(conn, body, length)
            return conn.getresponse()
        except BaseException:
            self.close()
            raise

    def _send_stream(self, conn: http.client.HTTPConnection, body: Readable, length: int) -> None:
        left = length
        while left:
            chunk = body.read(min(left, 1 << 20))
            if not chunk:
                raise RegistryError("the local file ended before the bytes to upload did")
            conn.send(chunk)
            self.bytes_sent += len(chunk)
            left -= len(chunk)

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                body: Callable[[], bytes | Readable] | None = None, length: int = 0,
                ok: tuple[int, ...] = (200,), limit: int = MAX_SMALL_BODY,
                stream: bool = False) -> Response | http.client.HTTPResponse:
        """*method* *path*; answers a 401 challenge once and sends again. *body* makes the
        body afresh for each attempt. Statuses outside *ok* raise (404: NotFoundError)."""
        for attempt in range(2):
            response = self._send(method, path, headers or {},
                                  body() if body is not None else None, length)
            if response.status == 401 and attempt == 0:
                challenge = auth.parse_challenge(response.getheader("WWW-Authenticate"))
                _drain(response, 64 << 10)
                self._answer(challenge)
                continue
            break
        if response.status not in ok:
            raise self._failure(method, path, response)
        if stream:
            return response
        data = _read_limited(response, limit, what=f"the answer to {method} {path}")
        return Response(response.status, response.headers, data)

    def _failure(self, method: str, path: str, response: http.client.HTTPResponse) -> BbsnapError:
        status = response.status
        detail = _error_detail(_drain(response, 64 << 10))
        self.close()
        where = f"{self.ref.host}/{self.ref.repository}"
        if status == 401:
            return RegistryAuthError(f"{where}: the registry refused the credentials{detail}",
                                     hint=f"bbsnap registry login {self.ref.host}")
        if status == 403:
            return RegistryAuthError(f"{where}: access denied{detail}",
                                     hint="check the account's rights on that repository")
        if status == 404:
            return NotFoundError(f"{where}: not found ({method} {_short(path)}){detail}")
        return RegistryError(f"{where}: {method} {_short(path)} failed with HTTP {status}{detail}")

    def _answer(self, challenge: auth.Challenge | None) -> None:
        if not self._looked_up:
            self._credentials = auth.lookup(self.ref.host)
            self._looked_up = True
        if challenge is None:
            raise RegistryAuthError(f"{self.ref.host} wants authentication but says not how")
        if challenge.scheme == "basic":
            if self._credentials is None:
                raise RegistryAuthError(f"{self.ref.host} needs a user name and password",
                                        hint=f"bbsnap registry login {self.ref.host}")
            self._authorization = self._credentials.basic()
            return
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise RegistryAuthError(f"{self.ref.host} asks for an authentication scheme "
                                    f"bbsnap does not speak ({challenge.scheme})")
        self._authorization = "Bearer " + self._token(challenge.params)

    def _token(self, params: dict[str, str]) -> str:
        realm = urllib.parse.urlsplit(params["realm"])
        loopback = Reference(realm.netloc or "x", "x").loopback if realm.hostname else False
        if realm.scheme != "https" and not (realm.scheme == "http" and
                                            (loopback or self.endpoint.scheme == "http")):
            raise RegistryAuthError(f"{self.ref.host} sends for tokens to {params['realm']!r}, "
                                    "which is not an HTTPS address; credentials are not sent")
        query = [("scope", s) for s in self.scopes]
        if "service" in params:
            query.insert(0, ("service", params["service"]))
        path = (realm.path or "/") + "?" + urllib.parse.urlencode(query)
        if realm.query:
            path += "&" + realm.query
        endpoint = Endpoint(realm.scheme, realm.hostname or "", realm.port,
                            self.endpoint.timeout)
        conn, absolute = endpoint.connect()
        headers = {"User-Agent": f"bbsnap/{__version__}"}
        if self._credentials is not None:
            headers["Authorization"] = self._credentials.basic()
        try:
            conn.request("GET", f"{endpoint.scheme}://{endpoint.netloc}{path}" if absolute
                         else path, headers=headers)
            response = conn.getresponse()
            data = _read_limited(response, 1 << 20, what="the token answer")
        except ConnectionFailure as exc:
            raise RegistryError(f"the token server {endpoint.netloc} could not be reached: "
                                f"{exc}") from None
        finally:
            conn.close()
        if response.status in (401, 403):
            raise RegistryAuthError(f"{self.ref.host}: the token server refused the "
                                    "credentials", hint=f"bbsnap registry login {self.ref.host}")
        if response.status != 200:
            raise RegistryError(f"the token server answered HTTP {response.status}")
        try:
            answer = json.loads(data)
            token = answer.get("token") or answer.get("access_token")
        except (json.JSONDecodeError, AttributeError):
            token = None
        if not isinstance(token, str) or not token or not token.isascii() or \
                any(ch in token for ch in "\r\n"):
            raise RegistryError("the token server answered without a usable token")
        return token

    def retrying(self, what: str, action: Callable[[], object]) -> object:
        """Run *action* again after dropped connections (RETRY_DELAYS), then give up."""
        for delay in (*RETRY_DELAYS, None):
            try:
                return action()
            except ConnectionFailure as exc:
                self.close()
                if delay is None:
                    raise RegistryError(f"{self.ref.host}: {what} failed: "
                                        f"{_describe(exc)}") from None
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- the API ----------------------------------------------------------------------------

    def _repo(self, repository: str | None = None) -> str:
        return f"/v2/{repository or self.ref.repository}"

    def check(self) -> None:
        """The registry answers the API and accepts us (login)."""
        self.retrying("the API check", lambda: self.request("GET", "/v2/"))

    def has_blob(self, digest: str) -> bool:
        def head() -> bool:
            response = self.request("HEAD", f"{self._repo()}/blobs/{digest}", ok=(200, 404),
                                    limit=0)
            assert isinstance(response, Response)
            return response.status == 200
        return bool(self.retrying("a blob check", head))

    def get_manifest(self, reference: str, accept: Iterable[str]) -> tuple[str, bytes, str]:
        """(media type, bytes, sha256 digest) of a manifest; bounded at 4 MiB."""
        def get() -> Response:
            response = self.request("GET", f"{self._repo()}/manifests/{reference}",
                                    headers={"Accept": ", ".join(accept)})
            assert isinstance(response, Response)
            return response
        response = self.retrying("reading the manifest", get)
        assert isinstance(response, Response)
        media = (response.headers.get("Content-Type") or "").split(";")[0].strip()
        digest = "sha256:" + hashlib.sha256(response.body).hexdigest()
        return media, response.body, digest

    def put_manifest(self, reference: str, media_type: str, data: bytes) -> str:
        def put() -> Response:
            response = self.request("PUT", f"{self._repo()}/manifests/{reference}",
                                    headers={"Content-Type": media_type}, body=lambda: data,
                                    length=len(data), ok=(201, 200))
            assert isinstance(response, Response)
            return response
        self.retrying("writing the manifest", put)
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def mount(self, digest: str, source_repository: str) -> bool:
        """Ask for *digest* from another repository of this registry; whether it came.
        A registry that cannot mount answers with an upload session: it is cancelled."""
        query = urllib.parse.urlencode({"mount": digest, "from": source_repository})

        def post() -> Response:
            response = self.request("POST", f"{self._repo()}/blobs/uploads/?{query}",
                                    body=lambda: b"", ok=(201, 202))
            assert isinstance(response, Response)
            return response
        response = self.retrying("a blob mount", post)
        assert isinstance(response, Response)
        if response.status == 201:
            return True
        location = response.headers.get("Location")
        if location:
            try:
                self.request("DELETE", self.upload_path(location), ok=(204, 200, 404))
            except (BbsnapError, *ConnectionFailure):
                self.close()  # an abandoned session expires on the registry anyway
        return False

    def upload_path(self, location: str) -> str:
        """A Location the registry gave, as a path on this endpoint; elsewhere is refused."""
        parts = urllib.parse.urlsplit(location)
        if parts.scheme or parts.netloc:
            if (parts.scheme, parts.netloc) != (self.endpoint.scheme, self.endpoint.netloc):
                raise RegistryError(f"{self.ref.host} sends the upload to another address "
                                    f"({parts.scheme}://{parts.netloc}); refused")
        if not parts.path.startswith("/v2/"):
            raise RegistryError(f"{self.ref.host} gave an upload address outside its API")
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def start_upload(self) -> str:
        def post() -> Response:
            response = self.request("POST", f"{self._repo()}/blobs/uploads/",
                                    body=lambda: b"", ok=(202,))
            assert isinstance(response, Response)
            return response
        response = self.retrying("starting an upload", post)
        assert isinstance(response, Response)
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"{self.ref.host} started an upload without a Location")
        return self.upload_path(location)

    def upload_offset(self, location: str) -> int | None:
        """Bytes the registry holds of the upload at *location*; None if it is gone."""
        try:
            response = self.request("GET", location, ok=(204, 200))
        except NotFoundError:
            return None
        except RegistryError:
            return None  # an upload the registry gave up on (distribution answers 400/416)
        assert isinstance(response, Response)
        return _range_end(response.headers.get("Range")) + 1

    def patch(self, location: str, opener: Callable[[int], Readable], offset: int,
              length: int) -> tuple[str, int]:
        """Send *length* bytes from *offset*; (next location, bytes the registry now holds)."""
        def body() -> Readable:
            return opener(offset)
        response = self.request("PATCH", location, body=body, length=length,
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Range": f"{offset}-{offset + length - 1}"},
                                ok=(202, 204))
        assert isinstance(response, Response)
        next_location = self.upload_path(response.headers.get("Location") or location)
        held = response.headers.get("Range")
        return next_location, (_range_end(held) + 1 if held else offset + length)

    def finish_upload(self, location: str, digest: str) -> None:
        glue = "&" if "?" in location else "?"
        response = self.request("PUT", f"{location}{glue}digest={digest}", body=lambda: b"",
                                ok=(201, 204))
        assert isinstance(response, Response)
        stored = response.headers.get("Docker-Content-Digest")
        if stored and stored != digest:
            raise RegistryError(f"{self.ref.host} stored the blob as {stored}, not {digest}")

    def blob_response(self, digest: str, start: int) -> http.client.HTTPResponse:
        """The blob's body from byte *start* (redirects followed; 206 checked by the caller)."""
        headers = {"Range": f"bytes={start}-"} if start else {}
        response = self.request("GET", f"{self._repo()}/blobs/{digest}", headers=headers,
                                ok=(200, 206, 307, 302, 303, 301, 308), stream=True)
        assert isinstance(response, http.client.HTTPResponse)
        for _ in range(MAX_REDIRECTS):
            if response.status not in (301, 302, 303, 307, 308):
                return response
            location = response.getheader("Location") or ""
            _drain(response, 64 << 10)
            self.close()  # the next request of this client opens a fresh connection
            response = self._redirected(location, headers)
        raise RegistryError(f"{self.ref.host}: the blob {digest} redirects too often")

    def _redirected(self, location: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        target = urllib.parse.urlsplit(urllib.parse.urljoin(self.url("/"), location))
        if target.scheme not in ("http", "https") or not target.hostname:
            raise RegistryError(f"{self.ref.host} redirects a blob to {location!r}; refused")
        if target.scheme == "http" and self.endpoint.scheme == "https":
            raise RegistryError(f"{self.ref.host} redirects a blob from HTTPS to plain HTTP; "
                                "refused")
        endpoint = Endpoint(target.scheme, target.hostname, target.port, self.endpoint.timeout)
        conn, absolute = endpoint.connect()
        path = target.path + (f"?{target.query}" if target.query else "")
        send = dict(headers)
        # The registry's credentials go to the registry only (storage URLs are pre-signed).
        if endpoint.netloc == self.endpoint.netloc and self._authorization:
            send["Authorization"] = self._authorization
        conn.request("GET", f"{target.scheme}://{endpoint.netloc}{path}" if absolute else path,
                     headers={"User-Agent": f"bbsnap/{__version__}",
                              "Accept-Encoding": "identity", **send})
        return conn.getresponse()


class BlobReader:
    """A blob's bytes, read as they stream: never more than *size*, resumed with ``Range``
    after a dropped connection, and the digest checked when the last byte arrives (unless
    *verify* is off: for a consumer that hashes every byte itself, transfer.copy_decompressed
    with its expected digest; one SHA-256 pass over a 1 GiB layer is ~1-2 s here)."""

    def __init__(self, client: RegistryClient, digest: str, size: int, *,
                 verify: bool = True) -> None:
        self._client, self._digest, self._size = client, digest, size
        self._hash = hashlib.sha256() if verify else None
        self._position = 0
        self._response: http.client.HTTPResponse | None = None
        self._failures = 0

    @property
    def position(self) -> int:
        return self._position

    def read(self, size: int = 1 << 20) -> bytes:
        if self._position >= self._size:
            self._finish()
            return b""
        want = min(size, self._size - self._position)
        while True:
            try:
                if self._response is None:
                    self._response = self._open()
                data = self._response.read(want)
                if not data:
                    raise http.client.IncompleteRead(b"")
                break
            except ConnectionFailure as exc:
                self._drop()
                if isinstance(exc, socket.timeout) and self._failures >= len(RETRY_DELAYS):
                    raise RegistryError(f"{self._client.ref.host}: the blob {self._digest} "
                                        "stopped arriving") from None
                self._backoff(exc)
        self._position += len(data)
        self._client.bytes_received += len(data)
        if self._hash is not None:
            self._hash.update(data)
        if self._position >= self._size:
            self._finish()
        return data

    def _open(self) -> http.client.HTTPResponse:
        response = self._client.blob_response(self._digest, self._position)
        if self._position and response.status != 206:
            response.close()
            raise HostileImageError(f"{self._client.ref.host} ignored the Range request for "
                                    f"{self._digest} (HTTP {response.status}); try again")
        if response.status == 206:
            start, _end = _content_range(response.getheader("Content-Range"))
            if start != self._position:
                response.close()
                raise HostileImageError(f"{self._client.ref.host} resumed {self._digest} at "
                                        f"byte {start}, not {self._position}")
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and \
                int(length) > self._size - self._position:
            response.close()
            raise HostileImageError(
                f"{self._client.ref.host} serves {self._digest} with more bytes than the "
                f"{self._size} its manifest says; refused")
        return response

    def _backoff(self, exc: BaseException) -> None:
        if self._failures >= len(RETRY_DELAYS):
            raise RegistryError(f"{self._client.ref.host}: reading {self._digest} failed "
                                f"after {self._failures} retries: {_describe(exc)}") from None
        time.sleep(RETRY_DELAYS[self._failures])
        self._failures += 1

    def _drop(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None
        self._client.close()

    def _finish(self) -> None:
        if self._response is not None:
            extra = self._response.read(1)
            self._drop()
            if extra:
                raise HostileImageError(f"{self._client.ref.host} sends more of {self._digest} "
                                        f"than the {self._size} bytes its manifest says; refused")
        if self._hash is None:
            return
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._digest:
            raise HostileImageError(f"the blob {self._digest} from {self._client.ref.host} "
                                    f"has the digest {actual}; refused, nothing was registered")

    def close(self) -> None:
        self._drop()


def read_small_blob(client: RegistryClient, digest: str, size: int, limit: int) -> bytes:
    if size > limit:
        raise HostileImageError(f"the blob {digest} claims {size} bytes, over the {limit} "
                                "allowed for it")
    reader = BlobReader(client, digest, size)
    parts: list[bytes] = []
    while True:
        data = reader.read()
        if not data:
            return b"".join(parts)
        parts.append(data)


def _range_end(value: str | None) -> int:
    """The last byte of ``Range: 0-N`` (distribution writes ``0--1`` for nothing held)."""
    if not value:
        return -1
    try:
        return int(value.strip().removeprefix("bytes=").split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    try:
        span = (value or "").split()[1].split("/")[0]
        start, end = span.split("-")
        return int(start), int(end)
    except (IndexError, ValueError):
        return None, None


def _read_limited(response: http.client.HTTPResponse, limit: int, *, what: str) -> bytes:
    data = response.read(limit + 1) if limit else b""
    if len(data) > limit:
        response.close()
        raise HostileImageError(f"{what} is over {limit} bytes; refused")
    if not limit:
        response.read()
    return data


def _drain(response: http.client.HTTPResponse, limit: int) -> bytes:
    try:
        data = response.read(limit)
        if not response.isclosed():
            response.close()
        return data
    except ConnectionFailure:
        return b""


def _error_detail(body: bytes) -> str:
    """The registry's first error message, short and on one line."""
    try:
        errors = json.loads(body).get("errors") or []
        message = errors[0].get("message") or errors[0].get("code")
    except (json.JSONDecodeError, AttributeError, IndexError, TypeError, UnicodeDecodeError):
        return ""
    if not isinstance(message, str):
        return ""
    return ": " + " ".join(message.split())[:200]


def _short(path: str) -> str:
    return path.split("?", 1)[0]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.timeout):
        return "timed out"
    return str(exc) or type(exc).__name__
