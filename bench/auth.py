"""Benchmark scenario `auth-storm`: the connect storm of `bench.scenarios.storm_run` under each
way the gateway can authenticate (gateway/auth.py, gateway/jwks.py, gateway/forward_auth.py),
on the userstream target only.

`storm_connections` connects, `storm_concurrency` in flight, `storm_rounds` rounds; in each
round, a fresh gateway per authenticator, in this order:

- `jwt-hs256`: the target's own HS256 secret (`USERSTREAM_JWT_SECRET`), the baseline;
- `jwt-rs256`: RS256 tokens checked with a static RSA-2048 public key
  (`USERSTREAM_JWT_PUBLIC_KEY`; the header's `kid` is there but not used);
- `jwks-rs256`: the same RS256 tokens, their key chosen by the header's `kid` from the JWKS
  of a stand-in identity provider (`USERSTREAM_JWT_JWKS_URL`), fetched at the gateway's start;
- `forward-cold` then `forward-warm`, on one gateway: forward auth (`USERSTREAM_AUTH_URL`)
  against a stand-in core API that answers each `/check` after 1 ms. Each connection carries
  its own opaque session in `access_token`, so the cold storm asks the upstream once per
  connect; the warm storm repeats the same requests once the cold storm's users have gone
  offline (presence grace + 2 intervals, then the gateway at rest), and is answered from the
  gateway's cache (`USERSTREAM_AUTH_CACHE_S` and `USERSTREAM_AUTH_REVALIDATE_S` 600 s: no
  answer expires, and no open stream is re-checked, during or between the two storms).

The JWT secret is blanked (`USERSTREAM_JWT_SECRET=""` counts as unset) wherever another key
source is set, since the gateway takes one only. Presence is on everywhere, with the sizes'
interval and grace (`bench.ephemeral.presence_env`). Tokens and sessions are made once per
scenario run and reused by every round. The stand-in (`bench.auth_upstream`, one process for
the whole scenario) runs pinned to the client cpu, beside the load client.

Rows: the connect-storm figures, plus `upstream_calls_per_conn` (the upstream's `/check`
requests during the storm / connects; 0 but on forward rows) and `jwks_fetches` (the provider's
`/jwks` requests from the gateway's start to the storm's end, the start-up fetch included).
`auth_summary` gives the means per variant and the ratios against the goals.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from bench.auth_upstream import AuthUpstream, session_for
from bench.ephemeral import presence_env
from bench.scenarios import (
    STORM_COLUMNS,
    Context,
    Report,
    Row,
    Setup,
    Sizes,
    cpu_seconds,
    mean_of,
    on_target,
    ratio_of,
    storm_note,
    storm_run,
    wait_quiet,
)
from bench.targets import Scope, Target
from bench.targets.userstream import JWT_SECRET, TOKEN_TTL_S

TARGET = "userstream"
"""The only target this scenario runs on: the baselines have no pluggable authentication."""

KID = "bench-rs256"
"""`kid` of the RS256 key, in the JWKS and in every RS256 token's header."""
SESSION_SECRET = "bench-session-secret"
"""HMAC key of the stand-in core API's sessions."""
UPSTREAM_DELAY_MS = 1.0
"""How long the stand-in core API takes to answer each `/check`, ms."""
AUTH_CACHE_S = 600
"""`USERSTREAM_AUTH_CACHE_S` and `USERSTREAM_AUTH_REVALIDATE_S` of the forward runs, seconds:
longer than both storms together, so the warm storm is answered from the cache and no
re-check calls the upstream meanwhile."""

SETTINGS = ("jwt-hs256", "jwt-rs256", "jwks-rs256", "forward")
"""The gateways of one round, in order; `forward` gives the rows `forward-cold` and
`forward-warm`."""
VARIANTS = ("jwt-hs256", "jwt-rs256", "jwks-rs256", "forward-cold", "forward-warm")
"""The rows of one round, in order."""

RATIO_GOALS = (
    ("forward-cold", "jwt-hs256", 0.8),
    ("forward-warm", "jwt-hs256", 0.8),
    ("jwks-rs256", "jwt-rs256", 0.9),
)
"""`(variant, baseline, goal)`: connects/s of the variant at least `goal` x the baseline's."""
WARM_CALLS_GOAL = 1.0
"""forward-warm: fewer upstream calls than this per connect (the cache answers)."""

MEAN_KEYS = (
    "connects_per_s",
    "connect_p50_ms",
    "connect_p99_ms",
    "server_cpu_ms_per_conn",
    "upstream_calls_per_conn",
    "upstream_cpu_ms_per_conn",
    "jwks_fetches",
)
"""The row figures `auth_summary` averages per variant."""
RATIO_KEYS = ("connects_per_s", "connect_p99_ms", "server_cpu_ms_per_conn")
"""The figures `auth_summary` compares (variant / baseline)."""

