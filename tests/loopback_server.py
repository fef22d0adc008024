"""A threaded HTTP server on 127.0.0.1 for data-prep's URL tests: `respond(path)` decides each answer."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Response = tuple[int, bytes, list[tuple[str, str]]]
"""Status, body and extra headers."""


class LoopbackServer:
    """Serves `respond(path)` at `base`; `requests` lists every path asked for, in order, and
    `user_agents` every User-Agent header seen."""

    def __init__(self, respond: Callable[[str], Response]) -> None:
        self.requests: list[str] = []
        self.user_agents: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
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
