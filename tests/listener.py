"""A loopback HTTP server that records every request it gets: for tests that prove a request
never reaches a host (it answers 200 with a body, so a leak would also show in the result)."""

from __future__ import annotations

import http.server
import threading


class Listener:
    """Serves on 127.0.0.1 on a free port; `hits` lists the paths requested."""

    def __init__(self) -> None:
        hits: list[str] = []
        self.hits = hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "5")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(b"leak!")

            do_HEAD = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port() -> int:
    """A loopback port with nothing listening on it (free when checked)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
