"""Token verification rules (PROTOCOL.md §3): `sub` and `exp` required, keys by algorithm."""

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr

from gateway.auth import AuthError, JwksAuthenticator, JwtAuthenticator
from gateway.runtime import make_authenticator
from gateway.settings import Settings

SECRET = "unit-test-secret-long-enough-for-hs256"


def settings(**overrides: object) -> Settings:
    return Settings.model_validate({"jwt_secret": SecretStr(SECRET), **overrides})


def test_minted_token_verifies_and_carries_admin_claim() -> None:
    auth = JwtAuthenticator(settings())
    principal = auth.verify(auth.mint("alice", 60, system_role="admin"))
    assert principal.user_id == "alice" and principal.admin
    assert principal.expires_at == pytest.approx(time.time() + 60, abs=5)
    assert not auth.verify(auth.mint("bob", 60)).admin


@pytest.mark.parametrize(
    ("claims", "expires_in_s", "message"),
    [
        ({"sub": "alice"}, None, "exp"),
        ({}, 60, "sub"),
        ({"sub": "alice"}, -60, "token expired"),
        ({"sub": ""}, 60, "sub"),
    ],
)
def test_tokens_without_valid_sub_or_exp_are_refused(
    claims: dict[str, object], expires_in_s: int | None, message: str
) -> None:
    if expires_in_s is not None:  # computed when the test runs, not when it is collected
        claims = {**claims, "exp": int(time.time()) + expires_in_s}
    with pytest.raises(AuthError, match=message):
        JwtAuthenticator(settings()).verify(jwt.encode(claims, SECRET))


def test_token_signed_with_another_secret_is_refused() -> None:
    forged = jwt.encode(
        {"sub": "alice", "exp": int(time.time()) + 60},
        "another-secret-that-is-long-enough-for-hs256",
    )
    with pytest.raises(AuthError, match="invalid token"):
        JwtAuthenticator(settings()).verify(forged)


def test_alg_none_is_refused() -> None:
    unsigned = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none")
    with pytest.raises(AuthError, match="invalid token"):
        JwtAuthenticator(settings()).verify(unsigned)


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_public_key_verifies_rs256_and_es256(kind: str) -> None:
    private = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    auth = JwtAuthenticator(Settings.model_validate({"jwt_public_key": pem.decode()}))
    algorithm = "RS256" if kind == "rsa" else "ES256"
    signed = jwt.encode(
        {"sub": "carol", "exp": int(time.time()) + 60}, private, algorithm=algorithm
    )
    assert auth.verify(signed).user_id == "carol"
    with pytest.raises(ValueError, match="public key cannot sign"):
        auth.mint("carol")


def test_audience_and_issuer_are_enforced_when_configured() -> None:
    auth = JwtAuthenticator(settings(jwt_audience="app", jwt_issuer="core"))
    good = jwt.encode(
        {"sub": "a", "exp": int(time.time()) + 60, "aud": "app", "iss": "core"}, SECRET
    )
    assert auth.verify(good).user_id == "a"
    with pytest.raises(AuthError):
        auth.verify(
            jwt.encode(
                {"sub": "a", "exp": int(time.time()) + 60, "aud": "x", "iss": "core"}, SECRET
            )
        )


def test_no_key_configured_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="USERSTREAM_JWT_SECRET"):
        JwtAuthenticator(Settings.model_validate({}))


def test_secret_and_public_key_together_are_refused() -> None:
    with pytest.raises(ValueError, match="only one of"):
        Settings.model_validate({"jwt_secret": "s", "jwt_public_key": "k"})


def test_jwks_url_with_another_key_source_is_refused() -> None:
    with pytest.raises(ValueError, match="only one of"):
        Settings.model_validate({"jwt_public_key": "k", "jwt_jwks_url": "http://idp/jwks"})


def test_jwks_url_selects_the_jwks_authenticator() -> None:
    auth = make_authenticator(Settings.model_validate({"jwt_jwks_url": "http://idp/jwks"}))
    assert isinstance(auth, JwksAuthenticator)
    assert isinstance(make_authenticator(settings()), JwtAuthenticator)
