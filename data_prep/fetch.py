"""URL downloads with a total deadline, retries with back-off, a user agent and a size limit, over
keep-alive connections (direct: data_prep/http1.py; through a proxy: urllib3, data_prep/http_pool.py).
Every failure becomes `RowRejected` with a reason such as `http_404` or `timeout`; an image whose server
opts out of our use (`X-Robots-Tag: noai`, data_prep/opt_out.py) becomes `opt_out`."""
from __future__ import annotations

import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urljoin

from data_prep import __version__
from data_prep import http1
from data_prep.images import RowRejected
from data_prep.opt_out import DEFAULT_DISALLOWED_DIRECTIVES, HEADER, disallowing_directive, robots_tokens

_DRAIN_LIMIT_BYTES = 1 << 16
"""An unwanted body (an error page, an opted-out image) up to this size is read and dropped so that
its connection can be reused; a longer one closes the connection instead."""
_MAX_REDIRECTS = 10  # urllib's limit; too many return the last 3xx answer (http_3xx)


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
    except (OSError, http1.ProtocolError) as exc:  # while reading the body
        response.close()
        raise _Transient(*_transient_reason(exc, options)) from None
    finally:
        response.finish()


class _Answer(Protocol):
    """What _accept reads of an answer: http1.Response, or http_pool.ProxiedAnswer around urllib3's."""

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

    A direct request goes to data_prep/http1.py, a proxied one to urllib3 (data_prep/http_pool.py,
    imported only then): urllib3's layers and http.client's header parsing were ~0.25 ms of a worker's
    ~4 ms per image, and its import ~50 ms of the command's start (RESULTS.md, issue 16)."""
    for redirects in range(_MAX_REDIRECTS + 1):
        response = _open_proxied(url, options) if _may_use_proxy() else None
        if response is None:
            response = _open_direct(url, options, deadline)
        location = response.header("location") if response.status in _REDIRECT_STATUSES else None
        if not location or redirects == _MAX_REDIRECTS:
            return response
        _discard(response, deadline)
        response.finish()
        url = urljoin(url, location)
    raise AssertionError("unreachable")


_REDIRECT_STATUSES = (301, 302, 303, 307, 308)  # urllib3's
_PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")


def _may_use_proxy() -> bool:
    """urllib (whose rules data_prep/http_pool.py follows) takes proxies from these variables on Linux,
    and from system settings elsewhere too."""
    return sys.platform != "linux" or any(map(os.environ.get, _PROXY_VARIABLES))


def _open_direct(url: str, options: FetchOptions, deadline: float) -> http1.Response:
    scheme, host, port, target = _split_url(url)
    try:
        return http1.get(scheme, host, port, target, options.user_agent, max(deadline - time.monotonic(), 0.001))
    except socket.gaierror as exc:
        raise RowRejected("dns_error", f"{host}: {exc}"[:200]) from None
    except (OSError, http1.ProtocolError) as exc:  # before ValueError: a certificate error is both
        aborted = isinstance(exc, (http1.ClosedWithoutAnswer, ConnectionResetError, BrokenPipeError))
        reason, detail = _transient_reason(exc, options)
        if reason == "connection_error":  # which server, as urllib3's texts said (a redirect may change it)
            detail = f"{host}:{port}: {detail}"[:300]
        raise _Transient(reason, detail, aborted=aborted) from None
    except ValueError as exc:  # a URL http.client would not send
        raise RowRejected("invalid_url", str(exc)[:200]) from None


# URLs that urllib3's parse_url would send as they are, up to the case of %-escapes, scheme and host:
# no user info, IPv6 or non-ASCII host, no character it would %-encode, no dot segment, no lone %.
_PLAIN_URL = re.compile(r"(?i)(https?)://([a-z0-9.-]+)(?::([0-9]{1,5}))?"
                        r"((?:/[a-z0-9._~!$&'()*+,;=:@%-]*)*)(\?[a-z0-9._~!$&'()*+,;=:@%/?-]*)?(?:#.*)?")
_DOT_SEGMENT = re.compile(r"/\.\.?(?:/|$)")
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def _split_url(url: str) -> tuple[str, str, int, str]:
    """Scheme, host, port and request target, as urllib3's parse_url gives them (percent-encoding
    what may not be sent, removing dot segments, IDNA hosts): its import is ~50 ms of the command's
    start, so plain URLs, nearly all, are split here and only the others go to it."""
    match = _PLAIN_URL.fullmatch(url)
    if match and not _DOT_SEGMENT.search(match[4]) and not _LONE_PERCENT.search(url):
        scheme, host, port_text, path, query = match.groups()
        port = int(port_text) if port_text else 0
        if port <= 65535:
            target = (path or "/") + (query or "")
            if "%" in target:  # urllib3 writes escapes in upper case
                target = _ESCAPE.sub(lambda escape: escape[0].upper(), target)
            return scheme.lower(), host.lower(), port or (443 if scheme.lower() == "https" else 80), target
    from urllib3.util import parse_url  # the general case (import: ~50 ms, once per process)

    try:
        parsed = parse_url(url)
    except ValueError as exc:
        raise RowRejected("invalid_url", str(exc)[:200]) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise RowRejected("invalid_url", url[:200])
    return (parsed.scheme, parsed.host.strip("[]"),  # an IPv6 literal without its brackets
            parsed.port or (443 if parsed.scheme == "https" else 80), parsed.request_uri)


def _open_proxied(url: str, options: FetchOptions) -> _Answer | None:
    """The answer through the environment's proxy for `url`; None: no proxy for it."""
    from data_prep import http_pool  # urllib3 and urllib.request: imported only when a proxy may apply

    try:
        return http_pool.open_proxied(url, options.user_agent, options.timeout_seconds)
    except http_pool.ProxiedFailure as exc:
        if exc.reason in ("dns_error", "invalid_url"):
            raise RowRejected(exc.reason, exc.detail) from None
        if exc.reason == "timeout":
            raise _Transient("timeout", f"over {options.timeout_seconds} s", aborted=exc.aborted) from None
        raise _Transient(exc.reason, exc.detail, aborted=exc.aborted) from None


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
    except (_Transient, OSError, http1.ProtocolError):  # past the deadline, cut short: the
        pass  # reason stays the answer's own
    response.close()


def _transient_reason(error: Exception, options: FetchOptions) -> tuple[str, str]:
    if isinstance(error, TimeoutError):
        return "timeout", f"over {options.timeout_seconds} s"
    return "connection_error", f"{type(error).__name__}: {error}"[:300]
