/**
 * userstream browser client: one `GET /me/stream` per user, applied exactly once, in cursor order.
 *
 * The public surface is PROTOCOL.md §6 (`new UserStream({...})`, `start()`, `cursor`, `close()`);
 * the wire format it reads is PROTOCOL.md §3 (change, offset, must-refetch and close frames) and
 * §5 (ephemeral and presence frames). An ES module with no dependencies and no build step: every
 * gateway serves this file as is at `GET /client/userstream.js`.
 *
 * What it does, and the rule each part follows:
 *
 * - Handoff (PROTOCOL.md §3, README "Prefetch, then stream"): the cursor of `bootstrap()` is where
 *   the stream starts; a change at or before the applied cursor is dropped (cursors compare as
 *   plain strings). An `offset` frame's cursor counts as applied when it is after the applied one.
 * - Snapshot cursors (core/cursors.py): in wal ingest mode a prefetch cursor is
 *   `<16 hex>-<xmin>:<xmax>:<xip,...>`, a position plus the prefetch's snapshot, and a cursor
 *   "carries a snapshot" when it contains "-". Transactions the snapshot saw may get positions
 *   after the cursor's; only a connection started from that cursor knows which changes they are
 *   (the gateway leaves them out by transaction id and, while that watch lasts, sends `id`s that
 *   carry the snapshot too; the first change of a transaction the snapshot could not know ends
 *   it, and cursors are plain again). No frame of another connection can be judged against such
 *   a cursor by string order. Hence the rule: a tab shares the connection (as leader or
 *   follower) only while its applied cursor is plain. A tab whose cursor carries a snapshot
 *   (after `bootstrap()` at start or after must-refetch, or a stored one) streams on its own
 *   connection from it (role "alone") until it has applied a change or `offset` frame whose
 *   cursor is plain; then, when sharing, it joins the tabs: it leads with that same connection
 *   when the lock is free, else it follows, and its connection serves as its catch-up until it
 *   is at the leader's cursor. A leader therefore always streams from a plain cursor, and its
 *   frames are valid for every follower.
 * - must-refetch: the changes that arrive are held, `bootstrap()` runs again and `onReset(data)`
 *   gets its data. With a plain new cursor (trigger ingest mode) the held changes after it are
 *   applied; with one that carries a snapshot they are dropped and the tab reconnects from the
 *   new cursor on its own connection (a leader gives up the shared one first), which delivers
 *   exactly what the snapshot did not see. Every tab sharing a connection gets the frame and
 *   does this for itself, with its own data.
 * - Resume: the last applied cursor is kept per user and stream URL (localStorage, or an
 *   app-supplied storage); `start()` after a reload resumes with `offset=<cursor>` and does not
 *   call `bootstrap()`.
 * - Reconnects always carry `offset=<cursor>`: a new EventSource sends no `Last-Event-ID`
 *   (WHATWG HTML "Server-sent events", "last event ID string" is per EventSource object).
 *   EventSource's own reconnects (readyState CONNECTING) send `Last-Event-ID`, which equals
 *   the last `id:` this client processed, since every change is applied (or held, see
 *   must-refetch) synchronously, in the listener that receives it.
 * - One connection per browser: tabs of one origin share one stream per user and URL. The tab
 *   holding the Web Lock (Web Locks API, `navigator.locks.request`) is the leader: it holds the
 *   EventSource and posts every frame on a BroadcastChannel (HTML "Broadcasting to other browsing
 *   contexts"); every tab, the leader included, runs the same apply state machine on that frame
 *   sequence. A tab that joins asks the leader to replay its ring of recent frames after the
 *   tab's cursor, or, when the ring does not reach back that far, catches up on its own
 *   connection up to the leader's cursor, then follows. When the leader closes (its lock is
 *   released) or is frozen (Page Lifecycle API `freeze`; `resume` rejoins), the next tab takes
 *   the lock and connects from its own applied cursor: no gap, and duplicates are dropped by
 *   cursor. Without Web Locks or BroadcastChannel (or with `share: false`) a tab connects alone.
 * - Failures: EventSource retries network errors itself (readyState CONNECTING). When it gives
 *   up (readyState CLOSED: a non-200 answer), the status is found with a GET of the same URL
 *   (aborted once the status line is read): 401 gets a new token and one retry, then "offline";
 *   429, 5xx and network loss back off with full jitter (AWS Architecture Blog "Exponential
 *   Backoff And Jitter": delay = random(0, min(cap, base * 2^attempt))), Retry-After being a lower
 *   bound; other answers go "offline". `close` frames: `token_expired` and `unauthorized` (a
 *   revoked session) reconnect at once with a new token (or the cookie as it is now); other
 *   reasons let EventSource reconnect after the `retry:` the server sent with
 *   the frame (README "Close reasons"). The window's `online` event reconnects at once.
 * - Tokens are sent as the `access_token` query parameter and renewed `refreshBeforeExpS` before
 *   their `exp` claim (RFC 7519 §4.1.4): a second connection opens from the last cursor and the
 *   first is closed once the second is live, duplicates being dropped by cursor. Without `token`,
 *   cookies are sent (`withCredentials` for a cross-origin URL).
 *
 * Departures: a change whose `onChange` throws still counts as applied (the error is reported
 * with `reportError`), so one bad change cannot stall the stream; ephemeral and presence frames
 * (PROTOCOL.md §5) are passed on when they arrive and never replayed to a tab that joins.
 *
 * @module userstream
 */

/** Defaults of the constructor options, and internal limits. */
export const DEFAULTS = Object.freeze({
  /** First backoff ceiling, in milliseconds. */
  backoffBaseMs: 1000,
  /** Largest backoff ceiling, in milliseconds. */
  backoffCapMs: 30000,
  /** Renew the token this many seconds before its `exp`; 0 disables. */
  refreshBeforeExpS: 60,
  /** Frames (change, offset, must-refetch) a leader keeps to replay to a tab that joins. */
  ringSize: 500,
  /** How often a joining tab repeats its request to the leader while unanswered, in ms. */
  syncRetryMs: 1000,
  /** How long the status probe of a failed connection may take, in milliseconds. */
  probeTimeoutMs: 10000,
});

