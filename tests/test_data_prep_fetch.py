"""data_prep/fetch.py against loopback servers: keep-alive connections, every rejection reason, stale
connections, redirects, proxies. Only 127.0.0.1 is contacted (unresolvable names fail in a patched
getaddrinfo before any resolver is asked)."""
from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import pytest

from data_prep import fetch, http1
from data_prep.fetch import FetchOptions, fetch_url
from data_prep.images import RowRejected
from loopback_server import LoopbackServer, Response

FAST = FetchOptions(timeout_seconds=2.0, num_retries=2, backoff_seconds=0.0)


def _image(n: int) -> bytes:
    return f"image {n} ".encode() * 50


def _respond(path: str) -> Response:
    path = urllib.parse.urlsplit(path).path  # a proxy's request line holds the absolute URL
    if path.startswith("/img/"):
        return 200, _image(int(path.rsplit("/", 1)[-1])), []
    if path == "/error500":
        return 500, b"oops", []
    if path == "/busy":
        return 429, b"slow down", [("Retry-After", "1")]
    if path == "/noai-small":
        return 200, b"small", [("X-Robots-Tag", "noai")]
    if path == "/noai-big":
        return 200, b"x" * (1 << 20), [("X-Robots-Tag", "noai")]
    if path == "/moved":
        return 301, b"", [("Location", "/img/7")]
    if path == "/found":
        return 302, b"see there", [("Location", "/moved")]
    if path == "/loop":
        return 302, b"", [("Location", "/loop")]
    return 404, b"not found", []


@pytest.fixture()
def keep_alive() -> Iterator[LoopbackServer]:
    server = LoopbackServer(_respond, keep_alive=True)
    yield server
    server.close()


def _reason(url: str, options: FetchOptions = FAST) -> str:
    with pytest.raises(RowRejected) as info:
        fetch_url(url, options)
    return info.value.reason


def test_connections_are_kept_alive_and_reused(keep_alive: LoopbackServer) -> None:
    for n in range(20):
        assert fetch_url(f"{keep_alive.base}/img/{n}", FAST) == _image(n)
    assert keep_alive.num_connections == 1


def test_threads_share_the_pool_without_blocking_each_other(keep_alive: LoopbackServer) -> None:
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda n: fetch_url(f"{keep_alive.base}/img/{n}", FAST), range(80)))
    assert bodies == [_image(n) for n in range(80)]
    assert keep_alive.num_connections <= 8  # at most one connection per thread in use at a time


@pytest.mark.parametrize("server_kwargs", [{}, {"keep_alive": True, "responses_per_connection": 1},
                                           {"keep_alive": True, "responses_per_connection": 3}],
                         ids=["http10-close-each", "drop-after-1", "drop-after-3"])
def test_connections_the_server_closed_are_not_failures(server_kwargs: dict) -> None:
    server = LoopbackServer(_respond, **server_kwargs)
    try:
        no_retries = FetchOptions(timeout_seconds=2.0, num_retries=0)  # any counted failure would show
        for n in range(12):
            assert fetch_url(f"{server.base}/img/{n}", no_retries) == _image(n)
        if server_kwargs:
            assert server.num_dropped_requests > 0  # the stale connection was really met
    finally:
        server.close()


def test_http_errors_and_retries(keep_alive: LoopbackServer) -> None:
    assert _reason(f"{keep_alive.base}/missing") == "http_404"
    assert keep_alive.requests.count("/missing") == 1  # a 404 is final
    assert _reason(f"{keep_alive.base}/error500") == "http_500"
    assert keep_alive.requests.count("/error500") == 3  # 1 + num_retries, ours only
    assert _reason(f"{keep_alive.base}/busy") == "http_429"
    assert keep_alive.requests.count("/busy") == 3  # Retry-After does not add urllib3 retries
    # Small error bodies are drained: the connection is still reused.
    assert keep_alive.num_connections == 1


def test_redirects_are_followed(keep_alive: LoopbackServer) -> None:
    assert fetch_url(f"{keep_alive.base}/moved", FAST) == _image(7)
    assert fetch_url(f"{keep_alive.base}/found", FAST) == _image(7)
    assert keep_alive.requests == ["/moved", "/img/7", "/found", "/moved", "/img/7"]
    assert _reason(f"{keep_alive.base}/loop") == "http_302"


