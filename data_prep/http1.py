"""A small HTTP/1.1 GET client for data-prep's direct downloads (data_prep/fetch.py), with keep-alive
connections pooled per process and host. Requests through a proxy stay on urllib3 (data_prep/http_pool.py).

Why not urllib3 (or http.client) for these: per image, urllib3's layers and http.client's header parsing
(the email package) cost ~0.25 ms of a worker's ~3.8 ms of CPU: fetch_url took ~0.39 ms of client CPU
through urllib3, ~0.15 ms through this (one thread, loopback; benchmarks/RESULTS.md, issue 16). It sends what urllib3 sent (Host, Accept-Encoding: identity,
User-Agent) and reads the answers http.client reads: Content-Length, chunked or until-close bodies,
interim 1xx answers, HTTP/1.0 servers; TLS with the default context (system trust store, host name
checked), as urllib3's default. Failures are OSError (socket, TLS, timeouts), socket.gaierror for names
and ProtocolError for answers that are not HTTP."""
from __future__ import annotations

import functools
import os
import re
import select
import socket
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

MAX_HOSTS = 32
"""Hosts whose idle connections are kept (least recently used first out)."""
MAX_IDLE_PER_HOST = 256
"""Idle connections kept per host: above any sensible --threads, so none is closed on release."""
MAX_HEAD_BYTES = 1 << 17
"""Longest status line + headers read (http.client allows 100 headers of up to 64 KiB)."""
_RECV_BYTES = 1 << 18
"""At most this much per read: most images come in one or two reads, each a socket call and a GIL hand-off."""


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.x, or ended before its body did."""


class Connection:
    """One socket and the bytes received past the answer last read from it."""

    __slots__ = ("sock", "pending", "reused")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""
        self.reused = False

    def close(self) -> None:
        self.sock.close()


class Response:
    """An answer whose head is read; the body is read with read1() until it returns b""."""

    def __init__(self, connection: Connection, key: tuple, status: int, reason: str,
                 headers: list[tuple[str, str]], length: int | None, chunked: bool, keep_alive: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._connection: Connection | None = connection
        self._key = key
        # Body bytes still to come; None: until the server closes. Chunked: bytes left of the current chunk,
        # None before the first chunk's size line.
        self._left = length
        self._chunked = chunked
        self._keep_alive = keep_alive
        self._done = length == 0

    def header_values(self, name: str) -> list[str]:
        """Every value of header `name` (lower case), in order."""
        return [value for key, value in self.headers if key == name]

    def header(self, name: str) -> str | None:
        """The first value of header `name` (lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def settimeout(self, seconds: float) -> None:
        if self._connection is not None:
            self._connection.sock.settimeout(seconds)

    def read1(self) -> bytes:
        """The next piece of the body (one socket read at most, except in chunk framing), b"" at its end."""
        if self._done or self._connection is None:
            return b""
        if self._chunked:
            return self._read_chunk()
        if self._left is None:
            data = self._take(_RECV_BYTES)
            if not data:
                self._done = True
            return data
        data = self._take(min(self._left, _RECV_BYTES))
        if not data:
            raise ProtocolError(f"IncompleteRead: the connection closed with {self._left} body bytes to come")
        self._left -= len(data)
        self._done = self._left == 0
        return data

    def finish(self) -> None:
        """Return the connection to the pool when the body was read to its end and the server keeps it
        open; close it otherwise."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._done and self._keep_alive:
            _release(self._key, connection)
        else:
            connection.close()

    def close(self) -> None:
        self._keep_alive = False
        self.finish()

    def _take(self, size: int) -> bytes:
        connection = self._connection
        if connection.pending:
            data, connection.pending = connection.pending[:size], connection.pending[size:]
            return data
        return connection.sock.recv(size)

    def _read_line(self) -> bytes:
        connection = self._connection
        while b"\r\n" not in connection.pending:
            if len(connection.pending) > MAX_HEAD_BYTES:
                raise ProtocolError("chunk header too long")
            data = connection.sock.recv(_RECV_BYTES)
            if not data:
                raise ProtocolError("IncompleteRead: the connection closed inside a chunked body")
            connection.pending += data
        line, _, connection.pending = connection.pending.partition(b"\r\n")
        return line

    def _read_chunk(self) -> bytes:
        if not self._left:
            if self._left == 0:  # the CRLF after the last chunk's data
                self._read_line()
            size_text = self._read_line().split(b";", 1)[0].strip()
            try:
                self._left = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            if self._left == 0:  # the last chunk: skip the trailer up to its empty line
                while self._read_line():
                    pass
                self._done = True
                return b""
        data = self._take(min(self._left, _RECV_BYTES))
        if not data:
            raise ProtocolError("IncompleteRead: the connection closed inside a chunked body")
        self._left -= len(data)
        return data


def get(scheme: str, host: str, port: int, target: str, user_agent: str, timeout_seconds: float) -> Response:
    """GET `target` from scheme://host:port, on an idle pooled connection when there is one that the
    server has not closed; connect (and TLS handshake) and every read wait at most `timeout_seconds`."""
    key = (scheme, host, port)
    request = _request_bytes(host, port, scheme, target, user_agent)
    connection = _idle_connection(key)
    if connection is None:
        connection = _connect(scheme, host, port, timeout_seconds)
    try:
        connection.sock.settimeout(timeout_seconds)
        connection.sock.sendall(request)
        return _read_head(connection, key)
    except BaseException:
        connection.close()
        raise


class ClosedWithoutAnswer(ProtocolError):
    """The connection closed before any byte of an answer (a kept-alive connection the server closed as
    the request went out: worth one more try on a new connection)."""


_NOT_IN_URLS = re.compile(r"[\x00-\x20\x7f]")  # http.client's check: control characters and spaces
_NOT_IN_HEADERS = re.compile(r"[\r\n\x00]")


def _request_bytes(host: str, port: int, scheme: str, target: str, user_agent: str) -> bytes:
    """urllib3's request head: Host (with the port unless the scheme's default), Accept-Encoding: identity,
    User-Agent. ValueError for what http.client refuses to send (control characters, non-ASCII URLs)."""
    host_text = f"[{host}]" if ":" in host else host
    if port != (443 if scheme == "https" else 80):
        host_text = f"{host_text}:{port}"
    if (_NOT_IN_URLS.search(target) or _NOT_IN_URLS.search(host_text) or _NOT_IN_HEADERS.search(user_agent)
            or not (target.isascii() and host_text.isascii())):
        raise ValueError(f"can't send GET {target[:100]!r} to {host_text[:100]!r}")
    return (f"GET {target} HTTP/1.1\r\nHost: {host_text}\r\nAccept-Encoding: identity\r\n"
            f"User-Agent: {user_agent}\r\n\r\n").encode("latin-1")


def _read_head(connection: Connection, key: tuple) -> Response:
    reused = connection.reused
    while True:
        head = connection.pending
        while True:
            end = head.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(head) > MAX_HEAD_BYTES:
                raise ProtocolError(f"answer head over {MAX_HEAD_BYTES} bytes")
            data = connection.sock.recv(_RECV_BYTES)
            if not data:
                if not head:
                    raise ClosedWithoutAnswer("the connection closed without an answer"
                                              + (" (a kept-alive connection)" if reused else ""))
                raise ProtocolError("the connection closed inside the answer's head")
            head += data
        connection.pending = head[end + 4:]
        lines = head[:end].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.strip().partition(" ")
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise ProtocolError(f"not an HTTP/1.x answer: {lines[0][:100]!r}")
        status = int(code)
        if 100 <= status < 200 and status != 101:
            continue  # interim answer (100 Continue, 103 Early Hints): the real one follows
        headers = _parse_headers(lines[1:])
        return _response(connection, key, status, reason.strip(), headers, http10=version == "HTTP/1.0")


def _parse_headers(lines: list[str]) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (" ", "\t") and headers:  # obsolete line folding: continues the last value
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        if colon:
            headers.append((name.strip().lower(), value.strip()))
    return headers


def _response(connection: Connection, key: tuple, status: int, reason: str, headers: list[tuple[str, str]],
              http10: bool) -> Response:
    tokens = {token.strip().lower() for name, value in headers if name == "connection" for token in value.split(",")}
    keep_alive = "keep-alive" in tokens if http10 else "close" not in tokens
    codings = [value for name, value in headers if name == "transfer-encoding"]
    length: int | None = None
    chunked = False
    if status in (204, 304) or 100 <= status < 200:
        length = 0
    elif codings:
        chunked = codings[-1].lower().rsplit(",", 1)[-1].strip() == "chunked"  # else: until close
    else:
        text = next((value for name, value in headers if name == "content-length"), None)
        if text is not None and text.isdigit():
            length = int(text)
    if length is None and not chunked:
        keep_alive = False  # the body ends with the connection
    return Response(connection, key, status, reason, headers, length, chunked, keep_alive)


_lock = threading.Lock()
_idle: dict[tuple, list[Connection]] = {}  # insertion order = least recently used first


def _forget_parent_connections() -> None:
    global _lock, _idle
    _lock = threading.Lock()  # a thread of the parent may have held it at the fork
    _idle = {}  # the sockets are the parent's: never write on them from a child


os.register_at_fork(after_in_child=_forget_parent_connections)


def _idle_connection(key: tuple) -> Connection | None:
    """An idle connection to `key` that the server has not closed (urllib3's check: not readable)."""
    while True:
        with _lock:
            connections = _idle.get(key)
            if not connections:
                return None
            connection = connections.pop()
        if connection.pending or _readable(connection.sock):  # closed by the server, or unasked-for bytes
            connection.close()
            continue
        connection.reused = True
        return connection


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _release(key: tuple, connection: Connection) -> None:
    dropped: list[Connection] = []
    with _lock:
        connections = _idle.pop(key, None) or []
        if len(connections) < MAX_IDLE_PER_HOST:
            connections.append(connection)
        else:
            dropped.append(connection)
        _idle[key] = connections  # re-inserted: now the most recently used
        while len(_idle) > MAX_HOSTS:
            dropped.extend(_idle.pop(next(iter(_idle))))
    for old in dropped:
        old.close()


def _connect(scheme: str, host: str, port: int, timeout_seconds: float) -> Connection:
    sock = socket.create_connection((host, port), timeout=timeout_seconds)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as urllib3 and http.client
        if scheme == "https":
            sock = _tls_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")).wrap_socket(
                sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    return Connection(sock)


@functools.lru_cache(maxsize=4)
def _tls_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """The default context (certificates and host names checked, OpenSSL's trust store, which
    SSL_CERT_FILE / SSL_CERT_DIR move: hence the cache key), built once instead of per connection."""
    import ssl  # only for https (~6 ms of the command's start otherwise)

    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context
