"""canaryd's demo service: a small HTTP shop traced with the OpenTelemetry Python SDK.

Run as a service (the default), it answers GET /api/items, /api/cart and POST /api/checkout on
PORT (8000), each request one SERVER span with the HTTP semantic-convention attributes, exported
over OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT with the resource OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES say (service.version, deployment.environment.name). FAULT_RATE (0 to 1)
is the share of requests that fail with 500: set it on the canary to watch canaryd roll it back.

Run as `app.py traffic URL [PER_SECOND]`, it is the demo's client instead: it sends requests to
URL (HAProxy in compose.yaml) at a steady pace, forever, printing a line per 100 answers.
"""

from __future__ import annotations

import os
import random
import sys
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROUTES = {("GET", "/api/items"), ("GET", "/api/cart"), ("POST", "/api/checkout")}


def serve() -> None:
    # Imported here: the traffic client needs only the standard library.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind, Status, StatusCode

    fault_rate = float(os.environ.get("FAULT_RATE", "0"))
    if not 0.0 <= fault_rate <= 1.0:
        sys.exit(f"FAULT_RATE must be between 0 and 1, not {fault_rate}")
    port = int(os.environ.get("PORT", "8000"))
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the exporter reads
    # OTEL_EXPORTER_OTLP_ENDPOINT (and appends /v1/traces).
    provider = TracerProvider(resource=Resource.create())
    # Short export delay: canaryd judges on the spans' own time, but a span it has not received
    # cannot count.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=500))
    tracer = provider.get_tracer("canaryd-demo")
    version = provider.resource.attributes.get("service.version", "unknown")

    class Handler(BaseHTTPRequestHandler):
        def handle_one(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            if (method, path) not in ROUTES:
                self.answer(404, b"no such route\n")
                return
            with tracer.start_as_current_span(f"{method} {path}", kind=SpanKind.SERVER) as span:
                span.set_attribute("http.request.method", method)
                span.set_attribute("http.route", path)
                span.set_attribute("url.scheme", "http")
                status = 500 if random.random() < fault_rate else 200
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                span.set_attribute("http.response.status_code", status)
                self.answer(status, f"{version}\n".encode())

        def answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.handle_one("GET")

        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            self.handle_one("POST")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print(f"demo shop {version} on :{port}, failing {fault_rate:.0%} of requests", flush=True)
    try:
        server.serve_forever()
    finally:
        provider.shutdown()


def traffic(url: str, per_second: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    paths = [("GET", "/api/items"), ("GET", "/api/items"), ("GET", "/api/cart"), ("POST", "/api/checkout")]
    answers: dict[str, int] = {}
    sent = 0
    while True:
        method, path = random.choice(paths)
        request = urllib.request.Request(url.rstrip("/") + path, method=method, data=b"{}" if method == "POST" else None)
        try:
            with opener.open(request, timeout=5) as response:
                key = f"{response.status} {response.read().decode().strip()}"
        except urllib.error.HTTPError as error:
            key = f"{error.code} {error.read().decode().strip()}"
        except OSError as error:
            key = f"unreachable ({error.__class__.__name__})"
        answers[key] = answers.get(key, 0) + 1
        sent += 1
        if sent % 100 == 0:
            print(f"{sent} requests: {dict(sorted(answers.items()))}", flush=True)
            answers.clear()
        time.sleep(1.0 / per_second)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "traffic":
        traffic(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 20.0)
    elif len(sys.argv) == 1:
        serve()
    else:
        sys.exit("usage: app.py | app.py traffic URL [PER_SECOND]")