/** EventSource readyState values (WHATWG HTML "Server-sent events"). */
const CONNECTING = 0;
const CLOSED = 2;

/** Largest delay setTimeout accepts (2^31 - 1 ms, about 24.8 days). */
const MAX_TIMER_MS = 2147483647;

// ---------------------------------------------------------------------------------------------
// Pure parts (exported for tests and for apps that want the rules without the class)
// ---------------------------------------------------------------------------------------------

/**
 * Compare two cursors. Cursors are opaque strings whose plain string order is their delivery
 * order (PROTOCOL.md §3); they are ASCII, so JavaScript's UTF-16 order is the byte order.
 * @param {string} a
 * @param {string} b
 * @returns {-1 | 0 | 1}
 */
export function compareCursors(a, b) {
  if (a < b) return -1;
  return a > b ? 1 : 0;
}

/**
 * Whether a change at `cursor` is new to a client that applied up to `applied`: the dedupe rule
 * "skip anything at or before the last cursor applied" (PROTOCOL.md §3, README step 3).
 * @param {string} cursor the change's cursor
 * @param {string | null | undefined} applied the last cursor applied; null: nothing yet
 * @returns {boolean}
 */
export function isAfter(cursor, applied) {
  return applied == null || cursor > applied;
}

/**
 * Whether a cursor carries a prefetch snapshot (`<16 hex>-<xmin>:<xmax>:<xip,...>`, wal ingest
 * mode, core/cursors.py): then only a connection started from it can tell which later changes
 * are new, and the tab streams on its own connection (module comment, "Snapshot cursors").
 * @param {string | null | undefined} cursor
 * @returns {boolean} false for a plain cursor (16 hex digits) and for none
 */
export function carriesSnapshot(cursor) {
  return typeof cursor === "string" && cursor.includes("-");
}

/**
 * The changes that arrive while `bootstrap()` runs again after `must-refetch` (PROTOCOL.md §3).
 * `position` is the last cursor of the stream since the `must-refetch` (a held change's or an
 * `offset` frame's): a reconnect during the refetch resumes from there.
 */
export class HeldQueue {
  constructor() {
    /** @type {object[]} changes in arrival order */
    this.changes = [];
    /** @type {string | null} */
    this.position = null;
  }

  /**
   * Hold one change (its `cursor` moves `position`).
   * @param {{cursor: string}} change
   */
  hold(change) {
    this.changes.push(change);
    this.note(change.cursor);
  }

  /**
   * Record a cursor of the stream that is not a change (an `offset` frame).
   * @param {string} cursor
   */
  note(cursor) {
    if (isAfter(cursor, this.position)) this.position = cursor;
  }

  /** Another `must-refetch` arrived: the stream restarts from a new live point. */
  restart() {
    this.position = null;
  }

  /**
   * The held changes to apply after a bootstrap at `cursor`: those after it, each cursor once,
   * in cursor order (arrival order, duplicates and older ones left out). Only valid for a plain
   * `cursor`: after one that carries a snapshot, string order cannot tell which held changes the
   * snapshot saw (`carriesSnapshot`), and the client reconnects from it instead.
   * @param {string} cursor the new bootstrap's plain cursor
   * @returns {object[]}
   */
  release(cursor) {
    const out = [];
    let last = cursor;
    for (const change of this.changes) {
      if (isAfter(change.cursor, last)) {
        out.push(change);
        last = change.cursor;
      }
    }
    this.changes = [];
    return out;
  }
}

/**
 * Backoff before reconnect number `attempt` (0 for the first), with "full jitter" (AWS
 * Architecture Blog, "Exponential Backoff And Jitter"): a uniform random delay in
 * [0, min(capMs, baseMs * 2^attempt)), raised to `minMs` (the server's Retry-After) if lower.
 * @param {number} attempt failures in a row before this one, >= 0
 * @param {{baseMs?: number, capMs?: number, minMs?: number | null, random?: () => number}} [options]
 *   defaults: DEFAULTS.backoffBaseMs, DEFAULTS.backoffCapMs, 0, Math.random
 * @returns {number} whole milliseconds
 */
export function backoffDelayMs(attempt, options = {}) {
  const baseMs = options.baseMs ?? DEFAULTS.backoffBaseMs;
  const capMs = options.capMs ?? DEFAULTS.backoffCapMs;
  const random = options.random ?? Math.random;
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.max(0, attempt));
  const delay = Math.floor(random() * ceiling);
  return Math.max(delay, options.minMs ?? 0);
}

/**
 * Parse a `Retry-After` header value (RFC 9110 §10.2.3): delay-seconds or an HTTP-date.
 * @param {string | null | undefined} value
 * @param {number} [nowMs] the current time for an HTTP-date, default Date.now()
 * @returns {number | null} milliseconds (>= 0), or null when absent or unparsable
 */
export function parseRetryAfter(value, nowMs = Date.now()) {
  if (value == null) return null;
  const text = String(value).trim();
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  if (!/^[A-Za-z]{3}, /.test(text)) return null; // IMF-fixdate, e.g. "Sun, 06 Nov 1994 08:49:37 GMT"
  const at = Date.parse(text);
  return Number.isNaN(at) ? null : Math.max(0, at - nowMs);
}

/**
 * The claims of a JWT (RFC 7519), read without verifying it: the payload, base64url-decoded
 * (RFC 7515 §2) and parsed as JSON.
 * @param {string} jwt
 * @returns {Record<string, unknown> | null} null when it is not a JWT with a JSON object payload
 */
export function tokenClaims(jwt) {
  if (typeof jwt !== "string") return null;
  const parts = jwt.split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims !== null && typeof claims === "object" && !Array.isArray(claims) ? claims : null;
  } catch {
    return null;
  }
}

/**
 * The `exp` claim of a JWT (RFC 7519 §4.1.4): seconds since the epoch.
 * @param {string} jwt
 * @returns {number | null} null when absent or not a finite number
 */
export function tokenExpiry(jwt) {
  const exp = tokenClaims(jwt)?.exp;
  return typeof exp === "number" && Number.isFinite(exp) ? exp : null;
}

