// Test doubles of the browser APIs userstream.js uses: EventSource (WHATWG HTML "Server-sent
// events"), the Web Locks API, fetch answers, storage. BroadcastChannel is Node's own.

/** An unsigned JWT with these claims (the client reads claims; the gateway verifies). */
export function jwt(claims) {
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  return `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}.c2ln`;
}

/** A cursor for position n: 16 lower-case hex digits, as the gateway writes them. */
export function cur(n) {
  return n.toString(16).padStart(16, "0");
}

/**
 * A cursor that carries a prefetch snapshot (wal ingest mode, core/cursors.py): position n, then
 * `-<xmin>:<xmax>:<xip,...>` (default "700:705:702", a snapshot that saw every transaction below
 * 705 except 702).
 */
export function snap(n, snapshot = "700:705:702") {
  return `${cur(n)}-${snapshot}`;
}

/** A change object as PROTOCOL.md §3 sends it. */
export function change(n, extra = {}) {
  return {
    cursor: cur(n),
    type: "stream_event.created",
    resourceType: "stream_event",
    action: "create",
    entityId: `e${n}`,
    workspaceId: "w1",
    streamId: "s1",
    userId: null,
    actorId: "u2",
    createdAt: "2026-11-20T10:00:00.123456Z",
    data: { n },
    tx: null,
    ...extra,
  };
}

/**
 * A fresh fake EventSource class with its own list of instances. Tests drive it like a server:
 * `es.send(type, data, id)` delivers one frame, `es.refuse()` ends it as a non-200 answer does
 * (readyState CLOSED), `es.drop()` as a network error does (readyState CONNECTING, the browser
 * reconnects by itself), `es.reopen()` is that reconnect succeeding.
 */
export function fakeEventSourceClass() {
  class FakeEventSource extends EventTarget {
    static instances = [];

    constructor(url, init = {}) {
      super();
      this.url = url;
      this.withCredentials = Boolean(init.withCredentials);
      this.readyState = 0;
      this.closed = false;
      FakeEventSource.instances.push(this);
    }

    get params() {
      return new URL(this.url).searchParams;
    }

    close() {
      this.readyState = 2;
      this.closed = true;
    }

    send(type, data, id) {
      if (this.closed) throw new Error(`frame sent on a closed EventSource: ${type}`);
      this.readyState = 1;
      const text = typeof data === "string" ? data : JSON.stringify(data);
      this.dispatchEvent(new MessageEvent(type, { data: text, lastEventId: id ?? "" }));
    }

    /** Send change frames for these positions. */
    changes(...ns) {
      for (const n of ns) this.send("change", change(n), cur(n));
    }

    /** The `offset` frame: live from position n (a cursor string: that cursor). */
    live(n) {
      const cursor = typeof n === "string" ? n : cur(n);
      this.send("offset", { cursor }, cursor);
    }

    /** A change frame for position n whose cursor (in `id:` and data) is `cursor`. */
    changeAt(n, cursor) {
      this.send("change", change(n, { cursor }), cursor);
    }

    refuse() {
      this.readyState = 2;
      this.dispatchEvent(new Event("error"));
    }

    drop() {
      this.readyState = 0;
      this.dispatchEvent(new Event("error"));
    }

    reopen() {
      this.readyState = 1;
      this.dispatchEvent(new Event("open"));
    }
  }
  return FakeEventSource;
}

/** A fetch answering every probe with `status` (and headers), recording the URLs asked. */
export function fakeFetch(answer) {
  const calls = [];
  const fn = async (url, init) => {
    calls.push({ url, init });
    const { status, headers = {}, body = null, error } =
      typeof answer === "function" ? answer(calls.length) : answer;
    if (error) throw error;
    return {
      status,
      headers: new Headers(headers),
      json: async () => body,
    };
  };
  fn.calls = calls;
  return fn;
}

/** An app-supplied storage over a Map, recording writes. */
export function memoryStorage(initial = {}) {
  const map = new Map(Object.entries(initial));
  return {
    map,
    writes: [],
    get(key) {
      return map.get(key) ?? null;
    },
    set(key, cursor) {
      this.writes.push(cursor);
      map.set(key, cursor);
    },
  };
}

/**
 * An exclusive Web Locks manager (Web Locks API `LockManager.request`, exclusive mode, with
 * `signal`): requests are granted in order, a lock is held until the callback's promise settles.
 */
export class FakeLocks {
  constructor() {
    this.queues = new Map();
    this.held = new Map();
  }

  request(name, options, callback) {
    return new Promise((resolve, reject) => {
      const entry = { callback, resolve, reject };
      const signal = options?.signal;
      if (signal?.aborted) {
        reject(signal.reason);
        return;
      }
      signal?.addEventListener("abort", () => {
        const queue = this.queues.get(name) ?? [];
        const i = queue.indexOf(entry);
        if (i >= 0) {
          queue.splice(i, 1);
          reject(signal.reason);
        }
      });
      if (!this.queues.has(name)) this.queues.set(name, []);
      this.queues.get(name).push(entry);
      this._grant(name);
    });
  }

  holder(name) {
    return this.held.get(name) ?? null;
  }

  _grant(name) {
    if (this.held.has(name)) return;
    const entry = this.queues.get(name)?.shift();
    if (!entry) return;
    this.held.set(name, entry);
    Promise.resolve()
      .then(() => entry.callback({ name, mode: "exclusive" }))
      .then(
        (value) => entry.resolve(value),
        (error) => entry.reject(error),
      )
      .finally(() => {
        this.held.delete(name);
        this._grant(name);
      });
  }
}

/** Wait until `predicate()` is true, checking every few ms; fails after `timeoutMs`. */
export async function until(predicate, timeoutMs = 2000, what = "condition") {
  const start = Date.now();
  while (!predicate()) {
    if (Date.now() - start > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

/** Let pending promise callbacks and zero-delay timers run. */
export function settle(ms = 5) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A promise with its resolve function, for bootstrap() calls the test finishes by hand. */
export function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}
