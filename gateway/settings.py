"""Configuration from environment variables (pydantic-settings).

`DATABASE_URL` and `REDIS_URL` keep their conventional names; everything else is
`USERSTREAM_<FIELD>` (e.g. `USERSTREAM_KEEPALIVE_S=15`). Units are in the names: `_s`
seconds, `_ms` milliseconds, `_bytes` bytes.
"""

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting of gateway, relay and demo; raises pydantic.ValidationError on bad values."""

    model_config = SettingsConfigDict(env_prefix="USERSTREAM_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "USERSTREAM_DATABASE_URL"),
        description="Postgres DSN; unset: an embedded Postgres in data_dir (one-process mode).",
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "USERSTREAM_REDIS_URL"),
        description="Redis URL; unset: the in-process bus (one process only).",
    )
    redis_prefix: str = Field("userstream:", description="Prefix of every Redis key.")
    bus: Literal["stream", "channels"] = Field(
        "stream",
        description="With Redis: `stream`, every replica reads every event from one Redis"
        " Stream; `channels`, each replica reads only its users' topics over sharded pub/sub,"
        " on a Redis Cluster or one Redis (sync/bus_channels.py).",
    )
    bus_drop_every: int = Field(
        0,
        ge=0,
        description="A fault for tests of the channel bus: the relay leaves out every n-th"
        " topic message (0: none).",
    )
    jwt_secret: SecretStr | None = Field(None, description="HS256 shared secret.")
    jwt_public_key: str | None = Field(None, description="PEM public key for RS256/ES256.")
    jwt_jwks_url: str | None = Field(
        None,
        description="JWKS URL of an identity provider: RS256/ES256/EdDSA keys chosen by the"
        " token's `kid` (gateway.jwks).",
    )
    jwks_min_refresh_s: float = Field(
        30.0,
        gt=0,
        description="Least seconds between JWKS fetches caused by an unknown `kid`.",
    )
    jwks_refresh_s: float = Field(
        300.0, gt=0, description="Period of the background JWKS refresh, seconds."
    )
    jwks_timeout_s: float = Field(5.0, gt=0, description="HTTP timeout of a JWKS fetch, seconds.")
    auth_url: str | None = Field(
        None,
        description="Forward auth: URL the core API answers `who is this?` at, sent each new"
        " stream's Cookie and Authorization headers (gateway.forward_auth); replaces the JWT"
        " settings.",
    )
    auth_timeout_s: float = Field(
        2.0, gt=0, description="Forward auth: time the upstream has to answer, seconds."
    )
    auth_cache_s: float = Field(
        30.0,
        ge=0,
        description="Forward auth: seconds an admission is reused for the same credential.",
    )
    auth_failure_cache_s: float = Field(
        5.0,
        ge=0,
        description="Forward auth: seconds a refusal (401/403) is reused for the same"
        " credential; at most `auth_cache_s`.",
    )
    auth_revalidate_s: float = Field(
        60.0,
        gt=0,
        description="Forward auth: open streams' credentials are asked again after this many"
        " seconds; a refused one ends its streams with `event: close` `unauthorized`.",
    )
    auth_max_connections: int = Field(
        100, gt=0, description="Forward auth: most connections to the upstream at once."
    )
    jwt_audience: str | None = Field(None, description="Required `aud` claim, if set.")
    jwt_issuer: str | None = Field(None, description="Required `iss` claim, if set.")
    jwt_leeway_s: float = Field(5.0, ge=0, description="Clock skew allowed on `exp`, seconds.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on (0: any free port).")
    keepalive_s: float = Field(15.0, gt=0, description="Interval of `: ping` comments, seconds.")
    retry_ms: int = Field(2000, ge=0, description="Smallest `retry:` sent to clients, ms.")
    retry_jitter_ms: int = Field(3000, ge=0, description="Random extra added to `retry:`, ms.")
    max_buffer_bytes: int = Field(
        1_048_576, gt=0, description="Bytes queued per connection before it is cut off."
    )
    send_timeout_s: float = Field(
        10.0, gt=0, description="Seconds a socket may accept nothing while data waits."
    )
    drain_s: float = Field(
        10.0,
        ge=0,
        description="On SIGTERM, window over which open streams are sent `close` (shutdown),"
        " spread out so their reconnects do not arrive at once, seconds.",
    )
    window_events: int = Field(
        10_000, gt=0, description="Recent events kept per gateway for catch-up."
    )
    catchup_page_size: int = Field(500, gt=0, description="Rows per catch-up read from Postgres.")
    degraded_poll_s: float = Field(
        0.5,
        gt=0,
        description="While the bus is unreadable, how often each gateway reads the outbox"
        " instead (degraded mode), seconds.",
    )
    relay_name: str = Field("default", description="Name of the relay's progress record.")
    relay_batch_size: int = Field(500, gt=0, description="Outbox rows per relay batch.")
    relay_poll_interval_s: float = Field(
        1.0, gt=0, description="Poll when no notification came, seconds."
    )
    relay_standby_retry_s: float = Field(
        1.0, gt=0, description="How often a standby relay tries to become active, seconds."
    )
    retention_s: float = Field(
        86_400.0, gt=0, description="Age past which the relay deletes outbox rows, seconds."
    )
    prune_batch_size: int = Field(1000, gt=0, description="Outbox rows deleted per prune step.")
    prune_interval_s: float = Field(
        60.0, gt=0, description="Pause between prune steps once caught up, seconds."
    )
    bus_max_batches: int = Field(
        10_000, gt=0, description="Batches the bus keeps (Redis stream MAXLEN ~)."
    )
    pool_max_size: int = Field(10, gt=0, description="Postgres connections per gateway process.")
    data_dir: str = Field(".userstream", description="Folder of the embedded Postgres.")
    log_format: Literal["console", "json"] = Field("console", description="Log line format.")
    log_level: str = Field("info", description="Python logging level name.")
    max_connections_per_user: int = Field(
        10, gt=0, description="Open streams one user may hold in one process; more get 429."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to call cross-origin, with credentials (comma-separated).",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve `/metrics` on this separate port (unset: on the main port only).",
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for `GET /admin/status` (unset: the endpoint is off)."
    )
    publish_token: SecretStr | None = Field(
        None,
        description="Bearer token of `POST /publish`, the HTTP publish endpoint for services"
        " that cannot reach the database (unset: the endpoint is off, 404).",
    )
    publish_max_bytes: int = Field(
        1_048_576,
        gt=0,
        description="Largest `POST /publish` body, bytes (1 MiB); a larger one gets 413.",
    )
    publish_max_events: int = Field(
        1000, gt=0, description="Most events in one `POST /publish`; more get 413."
    )
    ephemeral_rate: float = Field(
        10.0,
        gt=0,
        description="Signals one user may send to `POST /me/ephemeral` per second, per gateway"
        " process: the refill rate of the user's token bucket (PROTOCOL.md §5); more get 429.",
    )
    ephemeral_burst: int = Field(
        20,
        ge=1,
        description="Signals one user may send at once, per gateway process: the size of the"
        " user's token bucket (PROTOCOL.md §5).",
    )
    presence: bool = Field(
        True,
        description="Track who is online and send `event: presence` frames (PROTOCOL.md §5);"
        " false turns presence off entirely (no announcements, heartbeats or frames, and"
        " `GET /me/presence` answers 404).",
    )
    presence_grace_s: float = Field(
        10.0,
        ge=0,
        description="Seconds a user stays online after their last stream closed, so that a"
        " reconnect does not flap (PROTOCOL.md §5).",
    )
    presence_interval_s: float = Field(
        1.0,
        gt=0,
        description="Seconds between presence ticks: each workspace's changes are batched into"
        " at most one `event: presence` frame per interval per connection (PROTOCOL.md §5).",
    )
    presence_ttl_s: float = Field(
        6.0,
        gt=0,
        description="Seconds a replica's presence heartbeat lives on the bus (written every"
        " third of it): the users of a replica that dies go offline at most the TTL, a third"
        " of it and one interval after it died, within the grace of PROTOCOL.md §5 with the"
        " defaults (6 + 2 + 1 s < 10 s).",
    )
    status_interval_s: float = Field(
        5.0, gt=0, description="How often each replica reports its status to the bus, seconds."
    )
    with_relay: bool = Field(False, description="Run the outbox relay in the gateway process.")
    demo: bool = Field(False, description="Serve the /demo page and its token helper.")

    @field_validator(
        "database_url",
        "redis_url",
        "jwt_secret",
        "jwt_public_key",
        "jwt_jwks_url",
        "auth_url",
        "admin_token",
        "publish_token",
        "metrics_port",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @model_validator(mode="after")
    def _one_key_kind(self) -> "Settings":
        sources = (self.jwt_secret, self.jwt_public_key, self.jwt_jwks_url, self.auth_url)
        if sum(source is not None for source in sources) > 1:
            raise ValueError(
                "set only one of USERSTREAM_JWT_SECRET, USERSTREAM_JWT_PUBLIC_KEY,"
                " USERSTREAM_JWT_JWKS_URL and USERSTREAM_AUTH_URL"
            )
        if self.auth_failure_cache_s > self.auth_cache_s:
            raise ValueError(
                "USERSTREAM_AUTH_FAILURE_CACHE_S must not exceed USERSTREAM_AUTH_CACHE_S"
            )
        return self
