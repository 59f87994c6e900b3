"""The demo's workloads: a small HTTP service and a client, run as pod commands.

``python -m membrane.lab.demoapp deathstar`` serves the Star Wars demo's Death Star (the same
API as Cilium's demo image); ``python -m membrane.lab.demoapp request METHOD URL`` prints the
reply, or a one-line reason when there is none.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROUTES = {
    ("GET", "/"): (200, "Welcome to the Death Star\n"),
    ("GET", "/v1"): (200, "Death Star API: POST /v1/request-landing, PUT /v1/exhaust-port\n"),
    ("POST", "/v1/request-landing"): (200, "Ship landed\n"),
    ("PUT", "/v1/exhaust-port"): (503, "Panic: deathstar exploded\n"),
}


class DeathStar(BaseHTTPRequestHandler):
    server_version = "deathstar/1.0"

    def _answer(self) -> None:
        status, body = ROUTES.get((self.command, self.path), (404, "Not found\n"))
        payload = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(f"{self.client_address[0]} {format % args}\n")
        sys.stdout.flush()


def serve(port: int = 80) -> None:
    ThreadingHTTPServer(("0.0.0.0", port), DeathStar).serve_forever()


def request(method: str, url: str, timeout: float = 3.0) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=timeout) as reply:
            sys.stdout.write(reply.read().decode())
    except urllib.error.HTTPError as exc:
        sys.stdout.write(exc.read().decode() or f"HTTP {exc.code}\n")
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        sys.stdout.write(f"no reply: {reason}\n")
        return 1
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["deathstar"]:
        serve(int(argv[1]) if len(argv) > 1 else 80)
        return 0
    if argv[:1] == ["request"] and len(argv) == 3:
        return request(argv[1], argv[2])
    sys.stderr.write("usage: demoapp deathstar [PORT] | demoapp request METHOD URL\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
