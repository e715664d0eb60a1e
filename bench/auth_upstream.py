"""A stand-in core API and identity provider for the auth benchmarks, run as its own process:

    .venv/bin/python -m bench.auth_upstream --port P --secret S [--delay-ms 1] [--jwks-file F]

A lean HTTP/1.1 keep-alive server on raw asyncio streams (on uvloop, as the gateway), so that it
costs little CPU beside the gateway it serves: it parses the request line and headers, skips a
`Content-Length` body unread, and answers with a `Content-Length` body. Routes (GET only):

- `/check`: forward auth (`gateway.forward_auth`). The session arrives as
  `Authorization: Bearer <session>` (the gateway turns an `access_token` query parameter into
  that header) or as the cookie `session=<session>`; a session is the opaque string
  `<user>.<first 32 hex digits of HMAC-SHA256(secret, user)>` (`session_for`). After
  `delay_ms`, a valid one is answered `200 {"userId": user, "admin": false, "expiresAt": now +
  3600}` (epoch s), anything else `401`.
- `/jwks`: the JWKS JSON of `--jwks-file` as read at start (404 without one).
- `/stats`: `{"check": <requests to /check>, "jwks": <requests to /jwks>}` since start.

`AuthUpstream` starts it as a subprocess on a free port (pinned with `taskset`) and reads its
counters over HTTP.
"""

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import uvloop

from bench.targets.processes import PinnedProcess, wait_until_serving
from tests.services import free_port

SESSION_COOKIE = "session"
"""The name of the session cookie `/check` reads."""
SESSION_TTL_S = 3600
"""`expiresAt` of an admission: this many seconds from the answer."""
MAX_HEAD_BYTES = 65_536
"""Largest request line plus headers read; a longer head closes the connection."""
PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The checkout `python -m bench.auth_upstream` runs from."""

_REASONS = {200: b"OK", 401: b"Unauthorized", 404: b"Not Found", 405: b"Method Not Allowed"}
_UNAUTHORIZED = b'{"error":"unauthorized"}'


def _mac(secret: bytes, user: str) -> str:
    return hmac.new(secret, user.encode(), hashlib.sha256).hexdigest()[:32]


def session_for(secret: str, user: str) -> str:
    """The session string of `user` under `secret`: `<user>.<hmac-sha256 hex[:32]>`."""
    return f"{user}.{_mac(secret.encode(), user)}"


def session_user(secret: bytes, session: str) -> str | None:
    """The user a session string names when its MAC matches `secret` (constant-time
    comparison), else None."""
    user, dot, mac = session.rpartition(".")
    if not dot or not user:
        return None
    return user if hmac.compare_digest(mac.encode(), _mac(secret, user).encode()) else None


def session_of(headers: Mapping[str, str]) -> str | None:
    """The session a request carries: `Authorization: Bearer <session>` first, else the
    `session` cookie; None with neither (`headers`: lower-case names)."""
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None
    for pair in headers.get("cookie", "").split(";"):
        name, _, value = pair.strip().partition("=")
        if name == SESSION_COOKIE and value:
            return value
    return None


def response(status: int, body: bytes, *, close: bool = False) -> bytes:
    """One HTTP/1.1 response with a JSON `body` (`Connection: close` when `close`)."""
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (
        status,
        _REASONS.get(status, b"Unknown"),
        len(body),
    )
    return head + (b"Connection: close\r\n\r\n" if close else b"\r\n") + body


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """`(method, path without query, version, headers by lower-case name)` of a request head
    (request line and header lines, CRLF-separated). Raises ValueError when the request line
    is malformed."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return method, target.partition("?")[0], version, headers


