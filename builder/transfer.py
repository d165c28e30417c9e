"""HTTP for registries: kept-alive connections per thread, bounded retries, redirects.

Standard library only (http.client): a registry client needs keep-alive, streaming
bodies both ways, per-request control of retries and no surprise header handling,
which http.client gives without a dependency. Retries cover what a registry or the
network does transiently: dropped or refused connections, 5xx, and 429 (waiting as
long as Retry-After says, within a cap). Exponential backoff, a fixed number of
attempts, then a PybuildError that says what was tried.
"""
from __future__ import annotations

import email.utils
import http.client
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from grammar.errors import PybuildError

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_BLOCK = 1 << 20


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: `attempts` in all, sleeping base_delay * 2**n (plus jitter), at most max_delay."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 20.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay)
        return min(self.base_delay * (2 ** attempt) * (1 + random.random() / 4), self.max_delay)


@dataclass(frozen=True)
class FileRange:
    """A request body read from part of a file, reopened on each attempt so a retry resends it."""

    path: Path
    offset: int
    length: int


class _RangeReader:
    """A file object limited to `length` bytes from `offset` (http.client streams it)."""

    def __init__(self, body: FileRange) -> None:
        self._f = open(body.path, "rb")
        self._f.seek(body.offset)
        self._left = body.length

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()


Body = bytes | FileRange | None


class Response:
    """A response: `data` holds the body unless it was asked for as a stream (then read() it)."""

    def __init__(self, status: int, headers: http.client.HTTPMessage, url: str, data: bytes | None,
                 raw: http.client.HTTPResponse | None = None, release: object = None) -> None:
        self.status = status
        self.headers = headers
        self.url = url
        self.data = data if data is not None else b""
        self._raw = raw
        self._release = release  # callable dropping the connection if the body was not read to its end

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)

    def read(self, n: int = _BLOCK) -> bytes:
        if self._raw is None:
            data, self.data = self.data[:n], self.data[n:]
            return data
        return self._raw.read(n)

    def close(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None and not raw.isclosed():
            raw.close()
            if callable(self._release):
                self._release()


def retry_after(headers: http.client.HTTPMessage) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), None if absent or unreadable."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def tls_context(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """The system trust store, plus a CA file when given (a private registry's certificate)."""
    ctx = ssl.create_default_context()
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=os.fspath(ca_file))
        except (OSError, ssl.SSLError) as e:
            raise PybuildError(f"cannot read the CA file {ca_file}: {e}; pass a PEM certificate file") from None
    return ctx


