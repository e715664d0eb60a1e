"""An identity provider for tests: signing keys (RS256, ES256, EdDSA) and a real HTTP server
that publishes their public halves as a JWKS (RFC 7517), counts its requests, can answer 503
or be stopped, and can swap its key set (rotation)."""

import http.server
import json
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


class JwksServer:
    """`GET /jwks` on 127.0.0.1 (a thread of `http.server`): the public JWKs of `keys`.
    `requests` counts the requests served, `delay_s` delays each answer, `failing` answers
    503; `stop()` closes the socket (connections refused) and `start()` reopens it on the
    same port."""

    def __init__(self, keys: list[SigningKey]) -> None:
        self.keys = list(keys)
        self.requests = 0
        self.delay_s = 0.0
        self.failing = False
        self.port = free_port()
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The JWKS URL."""
        return f"http://127.0.0.1:{self.port}/jwks"

    def start(self) -> "JwksServer":
        """Listen (again) on `port`."""
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.requests += 1
                time.sleep(owner.delay_s)
                if owner.failing:
                    self.send_error(503)
                    return
                body = json.dumps({"keys": [key.jwk() for key in owner.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening; fetches now fail with connection refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
