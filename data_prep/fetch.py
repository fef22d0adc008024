"""URL downloads with a total deadline, retries with back-off, a user agent and a size limit, over
keep-alive connections (direct: data_prep/http1.py; through a proxy: urllib3, data_prep/http_pool.py).
Every failure becomes `RowRejected` with a reason such as `http_404` or `timeout`; an image whose server
opts out of our use (`X-Robots-Tag: noai`, data_prep/opt_out.py) becomes `opt_out`."""
from __future__ import annotations

import functools
import socket
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urljoin

import urllib3
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, MaxRetryError, NameResolutionError,
                                NewConnectionError, ProtocolError, ReadTimeoutError)
from urllib3.util import Retry, Timeout, parse_url

from data_prep import __version__
from data_prep import http1
from data_prep.http_pool import proxy_manager_for
from data_prep.images import RowRejected
from data_prep.opt_out import DEFAULT_DISALLOWED_DIRECTIVES, HEADER, disallowing_directive, robots_tokens

_CHUNK_BYTES = 1 << 18
"""At most this much per read of a body (http.client reads no more than the Content-Length left): most
images come in one or two reads, each a socket call and a hand-off of the GIL."""
_DRAIN_LIMIT_BYTES = 1 << 16
"""An unwanted body (an error page, an opted-out image) up to this size is read and dropped so that
its connection can be reused; a longer one closes the connection instead."""
_MAX_REDIRECTS = 10  # urllib's limit
# urllib3 (proxied requests) retries nothing: every failure comes straight back to fetch_url, which retries with back-off
# (no double retries). Redirects are followed by _open; too many return the last 3xx answer (http_3xx).
_RETRIES = Retry(total=None, connect=0, read=0, status=0, other=0, redirect=0,
                 raise_on_redirect=False, raise_on_status=False, respect_retry_after_header=False)


@dataclass(frozen=True)
class FetchOptions:
    timeout_seconds: float = 10.0
    """Deadline for one attempt: connect plus the whole body."""
    num_retries: int = 2
    """Extra attempts after a transient failure (timeout, refused connection, HTTP 5xx or 429)."""
    backoff_seconds: float = 0.5
    """Wait before retry n is backoff_seconds * 2**(n-1)."""
    max_bytes: int = 50 * 1024 * 1024
    """Bodies larger than this are rejected as too_large without reading them to the end."""
    user_agent: str = f"data-prep/{__version__} (+https://github.com/resclip-pipeline)"
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DISALLOWED_DIRECTIVES
    """X-Robots-Tag directives (for every robot, or addressed to us) that drop a row as opt_out; () reads none."""


def fetch_url(url: str, options: FetchOptions) -> bytes:
    """Download `url`, retrying transient failures; raise RowRejected with the last reason."""
    if not url.lower().startswith(("http://", "https://")):
        raise RowRejected("invalid_url", url[:200])
    attempt = 0
    stale_retried = False
    while True:
        try:
            return _fetch_once(url, options)
        except _Transient as exc:
            if exc.aborted and not stale_retried:
                # Most likely a kept-alive connection the server closed as we sent on it (urllib3
                # throws out connections closed while idle, not this race): once more at once, on a
                # new connection, not counted as a failure.
                stale_retried = True
                continue
            if attempt >= options.num_retries:
                raise RowRejected(exc.reason, exc.detail) from None
            time.sleep(options.backoff_seconds * (2 ** attempt))
            attempt += 1
            stale_retried = False


