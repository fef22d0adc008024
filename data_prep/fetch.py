"""URL downloads with a total deadline, retries with back-off, a user agent and a size limit.
Every failure becomes `RowRejected` with a reason such as `http_404` or `timeout`; an image whose server
opts out of our use (`X-Robots-Tag: noai`, data_prep/opt_out.py) becomes `opt_out`."""
from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from data_prep import __version__
from data_prep.images import RowRejected
from data_prep.opt_out import DEFAULT_DISALLOWED_DIRECTIVES, HEADER, disallowing_directive, robots_tokens

_CHUNK_BYTES = 1 << 16


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
    while True:
        try:
            return _fetch_once(url, options)
        except _Transient as exc:
            if attempt >= options.num_retries:
                raise RowRejected(exc.reason, exc.detail) from None
            time.sleep(options.backoff_seconds * (2 ** attempt))
            attempt += 1


class _Transient(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _fetch_once(url: str, options: FetchOptions) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": options.user_agent})
    deadline = time.monotonic() + options.timeout_seconds
    try:
        with urllib.request.urlopen(request, timeout=options.timeout_seconds) as response:
            # Checked on the headers, before the body: an opted-out image is never downloaded.
            opted_out = disallowing_directive(response.headers.get_all(HEADER) or [],
                                              robots_tokens(options.user_agent),
                                              options.disallowed_header_directives)
            if opted_out:
                raise RowRejected("opt_out", opted_out)
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > options.max_bytes:
                raise RowRejected("too_large", f"{length} bytes")
            return _read_body(response, deadline, options.max_bytes)
    except urllib.error.HTTPError as exc:
        reason = f"http_{exc.code}"
        if exc.code >= 500 or exc.code == 429:
            raise _Transient(reason, str(exc.reason)) from None
        raise RowRejected(reason, str(exc.reason)) from None
    except (socket.timeout, TimeoutError):
        raise _Transient("timeout", f"over {options.timeout_seconds} s") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (socket.timeout, TimeoutError)):
            raise _Transient("timeout", f"over {options.timeout_seconds} s") from None
        if isinstance(exc.reason, socket.gaierror):
            raise RowRejected("dns_error", str(exc.reason)) from None
        raise _Transient("connection_error", str(exc.reason)) from None
    except (ConnectionError, http.client.HTTPException, OSError) as exc:
        raise _Transient("connection_error", f"{type(exc).__name__}: {exc}") from None
    except ValueError as exc:  # urllib's "unknown url type" and friends
        raise RowRejected("invalid_url", str(exc)) from None


def _read_body(response: http.client.HTTPResponse, deadline: float, max_bytes: int) -> bytes:
    # The socket timeout bounds each read; this loop also bounds the whole body, so a server
    # that drips one byte per second cannot hold a worker forever.
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise _Transient("timeout", "body not received before the deadline")
        chunk = response.read(_CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise RowRejected("too_large", f"over {max_bytes} bytes")
        chunks.append(chunk)
