"""A local HTTP server that speaks Azure AI Content Safety's `text:analyze` REST shape (api-version
2023-10-01), for the screening tests: the real service cannot be reached from here.

A text's severity for a category is 4 (medium) where it holds `FLAG-<category>`, 2 (low) where it holds
`LOW-<category>`, else 0. `fail` makes every call a 500; `flag_after` flags every call past that many;
`delay_s` holds each answer.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mixtral_endpoint.serving.safety import CATEGORIES


class FakeContentSafety:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []  # each request's body, with its key header
        self.fail = False
        self.flag_after: int | None = None
        self.delay_s = 0.0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the service: the client reuses its connection
            disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.calls.append({**body, "key": self.headers.get("Ocp-Apim-Subscription-Key"),
                                   "path": self.path})
                time.sleep(fake.delay_s)
                if fake.fail or not self.path.split("?")[0].endswith("/text:analyze"):
                    self._answer(500, {"error": {"code": "InternalServerError", "message": "fake outage"}})
                    return
                over = fake.flag_after is not None and len(fake.calls) > fake.flag_after
                analysis = [{"category": c, "severity": 4 if over or f"FLAG-{c}" in body["text"] else
                             2 if f"LOW-{c}" in body["text"] else 0} for c in body.get("categories") or CATEGORIES]
                self._answer(200, {"blocklistsMatch": [], "categoriesAnalysis": analysis})

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        self.calls.clear()
        self.fail = False
        self.flag_after = None
        self.delay_s = 0.0

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
