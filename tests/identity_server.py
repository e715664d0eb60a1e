"""An identity provider and core API for tests: signing keys (RS256, ES256, EdDSA) and a real
HTTP server that publishes their public halves as a JWKS (RFC 7517) and answers forward-auth
checks of server-side sessions, counts its requests, can be slowed, fail or be stopped, swap its
key set (rotation) and revoke sessions."""

import contextlib
import http.cookies
import http.server
import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.services import free_port


@dataclass(frozen=True)
class SigningKey:
    """A private key, its `kid` and algorithm (`RS256`, `ES256` or `EdDSA`)."""

    kid: str
    algorithm: str
    private: Any

    @classmethod
    def generate(cls, kid: str, algorithm: str = "RS256") -> "SigningKey":
        """A fresh key pair for `algorithm`."""
        private: Any
        if algorithm == "RS256":
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif algorithm == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        elif algorithm == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(f"unsupported algorithm {algorithm}")
        return cls(kid, algorithm, private)

    def jwk(self) -> dict[str, Any]:
        """The public JWK, with `kid`, `alg` and `use: sig`."""
        codec: Any = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[
            self.algorithm
        ]
        public = codec.to_jwk(self.private.public_key(), as_dict=True)
        return {**public, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def sign(self, user_id: str, ttl_s: float = 600, kid: str | None = None, **claims: Any) -> str:
        """A token for `user_id` signed with this key, its header naming `kid` (this key's
        own unless given)."""
        now = int(time.time())
        payload = {"sub": user_id, "iat": now, "exp": now + int(ttl_s), **claims}
        headers = {"kid": kid or self.kid}
        return jwt.encode(payload, self.private, algorithm=self.algorithm, headers=headers)


SESSION_COOKIE = "session"
"""The name of the session cookie `/check` reads."""


class IdentityServer:
    """A real HTTP server on 127.0.0.1 (a thread of `http.server`):
    - `GET /jwks`: the public JWKs of `keys` (`url`);
    - `GET /check` (`check_url`): the forward-auth answer for the session in the `session`
      cookie or `Authorization: Bearer`: 200 with `sessions[session]` as JSON, else 401.
      `check_status` / `check_body`, when set, replace every answer's status / raw body;
      `check_headers` are added to every answer (e.g. `Set-Cookie`), and with `split_at` the
      body goes in two parts, its first `split_at` bytes, then the rest 50 ms later.

    `jwks_requests` and `check_requests` count the requests served, `forwarded` keeps the
    `Cookie` and `Authorization` headers of each check; `delay_s` delays each answer, `failing`
    answers 503; `stop()` closes the socket (connections refused) and `start()` reopens it on
    the same port."""

    def __init__(self, keys: list[SigningKey] | None = None) -> None:
        self.keys = list(keys or [])
        self.sessions: dict[str, dict[str, Any]] = {}
        self.jwks_requests = 0
        self.check_requests = 0
        self.forwarded: list[dict[str, str]] = []
        self.delay_s = 0.0
        self.failing = False
        self.check_status: int | None = None
        self.check_body: bytes | None = None
        self.check_headers: dict[str, str] = {}
        self.split_at: int | None = None
        self.port = free_port()
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    @property
    def url(self) -> str:
        """The JWKS URL."""
        return f"http://127.0.0.1:{self.port}/jwks"

    @property
    def check_url(self) -> str:
        """The forward-auth URL."""
        return f"http://127.0.0.1:{self.port}/check"

    def session(self, user_id: str, **answer: Any) -> str:
        """A new session of `user_id` (its secret value); `/check` answers it with
        `{"userId": user_id, **answer}`."""
        value = f"sess-{secrets.token_urlsafe(16)}"
        self.sessions[value] = {"userId": user_id, **answer}
        return value

    def revoke(self, session: str) -> None:
        """End `session`: `/check` answers 401 for it from now on."""
        self.sessions.pop(session, None)

    def _check(self, headers: Any) -> tuple[int, bytes]:
        forwarded = {name: headers[name] for name in ("Cookie", "Authorization") if headers[name]}
        with self._lock:
            self.check_requests += 1
            self.forwarded.append(forwarded)
        session = ""
        cookies = http.cookies.SimpleCookie(forwarded.get("Cookie", ""))
        if SESSION_COOKIE in cookies:
            session = cookies[SESSION_COOKIE].value
        scheme, _, token = forwarded.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            session = token
        answer = self.sessions.get(session)
        status = 200 if answer is not None else 401
        body = json.dumps(answer if answer is not None else {"error": "no session"}).encode()
        if self.check_status is not None:
            status = self.check_status
        if self.check_body is not None:
            body = self.check_body
        return status, body

    def start(self) -> "IdentityServer":
        """Listen (again) on `port`."""
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the gateway's client expects

            def setup(self) -> None:
                super().setup()
                with owner._lock:
                    owner._connections.add(self.connection)

            def finish(self) -> None:
                with owner._lock:
                    owner._connections.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                path = self.path.partition("?")[0]
                headers = {"Content-Type": "application/json"}
                if path == "/check":
                    status, body = owner._check(self.headers)
                    headers |= owner.check_headers
                elif path == "/jwks":
                    with owner._lock:
                        owner.jwks_requests += 1
                    status = 200
                    body = json.dumps({"keys": [key.jwk() for key in owner.keys]}).encode()
                else:
                    status, body = 404, b"{}"
                time.sleep(owner.delay_s)
                if owner.failing:
                    status, body = 503, b"{}"
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                first = body if owner.split_at is None else body[: owner.split_at]
                with contextlib.suppress(OSError):  # the client may stop reading early
                    self.wfile.write(first)
                    if len(first) < len(body):
                        time.sleep(0.05)
                        self.wfile.write(body[len(first) :])

            def log_message(self, format: str, *args: Any) -> None:
                return None

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close the open connections; requests now fail with connection
        refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
