"""A threaded HTTP server on 127.0.0.1 for data-prep's URL tests: `respond(path)` decides each answer."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Response = tuple[int, bytes, list[tuple[str, str]]]
"""Status, body and extra headers."""


class LoopbackServer:
    """Serves `respond(path)` at `base`; `requests` lists every path asked for, in order, and
    `user_agents` every User-Agent header seen; `num_connections` counts accepted TCP connections.

    `keep_alive=True` speaks HTTP/1.1 (connections stay open between requests, as at a CDN); the
    default, HTTP/1.0, closes each connection after its response. `responses_per_connection=K`
    (with keep_alive) answers K requests on a connection and then drops it when the next request
    arrives, unannounced: a keep-alive connection that the server timed out while the client sent on it."""

    def __init__(self, respond: Callable[[str], Response], *, keep_alive: bool = False,
                 responses_per_connection: int | None = None) -> None:
        self.requests: list[str] = []
        self.user_agents: set[str] = set()
        self.num_connections = 0
        self.num_dropped_requests = 0
        server = self
        count_lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def setup(self) -> None:
                super().setup()
                self.num_responses = 0
                with count_lock:
                    server.num_connections += 1

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                if responses_per_connection is not None and self.num_responses >= responses_per_connection:
                    with count_lock:
                        server.num_dropped_requests += 1
                    self.close_connection = True  # no answer: the client sees the connection closed
                    return
                self.num_responses += 1
                server.requests.append(self.path)
                server.user_agents.add(self.headers.get("User-Agent", ""))
                status, body, headers = respond(self.path)
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
