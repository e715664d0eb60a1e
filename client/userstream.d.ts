/**
 * Type declarations of the userstream browser client (PROTOCOL.md §6).
 * Frame shapes follow PROTOCOL.md §3 (change) and §5 (ephemeral, presence).
 *
 * Snapshot cursors: in wal ingest mode a prefetch cursor is `<16 hex>-<xmin>:<xmax>:<xip,...>`,
 * a position plus the prefetch's snapshot (core/cursors.py); a cursor "carries a snapshot" when
 * it contains "-". Transactions the snapshot saw may be positioned after it, and only a
 * connection started from that cursor leaves them out, so no other connection's frames can be
 * judged against it by string order. A tab therefore shares the connection (as leader or
 * follower) only while its applied cursor is plain: with a snapshot cursor (from bootstrap() at
 * start or after must-refetch, or a stored one) it streams on its own connection (role "alone")
 * until it has applied a change or `offset` frame with a plain cursor, then joins the tabs. After
 * must-refetch, held changes are applied only when the new cursor is plain; with a snapshot
 * cursor they are dropped and the tab reconnects from it.
 */

/** A change as sent in the `data:` of an `event: change` frame (PROTOCOL.md §3). */
export interface Change<D = unknown, T = unknown> {
  /** Opaque; plain string order is delivery order. Equals the frame's `id:`. */
  cursor: string;
  /** Dotted event name, `<resource_type>.<verb>`, e.g. "stream_event.created". */
  type: string;
  /** What changed: "workspace", "membership", "stream", "stream_member", "stream_event", ... */
  resourceType: string;
  action: "create" | "update" | "delete";
  entityId: string;
  workspaceId: string | null;
  streamId: string | null;
  /** Set only for events meant for one user. */
  userId: string | null;
  actorId: string | null;
  /** ISO 8601 UTC timestamp with microseconds, e.g. "2026-11-20T10:00:00.123456Z". */
  createdAt: string;
  /** The publisher's payload, as is; null when the row has none. */
  data: D | null;
  /** Client transaction info for echo suppression, e.g. {id, sourceId}; null when none. */
  tx: T | null;
}

/** `event: ephemeral` data (PROTOCOL.md §5): never stored, never replayed. */
export interface EphemeralSignal<D = unknown> {
  type: string;
  workspaceId: string | null;
  streamId: string | null;
  /** The sender. */
  userId: string;
  data: D | null;
  /** ISO 8601 UTC timestamp. */
  at: string;
}

/** `event: presence` data (PROTOCOL.md §5): who came online / went offline in a workspace. */
export interface PresenceDiff {
  workspaceId: string;
  online: string[];
  offline: string[];
}

/** What `bootstrap()` resolves to: the app's prefetch and the cursor it was read at. */
export interface Bootstrap<D = unknown> {
  cursor: string;
  data: D;
}

/**
 * "connecting": opening or reopening; "live": applying live changes; "offline": not connected
 * (a reconnect is scheduled when the error has `retryInMs`); "refetching": bootstrap() runs again
 * after must-refetch; "closed": close() was called.
 */
export type Status = "connecting" | "live" | "offline" | "refetching" | "closed";

/**
 * "leader": holds the shared connection; "follower": applies the leader's frames; "alone": on its
 * own connection (sharing is off or unavailable, or, with sharing on, while its cursor carries a
 * snapshot).
 */
export type Role = "leader" | "follower" | "alone";

/** Where the last applied cursor is kept; `get`/`set` may be synchronous or return promises. */
export interface CursorStorage {
  get(key: string): Promise<string | null> | string | null;
  set(key: string, cursor: string): Promise<void> | void;
}

/** The part of the Web Locks API (`navigator.locks`) the client uses. */
export interface LockManagerLike {
  request(
    name: string,
    options: { signal?: AbortSignal },
    callback: (lock: unknown) => unknown,
  ): Promise<unknown>;
}

