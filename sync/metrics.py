"""Prometheus metrics of a userstream process (prometheus-client, its default registry).

Names follow Prometheus conventions (prometheus.io/docs/practices/naming): a `_total` suffix
on counters (prometheus-client appends it), base units in the name (`_seconds`, `_bytes`).
Each process exposes its own figures; run one gateway process per pod or container and let
Prometheus sum across replicas (with `userstream serve --workers N`, a scrape reaches one
worker at random).

Hot paths count in bulk: the dispatcher adds one event's deliveries with one `inc(n)`, and a
stream observes commit-to-write latency once per socket write, not once per frame.
"""

import bisect
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric


class LoopHistogram:
    """A Prometheus histogram for the event loop's hot path: `observe` is one bisect and two
    additions, with no lock (prometheus-client's `Histogram.observe` takes a lock per bucket
    and for the sum; in the per-write path it cost 3 % of a saturated gateway's CPU,
    bench/RESULTS.md). Observe from one thread only (the event loop); a scrape from the
    metrics server's thread copies the counts, and at worst misses an observation in flight.

    `buckets`: increasing upper bounds (`le`), without +Inf; ValueError otherwise. Registered
    in `registry` (the default one unless given). Exposed as `<name>_bucket`, `_count`, `_sum`.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if not bounds or bounds != sorted(set(bounds)) or bounds[-1] == float("inf"):
            raise ValueError(f"buckets must increase and exclude +Inf, got {buckets}")
        self.name = name
        self.documentation = documentation
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        """Count one observation of `value` (in the histogram's unit)."""
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def describe(self) -> Iterable[Metric]:
        """The metric family without samples (lets the registry check names at register)."""
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[Metric]:
        """The cumulative buckets, count and sum as one histogram family."""
        counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, count in zip([*self._bounds, float("inf")], counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


CONNECTIONS = Gauge("userstream_connections", "Open /me/stream connections in this process.")
CONNECTS = Counter("userstream_connects", "/me/stream connections accepted (after auth).")
DISCONNECTS = Counter(
    "userstream_disconnects",
    "/me/stream connections ended, by reason: client (it went away), shutdown, slow_consumer,"
    " send_timeout, token_expired, unauthorized (forward auth revoked the session), resync,"
    " unavailable (Postgres failed during catch-up).",
    ["reason"],
)
REJECTED = Counter(
    "userstream_rejected_connects",
    "/me/stream requests refused before streaming, by HTTP status (400, 401, 429, 503).",
    ["status"],
)
AUTH_UPSTREAM = Counter(
    "userstream_auth_upstream_calls",
    "Forward-auth calls to USERSTREAM_AUTH_URL, by outcome: principal (admitted), refusal"
    " (401/403), unavailable (timeout, connection failure, another status or body).",
    ["outcome"],
)
AUTH_CACHE = Counter(
    "userstream_auth_cache_lookups",
    "Forward-auth cache lookups for new requests, by result: hit or miss (a miss joins or"
    " starts an upstream call).",
    ["result"],
)
BUS_EVENTS = Counter("userstream_bus_events", "Events received from the bus by the dispatcher.")
DELIVERIES = Counter(
    "userstream_deliveries", "Change frames queued to subscribers' send buffers (live fan-out)."
)
DENIED = Counter(
    "userstream_events_denied",
    "Event x subscriber pairs on an event's channel that access rules withheld (PROTOCOL.md §2).",
)
SEND_BUFFER_BYTES = Gauge(
    "userstream_send_buffer_bytes",
    "Bytes queued for subscribers and not yet accepted by their sockets, all connections.",
)
SLOW_CONSUMERS = Counter(
    "userstream_slow_consumer_disconnects",
    "Subscribers cut off because their send buffer passed USERSTREAM_MAX_BUFFER_BYTES.",
)
COMMIT_TO_WRITE = LoopHistogram(
    "userstream_commit_to_write_seconds",
    "From an outbox row's commit to the socket write carrying its frame (oldest frame of each"
    " write), seconds.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CATCHUP_EVENTS = Histogram(
    "userstream_catchup_events",
    "Events replayed to a connection that resumed from a cursor (window and Postgres pages).",
    buckets=(0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000),
)
BUS_RECEIVED_BYTES = Counter(
    "userstream_bus_received_bytes",
    "Bytes of pub/sub messages received from the channel bus, by kind: topic messages (the"
    " replica's own topics) and ticks (every node's, for every batch).",
    ["kind"],
)
BUS_RECEIVED_EVENTS = Counter(
    "userstream_bus_received_events",
    "Events decoded from the topic messages of the channel bus (the replica's own topics).",
)
BUS_TOPICS = Gauge(
    "userstream_bus_topics", "Topics (user:, workspace:) this replica reads on the channel bus."
)
BUS_DEGRADED = Gauge(
    "userstream_bus_degraded",
    "1 while this gateway cannot read the bus and reads the Postgres outbox instead"
    " (every USERSTREAM_DEGRADED_POLL_S), else 0.",
)
DEGRADED_EVENTS = Counter(
    "userstream_degraded_events",
    "Events the dispatcher read from the Postgres outbox while the bus was unreadable.",
)
GAP_FILLS = Counter(
    "userstream_gap_fills", "Gaps in the bus (lost batches) filled from the Postgres outbox."
)
RELAY_BATCHES = Counter("userstream_relay_batches", "Batches the relay published to the bus.")
RELAY_EVENTS = Counter("userstream_relay_events", "Events the relay published to the bus.")
RELAY_LAG_ROWS = Gauge(
    "userstream_relay_lag_rows", "Committed outbox rows not yet relayed (active relay only)."
)
RELAY_LAG_SECONDS = Gauge(
    "userstream_relay_lag_seconds",
    "Age of the oldest committed outbox row not yet relayed, seconds (active relay only).",
)
RELAY_SLOT_RETAINED_BYTES = Gauge(
    "userstream_relay_slot_retained_bytes",
    "WAL the replication slot keeps on the server's disk, bytes (wal ingest, active relay).",
)
RELAY_SLOT_LAG_BYTES = Gauge(
    "userstream_relay_slot_lag_bytes",
    "WAL written since the slot's last acknowledged LSN, bytes (wal ingest, active relay).",
)
DEAD_LETTERS = Counter(
    "userstream_dead_letters",
    "Malformed outbox rows the relay moved past, each kept in outbox_dead_letters.",
)
PUBLISH_REQUESTS = Counter(
    "userstream_publish_requests",
    "POST /publish requests, by the HTTP status answered (202, 400, 401, 404, 413, 422, 503, 500).",
    ["status"],
)
PUBLISHED_EVENTS = Counter(
    "userstream_published_events", "Events committed to the outbox through POST /publish."
)
SIGNALS_RECEIVED = Counter(
    "userstream_signals_received",
    "Ephemeral signals accepted by this process (POST /me/ephemeral answered 202, and the"
    " ephemeral events of POST /publish), PROTOCOL.md §5.",
)
SIGNALS_REFUSED = Counter(
    "userstream_signals_refused",
    "POST /me/ephemeral requests refused, by reason: bad_request (400), unauthorized (401),"
    " forbidden (403), too_large (413), rate_limited (429), unavailable (503: Postgres failed"
    " while the sender's access was loaded).",
    ["reason"],
)
SIGNALS_LOST = Counter(
    "userstream_signals_lost",
    "Accepted signals the bus could not carry to the replicas (Redis down or slow): lost.",
)
SIGNAL_FRAMES = Counter(
    "userstream_signal_frames",
    "`ephemeral` frames queued to subscribers' send buffers (signal fan-out).",
)
PRESENCE_FRAMES = Counter(
    "userstream_presence_frames",
    "`presence` frames queued to subscribers' send buffers (at most one per workspace per"
    " connection per USERSTREAM_PRESENCE_INTERVAL_S), PROTOCOL.md §5.",
)
PRESENCE_PUBLISHED = Counter(
    "userstream_presence_announcements_published",
    "Presence announcements this process published to the other replicas: changes of the"
    " (workspace, user) pairs it vouches for, and its full set after the bus came back.",
)
PRESENCE_RECEIVED = Counter(
    "userstream_presence_announcements_received",
    "Presence announcements of other replicas applied by this process (its own, and stale"
    " ones, are not counted).",
)
PRESENCE_ONLINE_USERS = Gauge(
    "userstream_presence_online_users",
    "Users with at least one open /me/stream connection in this process.",
)
PRESENCE_ONLINE_PAIRS = Gauge(
    "userstream_presence_online_pairs",
    "(workspace, user) pairs online on any replica, as this process knows them.",
)
