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


class Silent:
    """A store that accepts connections on 127.0.0.1 and never answers; `accepted` counts
    the connections (each request attempt of a client opens one: the dead ones are closed)."""

    def __init__(self) -> None:
        import socket

        self.accepted = 0
        self._held: list[socket.socket] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)

    def close(self) -> None:
        self._sock.close()
        for c in self._held:
            c.close()
