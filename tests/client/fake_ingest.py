"""A scripted stand-in for ingest (stdlib http.server in a thread), for the client's behaviour
tests: each request takes the next scripted answer; every request is recorded."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CUT = "cut"  # close the connection without answering


@dataclass
class Seen:
    headers: dict[str, str]
    raw: bytes

    @property
    def doc(self) -> dict[str, Any]:
        body = gzip.decompress(self.raw) if self.headers.get("content-encoding") == "gzip" else self.raw
        out: dict[str, Any] = json.loads(body)
        return out

    @property
    def key(self) -> str:
        return self.headers["idempotency-key"]


Answer = tuple[int, dict[str, str], dict[str, Any] | None] | str


@dataclass
class Fake:
    url: str = ""
    script: list[Answer] = field(default_factory=list)
    # When the script is spent: accept everything.
    default: Callable[[Seen], Answer] = lambda seen: (202, {}, {"accepted": len(seen.doc["events"]), "rejected": []})
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def events(self) -> list[dict[str, Any]]:
        return [e for s in self.seen for e in s.doc["events"]]


@contextmanager
def fake_ingest(script: list[Answer] | None = None) -> Iterator[Fake]:
    fake = Fake(script=list(script or []))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["content-length"]))
            seen = Seen({k.lower(): v for k, v in self.headers.items()}, raw)
            seen.headers[":path"] = self.path
            with fake.lock:
                fake.seen.append(seen)
                answer = fake.script.pop(0) if fake.script else fake.default(seen)
            if answer == CUT:
                self.close_connection = True
                self.connection.close()
                return
            assert not isinstance(answer, str)
            status, headers, doc = answer
            body = b"" if doc is None else json.dumps(doc).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
