"""A small HTTP file server for the tests, on 127.0.0.1: serves a folder, answers Range requests (206),
counts requests and bytes sent, and can misbehave on purpose: drop every n-th connection (alternately
without an answer and halfway through the body), serve one file with one byte flipped, or go down in the
middle of an answer (request number `outage_at` gets half its body) and refuse every connection for
`outage_s` seconds (its listening socket closed, as a restarting server's), then listen again on the port."""
from __future__ import annotations

import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class ShardServer:
    def __init__(self, root: Path, *, drop_every: int = 0, corrupt: dict[str, int] | None = None,
                 outage_at: int = 0, outage_s: float = 0.0) -> None:
        self.root, self.drop_every, self.corrupt = Path(root), drop_every, corrupt or {}
        self.outage_at, self.outage_s = outage_at, outage_s
        self.requests = self.bytes_sent = self.dropped = 0
        self.down_at: float | None = None  # time.monotonic() when the outage began
        self.down_request = ""  # the path whose answer broke off
        self.lock, self.closing = threading.Lock(), threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.outage = threading.Thread(target=self._go_down, daemon=True)

    def __enter__(self) -> ShardServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_) -> None:
        self.closing.set()  # an outage still under way ends with the server
        if self.outage.is_alive():
            self.outage.join()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _go_down(self) -> None:
        self.down_at = time.monotonic()
        self.httpd.shutdown()
        self.httpd.server_close()
        if not self.closing.wait(self.outage_s):
            self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
            threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _body(self, name: str) -> bytes | None:
        path = self.root / name
        if not path.is_file() or self.root.resolve() not in path.resolve().parents:
            return None
        data = bytearray(path.read_bytes())
        if name in self.corrupt:
            data[self.corrupt[name]] ^= 0xFF
        return bytes(data)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server.lock:
                    server.requests += 1
                    drop = server.drop_every and server.requests % server.drop_every == 0
                    server.dropped += bool(drop)
                    halfway = drop and server.dropped % 2 == 0
                    down = server.requests == server.outage_at
                if drop and not halfway:
                    return  # closed without an answer
                body = server._body(urllib.parse.unquote(self.path.lstrip("/")))
                if body is None:
                    self.send_error(404)
                    return
                start, end, status = 0, len(body), 200
                if (match := RANGE.match(self.headers.get("Range", ""))) is not None:
                    start = int(match.group(1))
                    end = min(len(body), int(match.group(2)) + 1) if match.group(2) else len(body)
                    status = 206
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                chunk = body[start:end]
                if halfway or down:
                    chunk = chunk[:len(chunk) // 2]  # the connection breaks off mid-body
                with server.lock:  # counted before sending: the client may be done before this thread goes on
                    server.bytes_sent += len(chunk)
                self.wfile.write(chunk)
                if down:
                    server.down_request = self.path
                    server.outage.start()

            def log_message(self, *_) -> None:
                pass

        return Handler