class Upstream:
    """The server's state: `secret` for sessions, `delay_s` before each `/check` answer,
    `jwks` (the raw JWKS body or None) and the request counters."""

    def __init__(self, secret: str, delay_s: float, jwks: bytes | None) -> None:
        self.secret = secret.encode()
        self.delay_s = delay_s
        self.jwks = jwks
        self.checks = 0
        self.jwks_requests = 0

    async def check(self, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """The forward-auth answer for a request with `headers` (module docstring)."""
        self.checks += 1
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        session = session_of(headers)
        user = None if session is None else session_user(self.secret, session)
        if user is None:
            return 401, _UNAUTHORIZED
        expires = int(time.time()) + SESSION_TTL_S
        return 200, json.dumps({"userId": user, "admin": False, "expiresAt": expires}).encode()

    async def answer(self, method: str, path: str, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """`(status, body)` of one request."""
        if method != "GET":
            return 405, b'{"error":"GET only"}'
        if path == "/check":
            return await self.check(headers)
        if path == "/jwks" and self.jwks is not None:
            self.jwks_requests += 1
            return 200, self.jwks
        if path == "/stats":
            return 200, json.dumps({"check": self.checks, "jwks": self.jwks_requests}).encode()
        return 404, b'{"error":"not found"}'

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer the requests of one connection in turn until the client closes it, asks for
        `Connection: close` (or speaks HTTP/1.0 without keep-alive) or sends a bad head."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, version, headers = parse_head(head[:-4])
                length = int(headers.get("content-length", "0") or "0")
                if length:
                    await reader.readexactly(length)  # bodies are ignored
                connection = headers.get("connection", "").lower()
                close = connection == "close" or (
                    version == "HTTP/1.0" and connection != "keep-alive"
                )
                status, body = await self.answer(method, path, headers)
                writer.write(response(status, body, close=close))
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            pass  # the client went away, or sent what this server does not parse
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def serve(host: str, port: int, upstream: Upstream) -> None:
    """Listen on `host`:`port` and serve `upstream` until cancelled (or SIGTERM)."""
    server = await asyncio.start_server(upstream.serve, host, port, limit=MAX_HEAD_BYTES)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line (module docstring) and serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.auth_upstream", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=1.0, help="delay of each /check, ms")
    parser.add_argument("--secret", required=True, help="HMAC key of the sessions")
    parser.add_argument("--jwks-file", type=Path, help="JSON served at /jwks")
    args = parser.parse_args(argv)
    jwks = args.jwks_file.read_bytes() if args.jwks_file else None
    upstream = Upstream(args.secret, args.delay_ms / 1000, jwks)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.port, upstream))


class AuthUpstream:
    """`bench.auth_upstream` as a subprocess on a free port of 127.0.0.1, pinned with
    `taskset -c cpu` (None: the cpus this process may use), used as
    `async with AuthUpstream(secret, jwks=..., delay_ms=1, cpu="1") as upstream:`.

    `secret`: HMAC key of the sessions (`session`); `jwks`: the JWKS document served at
    `/jwks` (None: no such route); `delay_ms`: delay of each `/check` answer. `start` raises
    RuntimeError when the process exits or does not answer within 15 s."""

    def __init__(
        self,
        secret: str,
        *,
        jwks: Mapping[str, Any] | None = None,
        delay_ms: float = 1.0,
        cpu: str | None = None,
    ) -> None:
        self.secret = secret
        self.jwks = jwks
        self.delay_ms = delay_ms
        self.cpu = cpu or ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        self.port = 0
        self.dir = Path(tempfile.mkdtemp(prefix="auth-upstream-"))
        self.process: PinnedProcess | None = None
        self._http: httpx.AsyncClient | None = None

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:<port>`."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def check_url(self) -> str:
        """The forward-auth URL (`USERSTREAM_AUTH_URL`)."""
        return f"{self.base_url}/check"

    @property
    def jwks_url(self) -> str:
        """The JWKS URL (`USERSTREAM_JWT_JWKS_URL`)."""
        return f"{self.base_url}/jwks"

    def session(self, user: str) -> str:
        """A valid session of `user` (`session_for`)."""
        return session_for(self.secret, user)

    def pids(self) -> list[int]:
        """The server process (empty once it has exited or before `start`)."""
        return self.process.pids() if self.process is not None else []

    async def start(self) -> None:
        """Write the JWKS file, start the process and wait until `/stats` answers 200."""
        argv = [sys.executable, "-m", "bench.auth_upstream"]
        self.port = free_port()
        argv += ["--port", str(self.port), "--delay-ms", f"{self.delay_ms:g}"]
        argv += ["--secret", self.secret]
        if self.jwks is not None:
            path = self.dir / "jwks.json"
            path.write_text(json.dumps(self.jwks))
            argv += ["--jwks-file", str(path)]
        self.process = PinnedProcess(
            argv, cpu=self.cpu, log_path=self.dir / "upstream.log", cwd=PROJECT_ROOT
        )
        try:
            await wait_until_serving(self.process, "127.0.0.1", self.port, "/stats")
        except BaseException:
            await self.stop()
            raise
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=5)

    async def stats(self) -> dict[str, int]:
        """The request counters: `{"check": n, "jwks": n}`. Raises httpx.HTTPError when the
        server does not answer, RuntimeError before `start`."""
        if self._http is None:
            raise RuntimeError("the auth upstream is not started")
        answer = await self._http.get("/stats")
        answer.raise_for_status()
        counters: dict[str, int] = answer.json()
        return counters

    async def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 5 s) and close the HTTP client."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self.process is not None:
            await self.process.stop()
            self.process = None

    async def __aenter__(self) -> "AuthUpstream":
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


if __name__ == "__main__":
    main()