class HttpClient:
    """Keep-alive connections per (thread, host); safe to share between worker threads."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, retry: RetryPolicy | None = None,
                 timeout: float = 60.0) -> None:
        self.ssl_context = ssl_context or tls_context()
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._local = threading.local()
        self._all: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- connections

    def _conns(self) -> dict[tuple[str, str], http.client.HTTPConnection]:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def _conn(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        conns = self._conns()
        conn = conns.get((scheme, netloc))
        if conn is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(netloc, timeout=self.timeout, context=self.ssl_context,
                                                   blocksize=_BLOCK)
            elif scheme == "http":
                conn = http.client.HTTPConnection(netloc, timeout=self.timeout, blocksize=_BLOCK)
            else:
                raise PybuildError(f"unsupported URL scheme {scheme!r}: registries speak http or https")
            conns[(scheme, netloc)] = conn
            with self._lock:
                self._all.add(conn)
        return conn

    def _drop(self, scheme: str, netloc: str) -> None:
        conn = self._conns().pop((scheme, netloc), None)
        if conn is not None:
            conn.close()
            with self._lock:
                self._all.discard(conn)

    def close(self) -> None:
        with self._lock:
            conns, self._all = list(self._all), set()
        for conn in conns:
            conn.close()

    # ----------------------------------------------------------------- requests

    def request(self, method: str, url: str, *, headers: dict[str, str] | None = None, body: Body = None,
                stream: bool = False, max_body: int = 64 << 20, retry: bool = True) -> Response:
        """Send a request, following redirects for GET/HEAD and retrying transient failures.

        Any status is returned (the caller decides what it means) except that 429 and
        5xx are retried first. `stream` leaves the body to Response.read().
        """
        headers = dict(headers or {})
        attempts = self.retry.attempts if retry else 1
        last: str = ""
        for attempt in range(attempts):
            try:
                resp = self._follow(method, url, headers, body, stream, max_body)
            except ssl.SSLCertVerificationError as e:
                host = urllib.parse.urlsplit(url).netloc
                raise PybuildError(f"the TLS certificate of {host} is not trusted ({e.verify_message}); pass the "
                                   "registry's CA file, or list it as an insecure registry if it has no TLS") from None
            except ssl.SSLError as e:
                host = urllib.parse.urlsplit(url).netloc
                raise PybuildError(f"TLS with {host} failed ({e.reason or e}); if the registry speaks plain HTTP, "
                                   "list it as an insecure registry") from None
            except (OSError, http.client.HTTPException) as e:
                last = _describe(e)
                if attempt + 1 < attempts:
                    time.sleep(self.retry.delay(attempt))
                    continue
                host = urllib.parse.urlsplit(url).netloc
                raise PybuildError(f"cannot reach {host}: {last} ({attempts} attempts); check that the registry "
                                   "is running and reachable") from None
            if resp.status in RETRY_STATUSES and attempt + 1 < attempts:
                wait = self.retry.delay(attempt, retry_after(resp.headers) if resp.status in (429, 503) else None)
                resp.close()
                time.sleep(wait)
                continue
            return resp
        raise AssertionError("unreachable")

    def _follow(self, method: str, url: str, headers: dict[str, str], body: Body, stream: bool,
                max_body: int) -> Response:
        origin = urllib.parse.urlsplit(url).netloc
        for _ in range(6):
            resp = self._once(method, url, headers, body, stream, max_body)
            location = resp.header("Location")
            if resp.status not in _REDIRECTS or method not in ("GET", "HEAD") or not location:
                return resp
            resp.close()
            url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(url).netloc != origin:  # storage backends get no registry credentials
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise PybuildError(f"too many redirects fetching {url}; the registry is misconfigured")

    def _once(self, method: str, url: str, headers: dict[str, str], body: Body, stream: bool,
              max_body: int) -> Response:
        parts = urllib.parse.urlsplit(url)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn = self._conn(parts.scheme, parts.netloc)
        send: bytes | _RangeReader | None
        if isinstance(body, FileRange):
            send = _RangeReader(body)
            headers = {**headers, "Content-Length": str(body.length)}
        else:
            send = body
            if body is not None or method in ("PUT", "POST", "PATCH"):
                headers = {**headers, "Content-Length": str(len(body or b""))}
        try:
            conn.request(method, path, body=send, headers=headers)  # type: ignore[arg-type]
            raw = conn.getresponse()
            if stream and method != "HEAD":
                return Response(raw.status, raw.headers, url, None, raw,
                                lambda: self._drop(parts.scheme, parts.netloc))
            length = raw.getheader("Content-Length")
            if method != "HEAD" and length is not None and length.isdigit() and int(length) > max_body:
                raise PybuildError(f"{url} answered with {length} bytes, more than the {max_body} expected; "
                                   "the registry sent something else than asked for")
            data = raw.read(max_body + 1)
            bodyless = method == "HEAD" or raw.status in (204, 304)
            if not bodyless and length is not None and length.isdigit() and len(data) < int(length):
                raise http.client.IncompleteRead(data, int(length) - len(data))  # read(n) does not raise it
            if len(data) > max_body:
                raise PybuildError(f"{url} answered with more than {max_body} bytes; the registry sent "
                                   "something else than asked for")
            if not raw.isclosed():
                raw.read()  # let the connection be reused
            if raw.will_close:
                self._drop(parts.scheme, parts.netloc)
            return Response(raw.status, raw.headers, url, data)
        except BaseException:
            self._drop(parts.scheme, parts.netloc)
            raise
        finally:
            if isinstance(send, _RangeReader):
                send.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
        return "the connection was dropped"
    if isinstance(e, http.client.IncompleteRead):
        return "the connection was dropped in the middle of a response"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host name ({e.strerror})"
    return str(e) or type(e).__name__


def is_transient(e: BaseException) -> bool:
    """An error worth another attempt: the network, not the content."""
    return isinstance(e, (OSError, http.client.HTTPException)) and not isinstance(e, ssl.SSLError)


describe_error = _describe

__all__ = ["HttpClient", "Response", "RetryPolicy", "FileRange", "RETRY_STATUSES", "tls_context", "retry_after",
           "is_transient", "describe_error"]