/**
 * Resolve a stream URL against the page (`location.href`; "http://localhost/" without a page)
 * and drop what this client sets itself (`offset`) and the fragment.
 * @param {string | URL} url
 * @returns {URL}
 */
export function resolveUrl(url) {
  const base = globalThis.location?.href ?? "http://localhost/";
  const resolved = new URL(String(url), base);
  resolved.searchParams.delete("offset");
  resolved.hash = "";
  return resolved;
}

/**
 * The key of the stored cursor, which also names the Web Lock and the BroadcastChannel shared
 * by the tabs of one user and stream URL.
 * @param {string | URL} url the stream URL (resolved with resolveUrl, without `access_token`)
 * @param {string} userId
 * @returns {string} `userstream:["<userId>","<absolute url>"]`
 */
export function storageKey(url, userId) {
  const resolved = resolveUrl(url);
  resolved.searchParams.delete("access_token"); // a credential, not part of the stream's name
  return `userstream:${JSON.stringify([String(userId), resolved.href])}`;
}

/**
 * The URL of one connection: `offset=<cursor>` (none: the server's default, `now`) and the
 * token as `access_token` (PROTOCOL.md §3).
 * @param {string | URL} url
 * @param {string | null} cursor
 * @param {string | null} token
 * @returns {string}
 */
export function streamUrl(url, cursor, token) {
  const u = resolveUrl(url);
  if (cursor != null) u.searchParams.set("offset", cursor);
  if (token != null) u.searchParams.set("access_token", token);
  return u.href;
}

/**
 * Why the stream is not live: passed as the second argument of `onStatus`.
 * `status` is the HTTP status of the refused connection, or 0 for a network failure or a
 * failing `token()`/`bootstrap()`; `retryInMs` is set while a reconnect is scheduled.
 */
export class UserStreamError extends Error {
  /**
   * @param {string} message
   * @param {{status?: number, detail?: string | null, retryInMs?: number, cause?: unknown}} [info]
   */
  constructor(message, info = {}) {
    super(message, info.cause === undefined ? undefined : { cause: info.cause });
    this.name = "UserStreamError";
    /** @type {number} */
    this.status = info.status ?? 0;
    /** @type {string | null} */
    this.detail = info.detail ?? null;
    /** @type {number | undefined} */
    this.retryInMs = info.retryInMs;
  }
}

/** A plain-object copy of an error, for postMessage. */
function errorToMessage(error) {
  if (!error) return undefined;
  return {
    message: String(error.message ?? error),
    status: error.status ?? 0,
    detail: error.detail ?? null,
    retryInMs: error.retryInMs,
  };
}

/** The error back from errorToMessage. */
function errorFromMessage(data) {
  return data ? new UserStreamError(data.message, data) : undefined;
}

/** Report an exception of app code without stopping the stream (HTML "report an exception"). */
function report(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else console.error(error);
}

/** Wrap a storage: "local" is localStorage (an in-memory map where there is none). */
function makeStorage(storage) {
  if (storage && storage !== "local") {
    if (typeof storage.get !== "function" || typeof storage.set !== "function") {
      throw new TypeError('storage must be "local" or an object with get(key) and set(key, cursor)');
    }
    return storage;
  }
  let local = null;
  try {
    local = globalThis.localStorage ?? null;
  } catch {
    local = null; // SecurityError: storage disabled for this document
  }
  const memory = new Map();
  return {
    get(key) {
      try {
        if (local) return local.getItem(key);
      } catch {
        /* fall through to memory */
      }
      return memory.get(key) ?? null;
    },
    set(key, cursor) {
      memory.set(key, cursor);
      try {
        local?.setItem(key, cursor);
      } catch {
        /* quota or disabled: the in-memory copy still serves this page */
      }
    },
  };
}

/**
 * Find the status of a URL an EventSource gave up on (WHATWG HTML: a non-200 answer "fails the
 * connection" without exposing the status): GET it, read the status line and the problem
 * detail (RFC 9457), abort.
 * @returns {Promise<{status: number, retryAfterMs: number | null, detail: string | null}>}
 *   status 0: network failure (or the browser is offline)
 */
async function probeStatus(fetchFn, url, withCredentials, timeoutMs) {
  if (globalThis.navigator?.onLine === false) {
    return { status: 0, retryAfterMs: null, detail: "the browser is offline" };
  }
  if (typeof fetchFn !== "function") return { status: 0, retryAfterMs: null, detail: null };
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  try {
    const response = await fetchFn(url, {
      signal: abort.signal,
      cache: "no-store",
      credentials: withCredentials ? "include" : "same-origin",
    });
    const retryAfterMs = parseRetryAfter(response.headers?.get?.("Retry-After"));
    let detail = null;
    if (response.status !== 200) {
      try {
        const body = await response.json();
        detail = body?.detail ?? body?.title ?? null;
      } catch {
        detail = null;
      }
    }
    return { status: response.status, retryAfterMs, detail };
  } catch (error) {
    return { status: 0, retryAfterMs: null, detail: String(error?.message ?? error) };
  } finally {
    clearTimeout(timer);
    abort.abort();
  }
}

/**
 * The frames of a leader's ring a tab at `cursor` needs: those after the last frame at or
 * before `cursor` (all of them when there is none). A `must-refetch` after that point is
 * included, so the joining tab refetches as the leader did.
 * @param {{n: number, frame: object}[]} ring
 * @param {string} cursor
 */
export function ringAfter(ring, cursor) {
  for (let i = ring.length - 1; i >= 0; i -= 1) {
    const c = ring[i].frame.cursor;
    if (c != null && !isAfter(c, cursor)) return ring.slice(i + 1);
  }
  return ring.slice();
}

// ---------------------------------------------------------------------------------------------
// One connection: an EventSource, its failures and its token renewal
// ---------------------------------------------------------------------------------------------

/**
 * One logical connection to the stream, reopened as needed. It turns EventSource events into
 * frames `{t: "change", cursor, change}`, `{t: "offset", cursor}`, `{t: "must-refetch",
 * reason}`, `{t: "ephemeral" | "presence", data}` and reports its status ("connecting", "live",
 * "offline") with an error. Every new EventSource starts at the owner's resume cursor.
 * `onFrame` and `onStatus` may be replaced while it runs: a tab's own connection becomes its
 * catch-up connection, and a catch-up connection the leader's (UserStream._becomeLeader).
 */
