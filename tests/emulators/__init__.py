"""Wire-level emulators of source systems that cannot run here, served on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    """One request as the emulator saw it: what the real client library sent."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default


@dataclass
class Response:
    status: int = 200
    body: Any = None  # dict/list -> JSON, bytes -> as is, str -> text
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def encoded(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return b"" if self.body is None else json.dumps(self.body).encode()


@dataclass
class Fault:
    """A response forced on the next matching requests (throttling, outages, slowness)."""

    status: int
    times: int = 1
    retry_after: str | None = None
    delay_s: float = 0.0
    path_contains: str = ""


class Emulator:
    """A threaded HTTP server on 127.0.0.1: subclasses answer in `handle`.

    Every request is logged (`requests`), and `inject` queues faults, so a test can check
    that a client obeyed a Retry-After or gave up with a clear error.
    """

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.faults: deque[Fault] = deque()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- subclass API -------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "the emulator is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                emulator._serve(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_MERGE = _serve

            def log_message(self, format: str, *args: object) -> None:
                pass  # the request log is `emulator.requests`

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Emulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults and the request log ----------------------------------------------------------------

    def inject(self, status: int, times: int = 1, retry_after: str | None = None,
               delay_s: float = 0.0, path_contains: str = "") -> None:
        with self._lock:
            self.faults.append(Fault(status, times, retry_after, delay_s, path_contains))

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.path_contains in path:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                    return fault
        return None

    def requests_to(self, path_contains: str) -> list[Request]:
        return [r for r in self.requests if path_contains in r.path]

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        split = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        request = Request(handler.command, split.path,
                          parse_qs(split.query, keep_blank_values=True),
                          {k.lower(): v for k, v in handler.headers.items()},
                          handler.rfile.read(length) if length else b"")
        with self._lock:
            self.requests.append(request)
        fault = self._take_fault(split.path)
        if fault is not None:
            time.sleep(fault.delay_s)
            if fault.status == 200:  # a slow but good answer
                response = self.handle(request)
            else:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                response = Response(fault.status, {"error": "injected fault"}, headers)
        else:
            try:
                response = self.handle(request)
            except Exception as error:  # an emulator bug must show in the test, not hang it
                response = Response(500, {"error": f"emulator: {error!r}"})
        body = response.encoded()
        handler.send_response(response.status)
        handler.send_header("Content-Type", response.content_type)
        handler.send_header("Content-Length", str(len(body)))
        for name, value in response.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)
