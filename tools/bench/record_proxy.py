"""An HTTP proxy on the loopback that forwards nothing and records every request made through it: a process
started with HTTP_PROXY, HTTPS_PROXY and ALL_PROXY pointing here tells, by an empty record, that it reached
for no address beyond this machine (tests/test_app.py starts the web page under it). Each request is
answered 403, so a client that did reach out fails as it would offline.
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RecordingProxy:
    def __init__(self):
        self.requests: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _refuse(self):
                proxy.requests.append(f"{self.command} {self.path}")
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_HEAD = do_PUT = do_CONNECT = _refuse

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def environment(self) -> dict[str, str]:
        """What routes a process's HTTP(S) through this proxy (no exceptions: NO_PROXY emptied)."""
        return {name: self.url for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                            "all_proxy")} | {"NO_PROXY": "", "no_proxy": ""}

    def __enter__(self) -> "RecordingProxy":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