class Connection {
  /**
   * @param {UserStream} owner
   * @param {(frame: object) => void} onFrame
   * @param {() => void} onStatus
   */
  constructor(owner, onFrame, onStatus) {
    this.owner = owner;
    this.onFrame = onFrame;
    this.onStatus = onStatus;
    /** @type {"connecting" | "live" | "offline"} */
    this.status = "connecting";
    /** @type {UserStreamError | undefined} */
    this.error = undefined;
    this._link = null; // the EventSource in use: {es, token, url, withCredentials}
    this._next = null; // a second one opened to renew the token, until it is live
    this._gen = 0; // bumps on every (re)connect, so stale async steps stop
    this._attempt = 0;
    this._authRetried = false;
    this._forceToken = false;
    this._timer = null;
    this._refreshTimer = null;
    this._closed = false;
  }

  /** Connect now. */
  open() {
    this._connect();
  }

  /** True once `close` was called. */
  get closed() {
    return this._closed;
  }

  /** Reconnect now from the owner's resume cursor, with a new EventSource (a new cursor). */
  restart() {
    if (this._closed) return;
    this._attempt = 0;
    this._authRetried = false;
    this._connect();
  }

  /** Close for good: no reconnect, no more frames. */
  close() {
    this._closed = true;
    this._gen += 1;
    this._dropLinks();
  }

  /** Reconnect at once unless live (the window's `online` event). */
  reconnectNow() {
    if (this._closed || this.status === "live") return;
    this._authRetried = false;
    this._connect();
  }

  _drop(link) {
    if (link) link.es.close();
  }

  /** Stop the timers and close both connections (the live one and a renewal's). */
  _dropLinks() {
    clearTimeout(this._timer);
    clearTimeout(this._refreshTimer);
    this._drop(this._link);
    this._drop(this._next);
    this._link = null;
    this._next = null;
  }

  _setStatus(status, error) {
    if (this.status === status && this.error === error) return;
    this.status = status;
    this.error = error;
    this.onStatus();
  }

  async _connect() {
    const gen = ++this._gen;
    this._dropLinks();
    this._setStatus("connecting");
    let token;
    try {
      token = await this.owner._getToken(this._forceToken);
    } catch (error) {
      if (gen !== this._gen) return;
      this._retryLater(
        new UserStreamError(`token() failed: ${error?.message ?? error}`, { cause: error }),
        null,
      );
      return;
    }
    if (gen !== this._gen) return;
    this._forceToken = false;
    this._link = this._open(token);
  }

  /** Open one EventSource from the owner's resume cursor and listen to it. */
  _open(token) {
    const owner = this.owner;
    const url = streamUrl(owner._url, owner._resumeCursor(), token);
    const withCredentials = token == null && owner._crossOrigin;
    const es = new owner._EventSource(url, { withCredentials });
    const link = { es, token, url, withCredentials };
    const on = (type, handler) =>
      es.addEventListener(type, (event) => {
        if (!this._closed && (link === this._link || link === this._next)) handler(event);
      });
    on("change", (event) => {
      let change;
      try {
        change = JSON.parse(event.data);
      } catch (error) {
        report(new UserStreamError(`malformed change frame: ${error.message}`, { cause: error }));
        return;
      }
      const cursor = typeof change?.cursor === "string" ? change.cursor : event.lastEventId;
      this.onFrame({ t: "change", cursor, change });
    });
    on("offset", (event) => this._onOffset(link, event));
    on("must-refetch", (event) => {
      this.onFrame({ t: "must-refetch", reason: parseData(event.data)?.reason ?? null });
    });
    for (const type of ["ephemeral", "presence"]) {
      on(type, (event) => {
        const data = parseData(event.data);
        if (link === this._link && data !== undefined) this.onFrame({ t: type, data });
      });
    }
    on("close", (event) => this._onClose(link, parseData(event.data)?.reason ?? null));
    on("error", () => this._onError(link));
    return link;
  }

  _onOffset(link, event) {
    if (link === this._next) {
      // The renewed connection is live: the old one goes (README "Close reasons").
      this._drop(this._link);
      this._link = link;
      this._next = null;
    }
    const cursor = parseData(event.data)?.cursor ?? event.lastEventId;
    if (typeof cursor === "string" && cursor !== "") this.onFrame({ t: "offset", cursor });
    if (this._closed || (link !== this._link && link !== this._next)) return; // closed by it
    this._attempt = 0;
    this._authRetried = false;
    this._setStatus("live");
    this._scheduleRefresh(link.token);
  }

  _onClose(link, reason) {
    if (link === this._next) {
      this._drop(link);
      this._next = null;
      return;
    }
    if (reason === "token_expired" || reason === "unauthorized") {
      // The old token (or session) now gets 401, which would end the EventSource for good: new
      // token, new EventSource from the last cursor, at once; a second 401 goes "offline".
      this._forceToken = true;
      this._connect();
    }
    // Any other reason: the server sent `retry:` before this frame; EventSource reconnects
    // after that delay with Last-Event-ID (WHATWG HTML "reestablish the connection").
  }

  _onError(link) {
    if (link === this._next) {
      this._drop(link); // renewal failed: the old connection goes on until token_expired
      this._next = null;
      return;
    }
    if (link.es.readyState === CLOSED) {
      this._link = null;
      this._diagnose(link);
    } else if (link.es.readyState === CONNECTING) {
      this._setStatus("connecting"); // EventSource reconnects by itself
    }
  }