export interface UserStreamOptions<D = unknown> {
  /** The gateway's stream URL, e.g. "/me/stream" (absolute for cross-origin). */
  url: string | URL;
  /** Returns a JWT, sent as `access_token`. Omitted: cookies (withCredentials when cross-origin). */
  token?: () => Promise<string> | string;
  /** The REST prefetch; called at start (unless a stored cursor exists) and on must-refetch. */
  bootstrap: () => Promise<Bootstrap<D>> | Bootstrap<D>;
  /** Each change exactly once, in cursor order. An exception is reported and the change counts as applied. */
  onChange: (change: Change) => void;
  /**
   * The data of a bootstrap() made after must-refetch. Then the changes held meanwhile that are
   * after its plain cursor are applied; with a cursor that carries a snapshot none are, and the
   * stream restarts from that cursor.
   */
  onReset?: (data: D) => void;
  /** PROTOCOL.md §5 ephemeral signals. */
  onEphemeral?: (signal: EphemeralSignal) => void;
  /** PROTOCOL.md §5 presence changes. */
  onPresence?: (diff: PresenceDiff) => void;
  /** Every change of status; `error` says why when "offline" (or "refetching" after a failed bootstrap). */
  onStatus?: (status: Status, error?: UserStreamError) => void;
  /** Key of the stored cursor with `url`. Default: the token's `sub` claim, else "" (cookie auth). */
  userId?: string;
  /** Share one connection between the tabs of this origin (Web Locks + BroadcastChannel). Default true. */
  share?: boolean;
  /** Where the last applied cursor is kept. Default "local" (localStorage). */
  storage?: "local" | CursorStorage;
  /** First backoff ceiling in ms. Default 1000. */
  backoffBaseMs?: number;
  /** Largest backoff ceiling in ms. Default 30000. delay = random(0, min(cap, base * 2 ** attempt)). */
  backoffCapMs?: number;
  /** Renew the token this many seconds before its `exp`; 0 disables. Default 60. */
  refreshBeforeExpS?: number;
  /** Frames a leader keeps to replay to a tab that joins. Default 500. */
  ringSize?: number;
  /** How often a joining tab repeats its unanswered request to the leader, in ms. Default 1000. */
  syncRetryMs?: number;
  /** Time limit of the status probe of a refused connection, in ms. Default 10000. */
  probeTimeoutMs?: number;
  /** EventSource constructor. Default globalThis.EventSource (for tests). */
  EventSource?: new (url: string, init?: { withCredentials?: boolean }) => EventSource;
  /** fetch used to find the status of a refused connection. Default globalThis.fetch (for tests). */
  fetch?: typeof fetch;
  /** Web Locks. Default navigator.locks (for tests). */
  locks?: LockManagerLike;
  /** BroadcastChannel constructor. Default globalThis.BroadcastChannel (for tests). */
  BroadcastChannel?: new (name: string) => BroadcastChannel;
  /** Target of `online`, `pagehide`, `pageshow`. Default window (for tests). */
  window?: EventTarget | null;
  /** Target of the Page Lifecycle `freeze` and `resume` events. Default document (for tests). */
  document?: EventTarget | null;
}

/** Why the stream is not live. */
export class UserStreamError extends Error {
  constructor(
    message: string,
    info?: { status?: number; detail?: string | null; retryInMs?: number; cause?: unknown },
  );
  /** HTTP status of the refused connection; 0 for a network failure or a failing token()/bootstrap(). */
  status: number;
  /** The `detail` (or `title`) of the RFC 9457 problem body, when there was one. */
  detail: string | null;
  /** Set while a reconnect (or bootstrap retry) is scheduled: its delay in ms. */
  retryInMs: number | undefined;
}

export class UserStream<D = unknown> {
  constructor(options: UserStreamOptions<D>);
  /** Resolves once live (or once close() is called first); rejects when the first token(), storage or bootstrap() fails. */
  start(): Promise<void>;
  /** Close for good; another tab takes over the shared connection. */
  close(): void;
  /** The last cursor applied (a change's, an `offset` frame's or a bootstrap's), or null before start. */
  readonly cursor: string | null;
  /** The last status passed to onStatus, or null before start. */
  readonly status: Status | null;
  readonly role: Role;
}

/** Defaults of the options. */
export const DEFAULTS: Readonly<{
  backoffBaseMs: number;
  backoffCapMs: number;
  refreshBeforeExpS: number;
  ringSize: number;
  syncRetryMs: number;
  probeTimeoutMs: number;
}>;

/** Plain string (byte-wise) order of cursors. */
export function compareCursors(a: string, b: string): -1 | 0 | 1;
/** True when `cursor` is after `applied` (or nothing is applied yet). */
export function isAfter(cursor: string, applied: string | null | undefined): boolean;
/** True when `cursor` carries a prefetch snapshot (contains "-"); false for a plain one or none. */
export function carriesSnapshot(cursor: string | null | undefined): boolean;

/** Changes held while bootstrap() runs again after must-refetch. */
export class HeldQueue {
  changes: Array<{ cursor: string }>;
  /** The stream's last cursor since the must-refetch, or null. */
  position: string | null;
  hold(change: { cursor: string }): void;
  note(cursor: string): void;
  restart(): void;
  /** Held changes after the plain `cursor`, once each, in order; empties the queue. */
  release<C extends { cursor: string }>(cursor: string): C[];
}

/** Full-jitter backoff: random(0, min(capMs, baseMs * 2 ** attempt)), at least minMs. */
export function backoffDelayMs(
  attempt: number,
  options?: { baseMs?: number; capMs?: number; minMs?: number | null; random?: () => number },
): number;
/** Retry-After (delay-seconds or HTTP-date) in ms, or null. */
export function parseRetryAfter(value: string | null | undefined, nowMs?: number): number | null;
/** The unverified claims of a JWT, or null. */
export function tokenClaims(jwt: string): Record<string, unknown> | null;
/** The `exp` claim of a JWT in seconds since the epoch, or null. */
export function tokenExpiry(jwt: string): number | null;
/** The URL resolved against the page, without `offset` and `access_token`. */
export function resolveUrl(url: string | URL): URL;
/** Key of the stored cursor (also the lock and channel name) for a user and stream URL. */
export function storageKey(url: string | URL, userId: string): string;
/** The URL of one connection, with `offset` and `access_token`. */
export function streamUrl(url: string | URL, cursor: string | null, token: string | null): string;
/** The frames of a leader's ring after `cursor`. */
export function ringAfter<F extends { n: number; frame: { cursor?: string } }>(
  ring: F[],
  cursor: string,
): F[];
