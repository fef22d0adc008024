"""Keep-alive HTTP connections through a proxy for data-prep's downloads (data_prep/fetch.py): one urllib3
ProxyManager per process and proxy, shared by its download threads. Direct requests go to data_prep/http1.py.

The proxy comes from the environment (`http_proxy`, `https_proxy`, `no_proxy`, as urllib reads them).
Pools are per process: a forked child drops its parent's (the sockets are the parent's) and builds its own
on first use."""
from __future__ import annotations

import functools
import os
import threading
import urllib.request

import urllib3
from urllib3.util import make_headers, parse_url

MAX_HOSTS = 32
"""Hosts whose idle connections are kept (least recently used first out)."""
MAX_CONNECTIONS_PER_HOST = 256
"""Idle connections kept per host: above any sensible --threads, so threads never wait for one another
(block=False) and no connection is thrown away on release; only connections in use at once are ever
opened, so this bounds nothing in practice."""

_lock = threading.Lock()
_managers: dict[str, urllib3.ProxyManager] = {}


def _forget_parent_pools() -> None:
    global _lock, _managers
    _lock = threading.Lock()  # a thread of the parent may have held it at the fork
    _managers = {}


os.register_at_fork(after_in_child=_forget_parent_pools)


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