  /** Find why EventSource gave up and act: token retry, backoff, or offline. */
  async _diagnose(link) {
    const gen = ++this._gen;
    clearTimeout(this._refreshTimer);
    this._drop(this._next);
    this._next = null;
    const owner = this.owner;
    const probe = await probeStatus(
      owner._fetch,
      link.url,
      link.withCredentials,
      owner._options.probeTimeoutMs,
    );
    if (gen !== this._gen) return;
    const { status, retryAfterMs, detail } = probe;
    const error = new UserStreamError(
      status === 0
        ? `stream unreachable${detail ? `: ${detail}` : ""}`
        : `stream refused with ${status}${detail ? `: ${detail}` : ""}`,
      { status, detail },
    );
    if (status === 401) {
      if (!this._authRetried) {
        this._authRetried = true;
        this._forceToken = true;
        this._connect();
      } else {
        this._setStatus("offline", error);
      }
    } else if (status === 0 || status === 200 || status === 408 || status === 429 || status >= 500) {
      this._retryLater(error, retryAfterMs);
    } else {
      this._setStatus("offline", error); // 400, 403, 404...: retrying would not help
    }
  }

  _retryLater(error, retryAfterMs) {
    const options = this.owner._options;
    const delay = backoffDelayMs(this._attempt, {
      baseMs: options.backoffBaseMs,
      capMs: options.backoffCapMs,
      minMs: retryAfterMs,
    });
    this._attempt += 1;
    error.retryInMs = delay;
    this._setStatus("offline", error);
    clearTimeout(this._timer);
    const gen = this._gen;
    this._timer = setTimeout(() => {
      if (gen === this._gen) this._connect();
    }, Math.min(delay, MAX_TIMER_MS));
  }

  /** Renew the token `refreshBeforeExpS` before its exp, without a gap. */
  _scheduleRefresh(token) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    const beforeS = this.owner._options.refreshBeforeExpS;
    const exp = token == null ? null : tokenExpiry(token);
    if (!(beforeS > 0) || exp == null) return;
    const inMs = exp * 1000 - beforeS * 1000 - Date.now();
    if (inMs <= 0) return; // too late to renew early: the token_expired frame will do it
    this._refreshTimer = setTimeout(() => this._refresh(), Math.min(inMs, MAX_TIMER_MS));
  }

  async _refresh() {
    const gen = this._gen;
    let token;
    try {
      token = await this.owner._getToken(true);
    } catch {
      return; // the token_expired frame retries
    }
    if (gen !== this._gen || this._closed || !this._link || this._next) return;
    if (token === this._link.token) return;
    this._next = this._open(token);
  }
}