def test_redirects_to_another_host_and_scheme(keep_alive: LoopbackServer) -> None:
    # fetch.py follows redirects itself (one connection pool per host): an absolute Location on another
    # server is fetched there; a Location that is not http(s) leaves the row invalid_url, as urllib3 did.
    other = LoopbackServer(lambda path: ((302, b"", [("Location", f"{keep_alive.base}/img/9")])
                                         if path == "/away" else _respond(path)), keep_alive=True)
    try:
        assert fetch_url(f"{other.base}/away", FAST) == _image(9)
        assert other.requests == ["/away"] and keep_alive.requests == ["/img/9"]
    finally:
        other.close()
    ftp = LoopbackServer(lambda path: (301, b"", [("Location", "ftp://127.0.0.1/a.jpg")]), keep_alive=True)
    try:
        assert _reason(f"{ftp.base}/a.jpg") == "invalid_url"
    finally:
        ftp.close()


def test_opt_out_and_connection_reuse_after_it(keep_alive: LoopbackServer) -> None:
    assert _reason(f"{keep_alive.base}/noai-small") == "opt_out"
    assert keep_alive.num_connections == 1  # drained and reused
    assert _reason(f"{keep_alive.base}/noai-big") == "opt_out"
    # The 1 MB body was not read: its connection is closed, the next image comes whole on a new one.
    assert fetch_url(f"{keep_alive.base}/img/3", FAST) == _image(3)


@pytest.mark.parametrize("url", [
    "http://example.com/a.jpg", "HTTPS://Example.COM:8443/a/b.jpg?x=1&y=%2f%2F#frag", "http://example.com",
    "http://example.com?q=1", "http://example.com:80/p", "https://example.com:443/p?", "http://e.com/a b.jpg",
    "http://e.com/caf\u00e9.jpg?w=\u00e9", "http://e.com/a/./b/../c.jpg", "http://e.com/a/..", "http://e.com/100%",
    "http://e.com/%zz", "http://user:pw@e.com/a", "http://[::1]:8080/a", "http://b\u00fccher.de/a",
    "http://e.com/a|b^c{d}[e]\"", "http://e.com/p?a=[1]&b=`x`", "http://e.com/~user/!$&'()*+,;=:@-._",
    "http://e.com:0/a", "http://e.com//double//slash",
])
def test_urls_are_split_as_urllib3_splits_them(url: str) -> None:
    # fetch splits plain URLs itself (urllib3's import is ~50 ms of the command's start); the request
    # target, host and port must be exactly what urllib3's parse_url sent before.
    from urllib3.util import parse_url

    parsed = parse_url(url)
    expected = (parsed.scheme, parsed.host.strip("[]"), parsed.port or (443 if parsed.scheme == "https" else 80),
                parsed.request_uri)
    assert fetch._split_url(url) == expected


def test_user_agent_is_sent(keep_alive: LoopbackServer) -> None:
    fetch_url(f"{keep_alive.base}/img/1", FetchOptions(user_agent="mybot/2.0"))
    assert keep_alive.user_agents == {"mybot/2.0"}


