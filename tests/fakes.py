"""A scripted HTTP server on loopback, for quirks the emulator does not produce by itself.

Each route is a list of responses served in turn (the last one repeats). A response is
``(status, body, headers)`` where body is a dict (sent as JSON), bytes or str; or the string
``"drop"`` to close the connection without answering. Every request is recorded.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    """An ``http.server`` on 127.0.0.1 (a free port) served from a daemon thread while the
    ``with`` block runs; ``url`` is its base URL."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class ScriptedServer(LoopbackServer):
    def __init__(self):
        self.routes: dict[tuple[str, str], list] = {}
        self.requests: list[dict] = []
        super().__init__(self._handler_class())

    def route(self, method: str, path: str, *responses):
        self.routes[(method, path)] = list(responses)
        return self

    def calls(self, method: str, prefix: str = "") -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"].startswith(prefix)]

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                server.requests.append({"method": self.command, "path": path, "headers": dict(self.headers),
                                        "body": body})
                key = (self.command, path)
                if key not in server.routes:
                    key = next((k for k in server.routes if k[0] == self.command and k[1].endswith("*")
                                and path.startswith(k[1][:-1])), None)
                if key is None:
                    self._send(404, {"status": 404, "error": "Not Found"}, {})
                    return
                queue = server.routes[key]
                resp = queue.pop(0) if len(queue) > 1 else queue[0]
                if resp == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, payload, headers = (resp + ({},))[:3] if len(resp) == 2 else resp
                self._send(status, payload, headers)

            def _send(self, status, payload, headers):
                if isinstance(payload, (dict, list)):
                    data = json.dumps(payload).encode()
                    headers = {"Content-Type": "application/json", **headers}
                elif isinstance(payload, str):
                    data = payload.encode()
                else:
                    data = payload or b""
                self.send_response(status)
                headers.setdefault("x-request-id", "512340987612345678")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        return Handler


class StaticSite(LoopbackServer):
    """Answers every GET with one body (a photo for ``src_file_url`` sources); the ``with``
    block gets the base URL."""

    def __init__(self, body: bytes, content_type: str = "image/jpeg"):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(Handler)

    def __enter__(self) -> str:
        super().__enter__()
        return self.url
