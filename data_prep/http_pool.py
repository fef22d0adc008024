"""Downloads through a proxy (data_prep/fetch.py): one urllib3 ProxyManager per process and proxy, shared by
its download threads, keep-alive connections to the proxy. Direct requests go to data_prep/http1.py; this
module (and urllib3) is imported only when a proxy may apply.

The proxy comes from the environment (`http_proxy`, `https_proxy`, `no_proxy`, as urllib reads them).
Pools are per process: a forked child drops its parent's (the sockets are the parent's) and builds its own
on first use."""
from __future__ import annotations

import functools
import os
import threading
import urllib.request

import urllib3
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, MaxRetryError, NameResolutionError,
                                NewConnectionError, ProtocolError, ReadTimeoutError)
from urllib3.util import Retry, Timeout, make_headers, parse_url

from data_prep import http1

MAX_HOSTS = 32
"""Hosts whose idle connections are kept (least recently used first out)."""
MAX_CONNECTIONS_PER_HOST = 256
"""Idle connections kept per host: above any sensible --threads, so threads never wait for one another
(block=False) and no connection is thrown away on release; only connections in use at once are ever
opened, so this bounds nothing in practice."""
_CHUNK_BYTES = 1 << 18
"""At most this much per read of a body: most images come in one or two reads."""
# urllib3 retries nothing: every failure comes straight back to fetch_url, which retries with back-off
# (no double retries); fetch._open follows redirects.
_RETRIES = Retry(total=None, connect=0, read=0, status=0, other=0, redirect=0,
                 raise_on_redirect=False, raise_on_status=False, respect_retry_after_header=False)

_lock = threading.Lock()
_managers: dict[str, urllib3.ProxyManager] = {}


def _forget_parent_pools() -> None:
    global _lock, _managers
    _lock = threading.Lock()  # a thread of the parent may have held it at the fork
    _managers = {}


os.register_at_fork(after_in_child=_forget_parent_pools)


class ProxiedFailure(Exception):
    """A proxied request that got no answer: fetch's reason (dns_error, invalid_url, timeout,
    connection_error), a detail, and whether the connection closed before any answer."""

    def __init__(self, reason: str, detail: str, aborted: bool = False) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail, self.aborted = reason, detail, aborted


def open_proxied(url: str, user_agent: str, timeout_seconds: float) -> ProxiedAnswer | None:
    """GET `url` through the environment's proxy for its scheme, without following redirects; None when
    no proxy applies."""
    manager = proxy_manager_for(url)
    if manager is None:
        return None
    headers, timeout = _request_settings(user_agent, timeout_seconds)
    try:
        return ProxiedAnswer(manager.urlopen("GET", url, redirect=False, headers=headers, timeout=timeout,
                                             retries=_RETRIES, preload_content=False, decode_content=False))
    except MaxRetryError as exc:
        raise _failure(exc.reason) from None
    except ValueError as exc:  # no host, a bad port (LocationValueError): caught before HTTPError, its other base
        raise ProxiedFailure("invalid_url", str(exc)[:200]) from None
    except HTTPError as exc:
        raise _failure(exc) from None


def _failure(error: Exception | None) -> ProxiedFailure:
    if isinstance(error, NameResolutionError):
        return ProxiedFailure("dns_error", str(error)[:200])
    if isinstance(error, (ReadTimeoutError, TimeoutError)) or (
            isinstance(error, ConnectTimeoutError) and not isinstance(error, NewConnectionError)):
        return ProxiedFailure("timeout", "")
    return ProxiedFailure("connection_error", f"{type(error).__name__}: {error}"[:300],
                          aborted=isinstance(error, ProtocolError))


class ProxiedAnswer:
    """urllib3's answer, read as fetch reads http1.Response (its errors as TimeoutError or
    http1.ProtocolError)."""

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
        try:
            return self._response.read1(_CHUNK_BYTES)
        except ReadTimeoutError as exc:
            raise TimeoutError(str(exc)) from None
        except HTTPError as exc:
            raise http1.ProtocolError(f"{type(exc).__name__}: {exc}") from None

    def finish(self) -> None:
        self._response.release_conn()

    def close(self) -> None:
        self._response.close()


@functools.lru_cache(maxsize=16)
def _request_settings(user_agent: str, timeout_seconds: float) -> tuple[dict[str, str], Timeout]:
    """The request's headers and urllib3 timeout (urllib3 copies both before changing them)."""
    return {"User-Agent": user_agent}, Timeout(total=timeout_seconds)


def proxy_manager_for(url: str) -> urllib3.ProxyManager | None:
    """This process's manager for the environment's proxy for `url`'s scheme; None: go direct."""
    proxies = _proxies(tuple(os.environ.get(name) for name in _PROXY_VARIABLES))
    if not proxies:
        return None
    parsed = parse_url(url)
    proxy = proxies.get(parsed.scheme or "http")
    if not proxy or urllib.request.proxy_bypass(parsed.netloc or ""):
        return None
    manager = _managers.get(proxy)
    if manager is None:
        with _lock:
            manager = _managers.get(proxy)
            if manager is None:
                manager = _managers[proxy] = _new_manager(proxy)
    return manager


# urllib.request.getproxies() scans the whole environment (~0.1 ms per image); these names, read one
# by one, tell when its answer may have changed.
_PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY")


@functools.lru_cache(maxsize=4)
def _proxies(settings: tuple[str | None, ...]) -> dict[str, str]:
    return urllib.request.getproxies()


def _new_manager(proxy: str) -> urllib3.ProxyManager:
    if "://" not in proxy:
        proxy = "http://" + proxy  # urllib reads `host:port` as an http proxy too
    auth = parse_url(proxy).auth
    headers = make_headers(proxy_basic_auth=auth) if auth else None
    return urllib3.ProxyManager(proxy, proxy_headers=headers, num_pools=MAX_HOSTS, maxsize=MAX_CONNECTIONS_PER_HOST,
                                block=False)