class _Transient(Exception):
    def __init__(self, reason: str, detail: str, aborted: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.aborted = aborted  # the connection closed before any answer to the request


def _fetch_once(url: str, options: FetchOptions) -> bytes:
    deadline = time.monotonic() + options.timeout_seconds
    response = _open(url, options, deadline)
    try:
        return _accept(response, deadline, options)
    except (HTTPError, OSError, http1.ProtocolError) as exc:  # while reading the body
        response.close()
        raise _Transient(*_transient_reason(exc, options)) from None
    finally:
        response.finish()


class _Answer(Protocol):
    """What _accept reads of an answer: http1.Response, or _ProxiedAnswer around urllib3's."""

    status: int
    reason: str

    def header_values(self, name: str) -> list[str]: ...
    def header(self, name: str) -> str | None: ...
    def settimeout(self, seconds: float) -> None: ...
    def read1(self) -> bytes: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...


def _open(url: str, options: FetchOptions, deadline: float) -> _Answer:
    """The answer to GET `url` after at most _MAX_REDIRECTS redirects (the last 3xx after more).

    A direct request goes to data_prep/http1.py, a proxied one to urllib3's ProxyManager: urllib3's
    layers and http.client's header parsing were ~0.3 ms of a worker's ~3.5 ms per image
    (RESULTS.md, issue 16)."""
    for redirects in range(_MAX_REDIRECTS + 1):
        manager = proxy_manager_for(url)
        response = _open_direct(url, options, deadline) if manager is None else _open_proxied(
            manager, url, options)
        location = response.header("location") if response.status in _REDIRECT_STATUSES else None
        if not location or redirects == _MAX_REDIRECTS:
            return response
        _discard(response, deadline)
        response.finish()
        url = urljoin(url, location)
    raise AssertionError("unreachable")


_REDIRECT_STATUSES = (301, 302, 303, 307, 308)  # urllib3's


def _open_direct(url: str, options: FetchOptions, deadline: float) -> http1.Response:
    try:  # urllib3's parser: it percent-encodes what may not be sent as it is (spaces, non-ASCII), as before
        parsed = parse_url(url)
    except ValueError as exc:
        raise RowRejected("invalid_url", str(exc)[:200]) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise RowRejected("invalid_url", url[:200])
    host = parsed.host.strip("[]")  # an IPv6 literal
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        return http1.get(parsed.scheme, host, port, parsed.request_uri, options.user_agent,
                         max(deadline - time.monotonic(), 0.001))
    except socket.gaierror as exc:
        raise RowRejected("dns_error", f"{host}: {exc}"[:200]) from None
    except (OSError, http1.ProtocolError) as exc:  # before ValueError: a certificate error is both
        aborted = isinstance(exc, (http1.ClosedWithoutAnswer, ConnectionResetError, BrokenPipeError))
        reason, detail = _transient_reason(exc, options)
        if reason == "connection_error":  # which server, as urllib3's texts said (a redirect may change it)
            detail = f"{host}:{port}: {detail}"[:300]
        raise _Transient(reason, detail, aborted=aborted) from None
    except ValueError as exc:  # a bad port, a URL http.client would not send
        raise RowRejected("invalid_url", str(exc)[:200]) from None


def _open_proxied(manager: urllib3.ProxyManager, url: str, options: FetchOptions) -> _ProxiedAnswer:
    headers, timeout = _request_settings(options.user_agent, options.timeout_seconds)
    try:
        return _ProxiedAnswer(manager.urlopen("GET", url, redirect=False, headers=headers, timeout=timeout,
                                              retries=_RETRIES, preload_content=False, decode_content=False))
    except MaxRetryError as exc:
        raise _rejection(exc.reason, options) from None
    except ValueError as exc:  # no host, a bad port (LocationValueError): caught before HTTPError, its other base
        raise RowRejected("invalid_url", str(exc)[:200]) from None
    except HTTPError as exc:
        raise _rejection(exc, options) from None


class _ProxiedAnswer:
    """urllib3's answer through a proxy, read as _Answer."""

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason or ""

    def header_values(self, name: str) -> list[str]:
        return self._response.headers.getlist(name)

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    def settimeout(self, seconds: float) -> None:
        connection = self._response.connection
        if connection is not None and connection.sock is not None:
            connection.sock.settimeout(seconds)

    def read1(self) -> bytes:
        return self._response.read1(_CHUNK_BYTES)

    def finish(self) -> None:
        self._response.release_conn()

    def close(self) -> None:
        self._response.close()


@functools.lru_cache(maxsize=16)
def _request_settings(user_agent: str, timeout_seconds: float) -> tuple[dict[str, str], Timeout]:
    """The request's headers and urllib3 timeout (urllib3 copies both before changing them)."""
    return {"User-Agent": user_agent}, Timeout(total=timeout_seconds)


def _accept(response: _Answer, deadline: float, options: FetchOptions) -> bytes:
    if not 200 <= response.status < 300:
        reason = f"http_{response.status}"
        _discard(response, deadline)
        if response.status >= 500 or response.status == 429:
            raise _Transient(reason, response.reason)
        raise RowRejected(reason, response.reason)
    # Checked on the headers, before the body: an opted-out image is never downloaded.
    opted_out = disallowing_directive(response.header_values(HEADER.lower()), robots_tokens(options.user_agent),
                                      options.disallowed_header_directives)
    if opted_out:
        _discard(response, deadline)
        raise RowRejected("opt_out", opted_out)
    length = response.header("content-length")
    if length and length.isdigit() and int(length) > options.max_bytes:
        _discard(response, deadline)
        raise RowRejected("too_large", f"{length} bytes")
    return _read_body(response, deadline, options.max_bytes)


def _read_body(response: _Answer, deadline: float, max_bytes: int) -> bytes:
    # Each read waits at most until the deadline and returns what has arrived (read1), so a server that
    # drips one byte at a time cannot hold a worker past it.
    chunks: list[bytes] = []
    size = 0
    while True:
        _wait_at_most_until(response, deadline)
        chunk = response.read1()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            response.close()
            raise RowRejected("too_large", f"over {max_bytes} bytes")
        chunks.append(chunk)


def _wait_at_most_until(response: _Answer, deadline: float) -> None:
    remaining_seconds = deadline - time.monotonic()
    if remaining_seconds <= 0:
        response.close()
        raise _Transient("timeout", "body not received before the deadline")
    response.settimeout(remaining_seconds)


def _discard(response: _Answer, deadline: float) -> None:
    """Leave the connection reusable when the unwanted body is short, else close it."""
    length = response.header("content-length")
    try:
        if length and length.isdigit() and int(length) <= _DRAIN_LIMIT_BYTES:
            while True:
                _wait_at_most_until(response, deadline)
                if not response.read1():
                    return
    except (_Transient, HTTPError, OSError, http1.ProtocolError):  # past the deadline, cut short: the
        pass  # reason stays the answer's own
    response.close()


def _rejection(error: Exception | None, options: FetchOptions) -> Exception:
    """The RowRejected or _Transient for a proxied request's failure before any answer."""
    if isinstance(error, NameResolutionError):
        return RowRejected("dns_error", str(error)[:200])
    return _Transient(*_transient_reason(error, options), aborted=isinstance(error, ProtocolError))


def _transient_reason(error: Exception | None, options: FetchOptions) -> tuple[str, str]:
    if isinstance(error, (ReadTimeoutError, TimeoutError)) or (
            isinstance(error, ConnectTimeoutError) and not isinstance(error, NewConnectionError)):
        return "timeout", f"over {options.timeout_seconds} s"
    return "connection_error", f"{type(error).__name__}: {error}"[:300]