class _RawServer:
    """One-shot answers written by `script(connection)` after the request head is read: for what
    http.server cannot do (no Content-Length, a dripping body, headers without the promised body)."""

    def __init__(self, script: Callable[[socket.socket], None], tls: ssl.SSLContext | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.listener.getsockname()[1]}"
        self.num_requests = 0

        def serve() -> None:
            while True:
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    return
                self.num_requests += 1
                threading.Thread(target=self._answer, args=(conn, script, tls), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    @staticmethod
    def _answer(conn: socket.socket, script: Callable[[socket.socket], None],
                tls: ssl.SSLContext | None) -> None:
        if tls is not None:
            try:
                conn = tls.wrap_socket(conn, server_side=True)
            except OSError:  # the client refused our certificate
                conn.close()
                return
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            try:
                script(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def _drip(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(200):  # 10 s in all, each byte well within the socket timeout
        conn.sendall(b"x")
        time.sleep(0.05)


def _headers_then_stall(extra: bytes) -> Callable[[socket.socket], None]:
    def script(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n" + extra + b"\r\n" + b"x" * 100)
        time.sleep(10)  # the rest of the body never comes: reading it would time out
    return script


def _unsized_body(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 5000)  # ends when the connection closes


@pytest.mark.parametrize("script, options, reason", [
    (_drip, FetchOptions(timeout_seconds=0.5, num_retries=0), "timeout"),
    (_headers_then_stall(b"X-Robots-Tag: noai\r\n"), FetchOptions(timeout_seconds=3, num_retries=0), "opt_out"),
    (_headers_then_stall(b""), FetchOptions(timeout_seconds=3, num_retries=0, max_bytes=1000), "too_large"),
    (_unsized_body, FetchOptions(timeout_seconds=3, num_retries=0, max_bytes=1000), "too_large"),
], ids=["dripping-body", "opt-out-on-headers", "too-large-by-header", "too-large-by-body"])
def test_reasons_from_raw_answers(script: Callable[[socket.socket], None], options: FetchOptions,
                                  reason: str) -> None:
    server = _RawServer(script)
    try:
        assert _reason(f"{server.base}/x.jpg", options) == reason
    finally:
        server.close()


def _answer(raw: bytes) -> Callable[[socket.socket], None]:
    def script(conn: socket.socket) -> None:
        conn.sendall(raw)
    return script


@pytest.mark.parametrize("raw, outcome", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;name=v\r\n world\r\n"
     b"0\r\nX-Trailer: t\r\n\r\n", b"hello world"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    (b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n\r\n" + b"y" * 70000, b"y" * 70000),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nX-Folded: a\r\n  b\r\n\r\nabcdef", b"abc"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"z" * 10, "connection_error"),  # cut short
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "connection_error"),  # not HTTP
    (b"HTTP/1.1 200 OK\r\nX-Robots-Tag: otherbot: noai\r\nX-Robots-Tag: noimageai\r\n"
     b"Content-Length: 1\r\n\r\nx", "opt_out"),  # the second of two headers opts out
    (b"HTTP/1.1 301 Moved\r\nContent-Length: 0\r\n\r\n", "http_301"),  # a redirect without Location
], ids=["chunked", "interim-100", "http10-until-close", "lower-case-and-folded-headers",
        "incomplete-body", "not-http", "second-robots-header", "redirect-without-location"])
def test_raw_answers(raw: bytes, outcome: bytes | str) -> None:
    # Body framings and answers beyond what http.server writes: a body (bytes) or a rejection reason (str).
    server = _RawServer(_answer(raw))
    options = FetchOptions(timeout_seconds=3, num_retries=0)
    try:
        if isinstance(outcome, bytes):
            assert fetch_url(f"{server.base}/x.jpg", options) == outcome
        else:
            assert _reason(f"{server.base}/x.jpg", options) == outcome
    finally:
        server.close()


def test_timeout_is_retried_and_body_under_the_cap_is_read() -> None:
    server = _RawServer(_drip)
    try:
        assert _reason(f"{server.base}/x.jpg", FetchOptions(timeout_seconds=0.3, num_retries=1,
                                                             backoff_seconds=0.0)) == "timeout"
        assert server.num_requests == 2
    finally:
        server.close()
    server = _RawServer(_unsized_body)
    try:
        assert fetch_url(f"{server.base}/x.jpg", FetchOptions(max_bytes=5000)) == b"x" * 5000
    finally:
        server.close()


@pytest.fixture()
def no_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names under .invalid fail here, as a resolver would answer, without asking one."""
    real = socket.getaddrinfo

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        name = host.decode() if isinstance(host, bytes) else host
        if isinstance(name, str) and name.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY",
                 "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("no_resolver")
def test_connection_reasons() -> None:
    assert _reason("http://images.nonexistent.invalid/a.jpg") == "dns_error"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    assert _reason(f"http://127.0.0.1:{closed_port}/a.jpg") == "connection_error"
    assert _reason("ftp://127.0.0.1/a.jpg") == "invalid_url"
    assert _reason("http:///a.jpg") == "invalid_url"


@pytest.mark.usefixtures("no_resolver")
def test_connection_failure_details_name_the_cause() -> None:
    # The stats' `detail`: the resolver's or the OS's words and the host, no client library's object reprs.
    with pytest.raises(RowRejected) as info:
        fetch_url("http://images.nonexistent.invalid/a.jpg", FAST)
    assert info.value.detail == "images.nonexistent.invalid: [Errno -2] Name or service not known"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    with pytest.raises(RowRejected) as info:
        fetch_url(f"http://127.0.0.1:{closed_port}/a.jpg", FAST)
    assert info.value.detail.startswith(f"127.0.0.1:{closed_port}: ConnectionRefusedError: ")


@pytest.mark.usefixtures("no_resolver")
def test_https_to_a_plain_http_port_is_a_connection_error(keep_alive: LoopbackServer) -> None:
    assert _reason(keep_alive.base.replace("http://", "https://") + "/img/1") == "connection_error"


@pytest.mark.usefixtures("no_resolver")
def test_proxy_from_the_environment(keep_alive: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The loopback server stands in for the proxy: it sees the absolute URL of each request.
    monkeypatch.setenv("http_proxy", keep_alive.base)
    assert fetch_url("http://images.example.invalid/img/5", FAST) == _image(5)
    assert keep_alive.requests == ["http://images.example.invalid/img/5"]
    monkeypatch.setenv("no_proxy", "example.invalid")
    assert _reason("http://images.example.invalid/img/5") == "dns_error"  # bypassed: resolved directly


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_forked_child_opens_its_own_connections(keep_alive: LoopbackServer) -> None:
    # data_prep/local_runner.py forks workers; a parent's pooled socket used by two processes would
    # interleave their requests and answers.
    assert fetch_url(f"{keep_alive.base}/img/1", FAST) == _image(1)
    pid = os.fork()
    if pid == 0:  # the child: only fetch, then leave without running the parent's cleanup
        ok = not http1._idle and fetch_url(f"{keep_alive.base}/img/2", FAST) == _image(2)
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert fetch_url(f"{keep_alive.base}/img/3", FAST) == _image(3)  # the parent's connection still works
    assert keep_alive.num_connections == 2


def _small_image(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")


def _self_signed(folder: Path) -> tuple[ssl.SSLContext, Path]:
    """A TLS server context for 127.0.0.1 and its (self-signed) certificate file."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    return tls, cert


class _ConnectProxy:
    """An HTTP proxy that only tunnels (CONNECT host:port), as corporate proxies do for https:// URLs; it
    records each tunnel's target and never sees the TLS inside."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.tunnels: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(conn,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(4096)
            if not data:
                client.close()
                return
            head += data
        method, target = head.split(b"\r\n", 1)[0].decode().split(" ")[:2]
        if method != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            client.close()
            return
        self.tunnels.append(target)
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pipe(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for end in (source, sink):
                    try:
                        end.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="makes its certificate with the openssl command")
@pytest.mark.usefixtures("no_resolver")
def test_https_through_a_connect_proxy_verifies_the_server_end_to_end(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """https_proxy: the download goes through the proxy's CONNECT tunnel, and the certificate checked is the
    image server's (a proxy cannot stand in for it)."""
    tls, cert = _self_signed(tmp_path)
    server, proxy = _RawServer(_small_image, tls), _ConnectProxy()
    port = server.base.rsplit(":", 1)[1]
    monkeypatch.setenv("https_proxy", proxy.base)
    try:
        assert _reason(f"{server.base}/x.jpg") == "connection_error"  # self-signed: not trusted through it either
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert fetch_url(f"{server.base}/x.jpg", FAST) == b"hello"
        assert set(proxy.tunnels) == {f"127.0.0.1:{port}"} and server.num_requests == len(proxy.tunnels)
    finally:
        server.close()
        proxy.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="makes its certificate with the openssl command")
def test_https_verifies_the_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tls, cert = _self_signed(tmp_path)
    server = _RawServer(_small_image, tls)
    try:
        assert _reason(f"{server.base}/x.jpg") == "connection_error"  # self-signed: not trusted
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # now it is (OpenSSL's default trust store)
        assert fetch_url(f"{server.base}/x.jpg", FAST) == b"hello"
    finally:
        server.close()