/** JSON.parse of a frame's data; undefined when malformed. */
function parseData(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// UserStream
// ---------------------------------------------------------------------------------------------

/**
 * A user's change stream, applied once in cursor order (PROTOCOL.md §6). See the module
 * comment for what it does; userstream.d.ts for every option.
 */
export class UserStream {
  /**
   * @param {object} options see userstream.d.ts `UserStreamOptions`
   * @throws {TypeError} when `url`, `bootstrap` or `onChange` is missing, or `storage` is invalid
   */
  constructor(options) {
    if (!options || (typeof options.url !== "string" && !(options.url instanceof URL))) {
      throw new TypeError("UserStream: url is required");
    }
    if (typeof options.bootstrap !== "function") {
      throw new TypeError("UserStream: bootstrap must be a function returning {cursor, data}");
    }
    if (typeof options.onChange !== "function") {
      throw new TypeError("UserStream: onChange must be a function");
    }
    /** @type {Record<string, any>} DEFAULTS overridden by the options given */
    this._options = { ...DEFAULTS };
    for (const [k, v] of Object.entries(options)) if (v !== undefined) this._options[k] = v;
    const location = resolveUrl(options.url);
    this._url = location.href;
    this._crossOrigin =
      globalThis.location?.origin != null && location.origin !== globalThis.location.origin;
    this._EventSource = options.EventSource ?? globalThis.EventSource;
    if (typeof this._EventSource !== "function") {
      throw new TypeError("UserStream: no EventSource in this environment (pass options.EventSource)");
    }
    this._fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    this._locks = options.locks ?? globalThis.navigator?.locks;
    this._BroadcastChannel = options.BroadcastChannel ?? globalThis.BroadcastChannel;
    this._window = options.window ?? (globalThis.window === globalThis ? globalThis : null);
    this._document = options.document ?? globalThis.document ?? null;
    this._storage = makeStorage(options.storage ?? "local");
    this._sharing =
      options.share !== false &&
      typeof this._locks?.request === "function" &&
      typeof this._BroadcastChannel === "function";
    this._tab =
      globalThis.crypto?.randomUUID?.() ?? `${Date.now()}-${Math.random().toString(36).slice(2)}`;

    this._role = this._sharing ? "follower" : "alone";
    this._applied = null;
    this._held = null; // HeldQueue while refetching
    this._refetchAgain = false;
    this._refetchError = undefined;
    this._status = null;
    this._statusError = undefined;
    this._key = null;
    this._token = null;
    this._tokenPromise = null;
    this._pendingStore = null;
    this._storing = false;
    this._started = false;
    this._closed = false;
    this._attached = false;
    this._conn = null; // the leader's or lone tab's connection
    this._listeners = [];
    // Sharing (see _attachShared)
    this._channel = null;
    this._lockAbort = null;
    this._resign = null;
    this._leader = null; // {tab, epoch, n}: the leader this follower applies frames of
    this._sync = null; // {buffer, replied, target, catchup, timer} while joining a leader
    this._leaderStatus = "connecting";
    this._leaderError = undefined;
    this._maxEpoch = 0;
    this._epoch = 0;
    this._n = 0;
    this._ring = [];
    this._ringStart = null;
    this._startPromise = null;
    this._resolveStart = null;
  }

  /** The last cursor applied (a change's, an `offset` frame's or a bootstrap's), or null. */
  get cursor() {
    return this._applied;
  }

  /** The last status passed to onStatus, or null before start(). */
  get status() {
    return this._status;
  }

  /**
   * "leader" | "follower" (tabs sharing one connection) | "alone" (on its own connection: not
   * sharing, or, with sharing on, while its cursor carries a snapshot).
   */
  get role() {
    return this._role;
  }

  /**
   * Start: resume from the stored cursor, or call bootstrap() and stream from its cursor.
   * @returns {Promise<void>} resolves once live (or once close() is called first); rejects when
   *   token(), the storage or the first bootstrap() fails, or bootstrap() returns no cursor
   */
  start() {
    if (this._startPromise) return this._startPromise;
    let reject;
    this._startPromise = new Promise((resolve, rejectStart) => {
      this._resolveStart = resolve;
      reject = rejectStart;
    });
    this._init().catch((error) => {
      if (this._closed) return;
      this._status = "offline";
      this._statusError = error;
      this._callStatus();
      reject(error);
    });
    return this._startPromise;
  }

  /** Close the stream for good (status "closed"); another tab takes over the shared stream. */
  close() {
    if (this._closed) return;
    this._closed = true;
    this._detach();
    for (const [target, type, handler] of this._listeners) {
      target.removeEventListener(type, handler);
    }
    this._listeners = [];
    this._updateStatus();
    this._resolveStart?.();
  }

  async _init() {
    this._updateStatus();
    let userId = this._options.userId;
    if (userId == null) {
      userId = this._options.token ? (tokenClaims(await this._getToken(false))?.sub ?? "") : "";
    }
    this._key = storageKey(this._url, String(userId));
    const stored = await this._storage.get(this._key);
    if (this._closed) return;
    if (typeof stored === "string" && stored !== "") {
      this._applied = stored; // resume: no bootstrap (PROTOCOL.md §6)
    } else {
      const boot = await this._bootstrap();
      if (this._closed) return;
      this._applied = boot.cursor;
      this._store(boot.cursor);
    }
    this._listen(this._window, "online", () => {
      this._conn?.reconnectNow();
      this._sync?.catchup?.reconnectNow();
    });
    this._listen(this._document, "freeze", () => this._detach());
    this._listen(this._document, "resume", () => this._attach());
    this._listen(this._window, "pagehide", (event) => event.persisted && this._detach());
    this._listen(this._window, "pageshow", (event) => event.persisted && this._attach());
    this._attach();
  }

  _listen(target, type, handler) {
    if (!target?.addEventListener) return;
    target.addEventListener(type, handler);
    this._listeners.push([target, type, handler]);
  }

  async _bootstrap() {
    const boot = await this._options.bootstrap();
    if (!boot || typeof boot.cursor !== "string" || boot.cursor === "") {
      throw new UserStreamError("bootstrap() must resolve to {cursor: string, data}");
    }
    return boot;
  }

  /** The token to connect with (PROTOCOL.md §3 `access_token`); null for cookie auth. */
  async _getToken(force) {
    const tokenFn = this._options.token;
    if (typeof tokenFn !== "function") return null;
    if (!force && this._token != null) {
      const exp = tokenExpiry(this._token);
      if (exp == null || exp * 1000 > Date.now() + 1000) return this._token;
    }
    if (!this._tokenPromise) {
      this._tokenPromise = (async () => {
        try {
          const token = await tokenFn();
          if (typeof token !== "string" || token === "") {
            throw new UserStreamError("token() must resolve to a non-empty string");
          }
          this._token = token;
          return token;
        } finally {
          this._tokenPromise = null;
        }
      })();
    }
    return this._tokenPromise;
  }

  /** Where a new connection starts: the applied cursor, or the stream's position since a must-refetch. */
  _resumeCursor() {
    return this._held ? (this._held.position ?? this._applied) : this._applied;
  }

  // ----- the apply state machine (every tab runs it on the same frame sequence) -----

  _process(frame) {
    if (this._closed) return;
    switch (frame.t) {
      case "change":
        if (this._held) this._held.hold(frame.change);
        else this._apply(frame.change);
        break;
      case "offset":
        if (this._held) this._held.note(frame.cursor);
        else if (isAfter(frame.cursor, this._applied)) {
          this._applied = frame.cursor;
          this._store(frame.cursor);
        }
        break;
      case "must-refetch":
        this._refetch();
        break;
      case "ephemeral":
        this._callback("onEphemeral", frame.data);
        break;
      case "presence":
        this._callback("onPresence", frame.data);
        break;
      case "status":
        this._leaderStatus = frame.status;
        this._leaderError = errorFromMessage(frame.error);
        break;
      default:
        break;
    }
    this._updateStatus();
  }

  _apply(change) {
    if (!change || typeof change.cursor !== "string" || !isAfter(change.cursor, this._applied)) {
      return;
    }
    this._callback("onChange", change);
    this._applied = change.cursor;
    this._store(change.cursor);
  }

  _callback(name, value) {
    const fn = this._options[name];
    if (typeof fn !== "function") return;
    try {
      fn(value);
    } catch (error) {
      report(error);
    }
  }

  /**
   * must-refetch: hold, bootstrap() again, onReset(data); then apply the held changes after a
   * plain new cursor, or drop them and reconnect from one that carries a snapshot.
   */
  async _refetch() {
    if (this._held) {
      this._held.restart();
      this._refetchAgain = true;
      return;
    }
    this._held = new HeldQueue();
    this._updateStatus();
    let attempt = 0;
    while (!this._closed) {
      this._refetchAgain = false;
      let boot;
      try {
        boot = await this._bootstrap();
      } catch (error) {
        const delay = backoffDelayMs(attempt, {
          baseMs: this._options.backoffBaseMs,
          capMs: this._options.backoffCapMs,
        });
        attempt += 1;
        this._refetchError = new UserStreamError(`bootstrap() failed: ${error?.message ?? error}`, {
          cause: error,
          retryInMs: delay,
        });
        this._updateStatus();
        await new Promise((resolve) => setTimeout(resolve, delay));
        continue;
      }
      if (this._closed) return;
      // A must-refetch that came during this bootstrap may be past what it read: read again.
      if (this._refetchAgain) continue;
      this._refetchError = undefined;
      this._callback("onReset", boot.data);
      this._applied = boot.cursor;
      this._store(boot.cursor);
      const held = this._held;
      this._held = null;
      if (carriesSnapshot(boot.cursor)) {
        // The held changes cannot be judged against this cursor (some after it may be in the
        // data): drop them; the stream from the cursor brings exactly what the data lacks.
        this._streamOwn();
      } else {
        for (const change of held.release(boot.cursor)) this._apply(change);
        this._maybeJoin();
      }
      this._updateStatus();
      return;
    }
  }

  /** Keep the applied cursor; writes are coalesced so only the newest waits. */
  _store(cursor) {
    if (this._key == null) return;
    this._pendingStore = cursor;
    if (this._storing) return;
    this._storing = true;
    (async () => {
      while (this._pendingStore !== null) {
        const next = this._pendingStore;
        this._pendingStore = null;
        try {
          await this._storage.set(this._key, next);
        } catch (error) {
          report(error);
        }
      }
      this._storing = false;
    })();
  }

  // ----- status -----

  _computeStatus() {
    if (this._closed) return ["closed", undefined];
    if (this._held) return ["refetching", this._refetchError];
    if (this._role === "follower") {
      if (!this._sync) return [this._leaderStatus, this._leaderError];
      const own = this._sync.catchup; // while joining, frames come from the own connection
      return own ? [own.status, own.error] : ["connecting", undefined];
    }
    return this._conn ? [this._conn.status, this._conn.error] : ["connecting", undefined];
  }

  _updateStatus() {
    if (!this._startPromise) return;
    const [status, error] = this._computeStatus();
    if (status === this._status && error === this._statusError) return;
    this._status = status;
    this._statusError = error;
    this._callStatus();
    if (status === "live") this._resolveStart?.();
  }

  _callStatus() {
    const fn = this._options.onStatus;
    if (typeof fn !== "function") return;
    try {
      fn(this._status, this._statusError);
    } catch (error) {
      report(error);
    }
  }

  // ----- connecting: alone, or shared between tabs -----

  /** Connect: share with the other tabs while the cursor is plain, else on an own connection. */
  _attach() {
    if (this._closed || this._attached || this._key == null) return;
    this._attached = true;
    if (this._sharing && !carriesSnapshot(this._resumeCursor())) this._attachShared();
    else this._connectOwn();
  }

  /**
   * Stream on this tab's own connection (role "alone"): when not sharing, and while the cursor
   * carries a snapshot, until a plain cursor is applied (`_maybeJoin`).
   */
  _connectOwn() {
    this._role = "alone";
    this._conn = new Connection(
      this,
      (frame) => {
        this._process(frame);
        this._maybeJoin();
      },
      () => this._updateStatus(),
    );
    this._conn.open();
    this._updateStatus();
  }

  /**
   * A tab streaming alone while sharing is on joins the tabs once its applied cursor is plain
   * (its snapshot watch is over), handing its connection to `_attachShared`.
   */
  _maybeJoin() {
    if (!this._sharing || this._role !== "alone" || !this._attached || this._closed) return;
    if (this._held || !this._conn || carriesSnapshot(this._applied)) return;
    const own = this._conn;
    this._conn = null;
    this._attachShared(own);
  }

  /**
   * Reconnect from the applied cursor on this tab's own connection (after a refetch whose cursor
   * carries a snapshot): a new EventSource when alone already, else after leaving the tabs (a
   * leader gives up the shared connection and the lock, to a tab with a plain cursor).
   */
  _streamOwn() {
    if (!this._attached || this._closed) return;
    if (this._role === "alone" && this._conn) this._conn.restart();
    else {
      this._leaveShared();
      this._connectOwn();
    }
  }

  /** Give up the connection and the leadership (freeze, pagehide into the back/forward cache, close). */
  _detach() {
    if (!this._attached) return;
    this._attached = false;
    this._leaveShared();
    if (this._sharing) this._role = "follower";
    this._updateStatus();
  }

  /** Close the connection (own or shared), stop joining, leave the lock and the channel. */
  _leaveShared() {
    this._conn?.close();
    this._conn = null;
    this._endSync();
    this._leader = null;
    this._lockAbort?.abort();
    this._lockAbort = null;
    this._resign?.();
    this._resign = null;
    this._channel?.close();
    this._channel = null;
    this._leaderStatus = "connecting";
    this._leaderError = undefined;
  }

  /**
   * Join the tabs of this user and URL: listen on the channel (buffering), ask the leader for
   * the frames after our cursor, and queue for the lock; whoever gets it leads. `own`: this
   * tab's connection so far, kept as its catch-up connection (see `_beginSync`).
   * @param {Connection | null} [own]
   */
  _attachShared(own = null) {
    const name = this._key;
    this._role = "follower";
    try {
      this._channel = new this._BroadcastChannel(name);
    } catch (error) {
      own?.close();
      this._goAlone(error);
      return;
    }
    this._channel.onmessage = (event) => this._onMessage(event.data);
    this._beginSync(own);
    const abort = new AbortController();
    this._lockAbort = abort;
    Promise.resolve()
      .then(() =>
        this._locks.request(name, { signal: abort.signal }, () => {
          if (abort.signal.aborted || this._closed || !this._attached) return undefined;
          if (carriesSnapshot(this._resumeCursor())) {
            // Never lead from a snapshot cursor: its frames would not be valid for followers.
            queueMicrotask(() => this._lockAbort === abort && this._streamOwn());
            return undefined;
          }
          return new Promise((resolve) => {
            this._resign = resolve;
            this._becomeLeader();
          });
        }),
      )
      .catch((error) => {
        // Aborted: we left. Anything else (a SecurityError in an opaque origin): no sharing.
        if (error?.name !== "AbortError" && this._lockAbort === abort) this._goAlone(error);
      });
    this._updateStatus();
  }

  /** Sharing is not possible in this document: connect alone from now on. */
  _goAlone(error) {
    console.warn("userstream: tabs cannot share the stream, connecting alone:", error);
    this._detach();
    this._sharing = false;
    this._attach();
  }

  _post(message) {
    try {
      this._channel?.postMessage(message);
    } catch (error) {
      report(error);
    }
  }

  _onMessage(message) {
    if (!message || typeof message !== "object" || this._closed || !this._attached) return;
    if (typeof message.epoch === "number") this._maxEpoch = Math.max(this._maxEpoch, message.epoch);
    if (message.type === "sync" && this._role === "leader") this._reply(message);
    else if (message.type === "frame" && this._role === "follower") this._onLeaderFrame(message);
    else if (message.type === "replay" && message.to === this._tab && this._role === "follower") {
      this._onReplay(message);
    }
  }

  // ----- leader -----

  /**
   * Lead from the resume cursor (plain: see `_attachShared`): with the catch-up connection this
   * tab already streams on, if any (it goes on from that cursor), else a new one.
   */
  _becomeLeader() {
    const own = this._sync?.catchup ?? null;
    if (own) this._sync.catchup = null;
    this._endSync();
    this._leader = null;
    this._role = "leader";
    this._epoch = Math.max(Date.now(), this._maxEpoch + 1);
    this._maxEpoch = this._epoch;
    this._n = 0;
    this._ring = [];
    this._ringStart = this._resumeCursor();
    const onFrame = (frame) => this._leaderFrame(frame);
    const onStatus = () =>
      this._leaderFrame({
        t: "status",
        status: this._conn.status,
        error: errorToMessage(this._conn.error),
      });
    if (own && !own.closed) {
      own.onFrame = onFrame;
      own.onStatus = onStatus;
      this._conn = own;
      onStatus();
      return;
    }
    this._conn = new Connection(this, onFrame, onStatus);
    this._leaderFrame({ t: "status", status: "connecting" });
    this._conn.open();
  }

  /** Number a frame, keep it in the ring, post it to the other tabs, apply it here. */
  _leaderFrame(frame) {
    if (this._role !== "leader" || this._closed) return;
    const n = ++this._n;
    if (frame.t === "change" || frame.t === "offset" || frame.t === "must-refetch") {
      // A copy: onChange may change the object it is given, the ring must replay what came.
      this._ring.push({ n, frame: structuredClone(frame) });
      while (this._ring.length > this._options.ringSize) {
        const dropped = this._ring.shift().frame;
        // The ring now holds everything after the dropped cursor; after a dropped
        // must-refetch, nothing is known until the next cursor drops out.
        this._ringStart = dropped.cursor ?? null;
      }
    }
    this._post({ type: "frame", tab: this._tab, epoch: this._epoch, n, frame });
    this._process(frame);
  }

  /** Answer a joining tab: the frames after its cursor if the ring reaches back that far. */
  _reply(request) {
    const cursor = request.cursor;
    const ok = typeof cursor === "string" && this._ringStart != null && cursor >= this._ringStart;
    this._post({
      type: "replay",
      to: request.tab,
      tab: this._tab,
      epoch: this._epoch,
      n: this._n,
      ok,
      frames: ok ? ringAfter(this._ring, cursor) : [],
      cursor: this._resumeCursor(),
      status: this._conn?.status ?? "connecting",
      error: errorToMessage(this._conn?.error),
    });
  }

  // ----- follower -----

  /**
   * Ask the leader for the frames after our cursor, buffering its live frames meanwhile. `own`
   * (a connection this tab streams on already) goes on as the catch-up connection: its frames
   * are applied until the sync is done (`_onReplay`), or it becomes the leader's.
   * @param {Connection | null} [own]
   */
  _beginSync(own = null) {
    this._endSync();
    const sync = { buffer: [], replied: false, target: null, catchup: null, timer: null };
    this._sync = sync;
    if (own) {
      own.onFrame = this._catchupFrame(sync);
      own.onStatus = () => this._updateStatus();
      sync.catchup = own;
    }
    const ask = () => {
      if (this._sync !== sync || sync.replied) return;
      this._post({ type: "sync", tab: this._tab, cursor: this._resumeCursor() });
      sync.timer = setTimeout(ask, this._options.syncRetryMs);
    };
    ask();
    this._updateStatus();
  }

  /** Stop joining: close the own catch-up connection and return the buffered messages. */
  _endSync() {
    const sync = this._sync;
    if (!sync) return [];
    this._sync = null;
    clearTimeout(sync.timer);
    sync.catchup?.close();
    return sync.buffer;
  }

  static _newer(a, b) {
    return a.epoch > b.epoch || (a.epoch === b.epoch && a.tab > b.tab);
  }

  _onLeaderFrame(message) {
    const leader = this._leader;
    if (this._sync) {
      this._sync.buffer.push(message);
    } else if (leader && message.tab === leader.tab && message.epoch === leader.epoch) {
      if (message.n <= leader.n) return;
      leader.n = message.n;
      this._process(message.frame);
    } else if (!leader || UserStream._newer(message, leader)) {
      // A new leader streams from its own cursor: join it as a new tab would.
      this._leader = null;
      this._beginSync();
      this._sync.buffer.push(message);
    }
    // else: a late frame of a former leader, covered by the current one
  }

  _onReplay(reply) {
    const sync = this._sync;
    if (!sync || sync.replied) return;
    sync.replied = true;
    clearTimeout(sync.timer);
    sync.from = { tab: reply.tab, epoch: reply.epoch, n: reply.n };
    this._leaderStatus = reply.status;
    this._leaderError = errorFromMessage(reply.error);
    if (reply.ok) {
      for (const { frame } of reply.frames) this._process(frame);
      this._finishSync();
      return;
    }
    // The ring does not reach back to our cursor: catch up on our own connection until we
    // are at least where the leader was when it answered, then follow its frames after that.
    sync.target = reply.cursor;
    if (this._caughtUp()) {
      this._finishSync();
      return;
    }
    if (!sync.catchup) {
      sync.catchup = new Connection(this, this._catchupFrame(sync), () => this._updateStatus());
      sync.catchup.open();
    }
    this._updateStatus();
  }

  /** The frame handler of a catch-up connection: apply, and end the sync once caught up. */
  _catchupFrame(sync) {
    return (frame) => {
      if (frame.t === "ephemeral" || frame.t === "presence") return; // the leader's come
      this._process(frame);
      if (this._sync === sync && sync.replied && this._caughtUp()) this._finishSync();
    };
  }

  _caughtUp() {
    const target = this._sync?.target;
    const position = this._resumeCursor();
    return target == null || (position != null && !isAfter(target, position));
  }

  _finishSync() {
    const sync = this._sync;
    const buffer = this._endSync();
    this._leader = { ...sync.from };
    for (const message of buffer) this._onLeaderFrame(message);
    this._updateStatus();
  }
}
