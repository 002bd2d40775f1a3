"""A reverse proxy in front of an S3 server (moto) that throttles or fails requests on demand."""

from __future__ import annotations

import time
from urllib.parse import urlencode

import requests

from tests.emulators import Emulator, Fault, Request, Response

# Headers that describe one connection, not the message (RFC 9110 7.6.1), and those the
# proxy's own HTTP stack writes again for the forwarded message.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
ANSWERED_BY_BASE = HOP_BY_HOP | {"content-type", "content-encoding", "date", "server"}
# What S3 says about each injected status, in its own XML error format.
FAULT_CODES = {
    429: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


def s3_error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>").encode()


class S3FaultProxy(Emulator):
    """Forwards every request to `upstream` and returns its answer as is, unless a fault is
    injected: then the answer is S3's XML error (`<Code>SlowDown</Code>` for a 503), with the
    Retry-After given. A fault's `path_contains` is matched against the path and the query
    string, so a fault can pick the later pages of a listing ("continuation-token"); a 200
    fault lets one matching request through untouched, which lets a test fail the third page
    but not the second.
    """

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream.rstrip("/")

    def _take_fault(self, path: str) -> Fault | None:
        return None  # faults are taken in `handle`, where the query string is known

    def handle(self, request: Request) -> Response:
        query = urlencode(request.query, doseq=True)
        fault = Emulator._take_fault(self, f"{request.path}?{query}")
        if fault is not None:
            time.sleep(fault.delay_s)
            if fault.status != 200:
                code, message = FAULT_CODES.get(fault.status, (str(fault.status), "Injected."))
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                return Response(fault.status, s3_error(code, message), headers,
                                content_type="application/xml")
        return self.forward(request)

    def forward(self, request: Request) -> Response:
        query = urlencode(request.query, doseq=True)
        answer = requests.request(
            request.method, f"{self.upstream}{request.path}" + (f"?{query}" if query else ""),
            headers={k: v for k, v in request.headers.items() if k not in HOP_BY_HOP},
            data=request.body, allow_redirects=False, timeout=30)
        return Response(
            answer.status_code, answer.content,
            {k: v for k, v in answer.headers.items() if k.lower() not in ANSWERED_BY_BASE},
            content_type=answer.headers.get("Content-Type", "application/xml"))
