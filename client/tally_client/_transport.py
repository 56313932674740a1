"""The one I/O edge: POST a body over a kept-alive HTTP/1.1 connection (http.client)."""

from __future__ import annotations

import http.client
import ssl
import urllib.parse
from dataclasses import dataclass

from tally_client import __version__

USER_AGENT = f"tally-client-python/{__version__}"


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    retry_after: str | None
    body: bytes


class Transport:
    """Not thread-safe: one per delivery worker."""

    def __init__(self, base_url: str, *, path: str, api_key: str | None, timeout: float) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base URL {base_url!r} must be http(s)://host[:port][/prefix]")
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port
        self.path = url.path.rstrip("/") + path
        self._timeout = timeout
        self._headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=ssl.create_default_context()
                )
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return self._conn

    def post(self, body: bytes, *, key: str, gzipped: bool) -> Response:
        """One attempt. Raises OSError / http.client.HTTPException when no whole answer came back
        (the connection is then dropped, and the next attempt opens a new one)."""
        headers = dict(self._headers, **{"Idempotency-Key": key, "Content-Length": str(len(body))})
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        conn = self._connection()
        try:
            conn.request("POST", self.path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        except BaseException:
            self.close()
            raise
        if answer.will_close:
            self.close()
        return Response(answer.status, answer.getheader("Retry-After"), data)

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
