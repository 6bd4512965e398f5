"""A shard folder served over HTTP on the loopback the way a slow, failing object store serves it: a latency
per request, a bandwidth cap per connection, and faults on chosen shards (a 503, a connection dropped
mid-shard, a request that is never answered). tools/bench_stream.py measures the trainer's input pipeline
against it; the tests check the retry policy of tryon_ds/data/remote.py on it.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FAULTS = ("ok", "503", "drop", "hang")


class ShardServer:
    """``faults``: file name -> the behaviour of its successive requests (one of FAULTS each; after the
    list, "ok"). ``bandwidth``: bytes per second per connection (None: unlimited)."""

    def __init__(self, folder: Path, latency_s: float = 0.0, bandwidth: float | None = None,
                 faults: dict[str, list[str]] | None = None):
        self.folder, self.latency_s, self.bandwidth = Path(folder), latency_s, bandwidth
        self.faults = defaultdict(list, {k: list(v) for k, v in (faults or {}).items()})
        self.requests: Counter = Counter()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the tests and the benchmark print what matters
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                with server._lock:
                    server.requests[name] += 1
                    fault = server.faults[name].pop(0) if server.faults[name] else "ok"
                time.sleep(server.latency_s)
                path = server.folder / name
                if fault == "hang":
                    server.stopping.wait()
                    return
                if fault == "503":
                    self.send_error(503, "Service Unavailable")
                    return
                if "/" in name or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                end = len(data) // 2 if fault == "drop" else len(data)
                chunk = 1 << 16
                try:
                    for start in range(0, end, chunk):
                        piece = data[start:min(start + chunk, end)]
                        self.wfile.write(piece)
                        if server.bandwidth:
                            time.sleep(len(piece) / server.bandwidth)
                except (BrokenPipeError, ConnectionResetError):  # the reader stopped (a loader shut down)
                    return
                if fault == "drop":
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the client sees a body shorter than announced

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self) -> "ShardServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