AUTH_STORM_COLUMNS = [
    ("round", "round"),
    ("variant", "auth"),
    *STORM_COLUMNS[1:],
    ("upstream_calls_per_conn", "upstream calls/conn"),
    ("jwks_fetches", "jwks fetches"),
]


@dataclass(frozen=True)
class Credentials:
    """Everything the variants connect with, for users `u0..u{n-1}`, made once per run:
    `hs256` paths (the target's secret), `rs256` paths (RS256, header `kid` = `KID`), `forward`
    paths (opaque sessions); the RSA key's `public_pem` (PEM, SubjectPublicKeyInfo), the
    `jwks` document served by the stand-in provider, and `signing_s`, the seconds it took."""

    hs256: list[str]
    rs256: list[str]
    forward: list[str]
    public_pem: str
    jwks: dict[str, Any]
    signing_s: float


def stream_path(credential: str) -> str:
    """`/me/stream?access_token=<credential>` (JWTs and sessions are URL-safe)."""
    return f"/me/stream?access_token={credential}"


def public_jwk(private: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    """The public JWK of `private` with `kid`, `alg` RS256 and `use` sig (RFC 7517)."""
    public = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return {**public, "kid": kid, "alg": "RS256", "use": "sig"}


def make_credentials(users: int, session_secret: str = SESSION_SECRET) -> Credentials:
    """Sign the tokens and make the sessions of `users` users (RS256 with a fresh RSA-2048 key:
    about 1 ms of CPU per token, so seconds for 10,000). Tokens expire in `TOKEN_TTL_S`."""
    began = time.monotonic()
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    hs256, rs256, forward = [], [], []
    for i in range(users):
        claims = {"sub": f"u{i}", "iat": now, "exp": now + TOKEN_TTL_S}
        hs256.append(stream_path(jwt.encode(claims, JWT_SECRET, algorithm="HS256")))
        signed = jwt.encode(claims, private, algorithm="RS256", headers={"kid": KID})
        rs256.append(stream_path(signed))
        forward.append(stream_path(session_for(session_secret, f"u{i}")))
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Credentials(
        hs256=hs256,
        rs256=rs256,
        forward=forward,
        public_pem=pem.decode(),
        jwks={"keys": [public_jwk(private, KID)]},
        signing_s=time.monotonic() - began,
    )


class GivenPaths:
    """A target whose `paths` are the given ones (the first `users` of them) instead of its
    own; everything else is the wrapped target's. Raises ValueError from `paths` when more are
    asked for than given."""

    def __init__(self, target: Target, paths: Sequence[str]) -> None:
        self.target = target
        self.given = list(paths)
        self.name = target.name
        self.ready_marker = target.ready_marker

    async def start(self, *, cpu: str, users: int, scope: Scope, workers: int = 1) -> None:
        """Start the wrapped target."""
        await self.target.start(cpu=cpu, users=users, scope=scope, workers=workers)

    def host_port(self) -> tuple[str, int]:
        """The wrapped target's address."""
        return self.target.host_port()

    def paths(self, users: int, scope: Scope) -> list[str]:
        """The first `users` given paths (the same for both scopes)."""
        if users > len(self.given):
            raise ValueError(f"{users} paths asked for, {len(self.given)} given")
        return self.given[:users]

    async def publish(self, scope: Scope, bodies: list[tuple[int, bytes]]) -> None:
        """Publish through the wrapped target."""
        await self.target.publish(scope, bodies)

    def server_pids(self) -> list[int]:
        """The wrapped target's processes."""
        return self.target.server_pids()

    async def stop(self) -> None:
        """Stop the wrapped target."""
        await self.target.stop()


def auth_env(
    setting: str, credentials: Credentials, upstream: AuthUpstream, sizes: Sizes
) -> dict[str, str]:
    """The gateway settings of one of `SETTINGS`: presence on with the sizes' interval and
    grace, plus the key source (the target's HS256 secret blanked for the others). Raises
    KeyError for an unknown setting."""
    sources = {
        "jwt-hs256": {},
        "jwt-rs256": {"USERSTREAM_JWT_PUBLIC_KEY": credentials.public_pem},
        "jwks-rs256": {"USERSTREAM_JWT_JWKS_URL": upstream.jwks_url},
        "forward": {
            "USERSTREAM_AUTH_URL": upstream.check_url,
            "USERSTREAM_AUTH_CACHE_S": str(AUTH_CACHE_S),
            "USERSTREAM_AUTH_REVALIDATE_S": str(AUTH_CACHE_S),
        },
    }
    source = sources[setting]
    blank = {"USERSTREAM_JWT_SECRET": ""} if source else {}
    return {**presence_env(True, sizes), **blank, **source}


async def variant_storm(
    ctx: Context,
    target: Target,
    upstream: AuthUpstream,
    paths: Sequence[str],
    variant: str,
    jwks_before: int,
) -> Row:
    """One storm of `storm_run` on a started `target` with `paths`: its row with `variant`,
    the upstream's `/check` requests during it (`upstream_calls`, per connect
    `upstream_calls_per_conn`), the upstream's CPU per connect (`upstream_cpu_ms_per_conn`,
    ms) and its `/jwks` requests since it read `jwks_before` (`jwks_fetches`)."""
    sizes = ctx.sizes
    n = sizes.storm_connections
    before = await upstream.stats()
    cpu0 = cpu_seconds(upstream.pids())
    row = await storm_run(ctx, GivenPaths(target, paths), n, sizes.storm_concurrency)
    cpu = cpu_seconds(upstream.pids()) - cpu0
    after = await upstream.stats()
    calls = after["check"] - before["check"]
    connects = row["connections"] or n
    row.update(
        variant=variant,
        upstream_calls=calls,
        upstream_calls_per_conn=calls / connects,
        upstream_cpu_ms_per_conn=cpu / connects * 1e3,
        jwks_fetches=after["jwks"] - jwks_before,
    )
    return row


async def settle(target: Target, sizes: Sizes) -> None:
    """After a storm's connections closed: wait until their users have gone offline (grace +
    2 presence intervals) and the gateway is at rest (`wait_quiet`, at most `quiet_s`)."""
    await asyncio.sleep(sizes.presence_grace_s + 2 * sizes.presence_interval_s)
    await wait_quiet(target, None, sizes.quiet_s)


def setting_body(
    ctx: Context, setting: str, credentials: Credentials, upstream: AuthUpstream, jwks_before: int
) -> Callable[[Target], Awaitable[list[Row]]]:
    """The `on_target` body of one of `SETTINGS`: one storm, or for `forward` the cold storm,
    `settle`, and the warm storm with the same paths on the same gateway."""
    paths = {
        "jwt-hs256": credentials.hs256,
        "jwt-rs256": credentials.rs256,
        "jwks-rs256": credentials.rs256,
        "forward": credentials.forward,
    }[setting]

    async def body(target: Target) -> list[Row]:
        if setting != "forward":
            return [await variant_storm(ctx, target, upstream, paths, setting, jwks_before)]
        cold = await variant_storm(ctx, target, upstream, paths, "forward-cold", jwks_before)
        await settle(target, ctx.sizes)
        warm = await variant_storm(ctx, target, upstream, paths, "forward-warm", jwks_before)
        return [cold, warm]

    return body


async def auth_storm(ctx: Context) -> Report:
    """The connect storm under each authenticator, `storm_rounds` rounds of `SETTINGS`, a
    fresh gateway each (module docstring); the means and ratios of `auth_summary`."""
    report = Report(AUTH_STORM_COLUMNS)
    sizes = ctx.sizes
    if TARGET not in ctx.targets:
        report.notes.append("userstream only; not among --targets")
        return report
    n = sizes.storm_connections
    credentials = await asyncio.to_thread(make_credentials, n)
    upstream = AuthUpstream(
        SESSION_SECRET, jwks=credentials.jwks, delay_ms=UPSTREAM_DELAY_MS, cpu=ctx.client_cpu
    )
    async with upstream:
        for round_no in range(1, sizes.storm_rounds + 1):
            for setting in SETTINGS:
                jwks_before = (await upstream.stats())["jwks"]
                body = setting_body(ctx, setting, credentials, upstream, jwks_before)
                setup = Setup(n, "broadcast", env=auth_env(setting, credentials, upstream, sizes))
                for row in await on_target(ctx, TARGET, setup, body):
                    report.rows.append({"round": round_no, "variant": setting, **row})
    report.summary.update(auth_summary(report.rows))
    report.summary["signing_s"] = round(credentials.signing_s, 2)
    report.notes.append(storm_note(sizes.storm_concurrency))
    report.notes.extend(auth_notes(report.summary, sizes, ctx.client_cpu, credentials.signing_s))
    return report


def auth_summary(rows: Sequence[Row]) -> dict[str, Any]:
    """Means of the auth-storm rows per variant (`MEAN_KEYS`, and `runs`; error rows left out),
    under `variants`; under `ratios`, for each `RATIO_GOALS` pair `"<variant>/<baseline>"`:
    the ratios of `RATIO_KEYS`, the `goal` on connects/s and `within_goal` (None without both
    means); `warm_upstream_calls_per_conn`: forward-warm's mean with its goal (< 1) and
    `within_goal`; `within_goal`: all four met (None when one is unknown)."""
    usable = [r for r in rows if "error" not in r and "ready" in r]
    means: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        mine = [r for r in usable if r.get("variant") == variant]
        means[variant] = {key: mean_of(mine, key) for key in MEAN_KEYS} | {"runs": len(mine)}
    ratios: dict[str, dict[str, Any]] = {}
    for variant, baseline, goal in RATIO_GOALS:
        figures = {key: ratio_of(means[variant][key], means[baseline][key]) for key in RATIO_KEYS}
        ratio = figures["connects_per_s"]
        within = None if ratio is None else ratio >= goal
        ratios[f"{variant}/{baseline}"] = figures | {"goal": goal, "within_goal": within}
    warm = means["forward-warm"]["upstream_calls_per_conn"]
    warm_calls = {
        "value": warm,
        "goal": f"< {WARM_CALLS_GOAL:g}",
        "within_goal": None if warm is None else warm < WARM_CALLS_GOAL,
    }
    verdicts = [r["within_goal"] for r in ratios.values()] + [warm_calls["within_goal"]]
    return {
        "variants": means,
        "ratios": ratios,
        "warm_upstream_calls_per_conn": warm_calls,
        "within_goal": None if None in verdicts else all(verdicts),
    }


def _verdict(within: bool | None) -> str:
    return {True: "goal met", False: "goal NOT met", None: "no figure"}[within]


def auth_notes(
    summary: Mapping[str, Any], sizes: Sizes, client_cpu: str, signing_s: float
) -> list[str]:
    """What the auth-storm table means, with the ratios of `auth_summary`."""
    ratios = []
    for name, figures in summary["ratios"].items():
        ratio = figures["connects_per_s"]
        if ratio is None:
            ratios.append(f"{name}: no ratio (a variant has no usable run)")
            continue
        ratios.append(
            f"{name} connects/s {ratio:.2f} (goal >= {figures['goal']:g}:"
            f" {_verdict(figures['within_goal'])}), ready p99"
            f" x{figures['connect_p99_ms'] or 0:.2f}, server CPU per connect"
            f" x{figures['server_cpu_ms_per_conn'] or 0:.2f}"
        )
    warm = summary["warm_upstream_calls_per_conn"]
    warm_text = "no figure" if warm["value"] is None else f"{warm['value']:.3f}"
    return [
        "auth: jwt-hs256 = the target's HS256 secret (baseline); jwt-rs256 = RS256 tokens, a"
        " static RSA-2048 public key (USERSTREAM_JWT_PUBLIC_KEY); jwks-rs256 = the same tokens,"
        " key by `kid` from the stand-in provider's JWKS (USERSTREAM_JWT_JWKS_URL, fetched at"
        " start-up); forward-cold = forward auth (USERSTREAM_AUTH_URL), a new session per"
        f" connect, each checked by the stand-in core API after {UPSTREAM_DELAY_MS:g} ms;"
        " forward-warm = the same requests again on the same gateway once the cold storm's"
        f" users went offline (presence grace {sizes.presence_grace_s:g} s + 2 intervals),"
        f" answered from the cache (USERSTREAM_AUTH_CACHE_S and _REVALIDATE_S {AUTH_CACHE_S} s)",
        "`upstream calls/conn` = the core API's /check requests during the storm / connects;"
        " `jwks fetches` = the provider's /jwks requests from the gateway's start to the"
        " storm's end (the start-up fetch included); the stand-in (bench/auth_upstream.py, one"
        f" process) runs on the client cpu {client_cpu}, beside the load client (its CPU per"
        " connect: `upstream_cpu_ms_per_conn` in the JSON); presence on in every run; tokens"
        f" and sessions made once for all rounds (RS256 signing took {signing_s:.1f} s)",
        "; ".join(ratios) + f"; forward-warm upstream calls per connect {warm_text} (goal"
        f" {warm['goal']}: {_verdict(warm['within_goal'])})",
    ]


SCENARIOS: dict[str, Callable[[Context], Awaitable[Report]]] = {"auth-storm": auth_storm}
"""This module's scenarios by name, run after those of `bench.ephemeral`."""

COLUMNS = {"auth-storm": AUTH_STORM_COLUMNS}
"""Each scenario's columns, as it prints them."""
