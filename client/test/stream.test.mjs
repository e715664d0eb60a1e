// The UserStream state machine of one tab (role "alone"), driven through a fake EventSource:
// handoff, resume, must-refetch, failures and backoff, close frames, token renewal.
import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";

import { UserStream, storageKey } from "../userstream.js";
import {
  change,
  cur,
  deferred,
  fakeEventSourceClass,
  fakeFetch,
  jwt,
  memoryStorage,
  settle,
  snap,
  until,
} from "../test-support/doubles.mjs";

const URL_ = "http://gw.example/me/stream";

/** A stream with recording callbacks; `options` override. */
function setup(options = {}) {
  const ES = fakeEventSourceClass();
  const log = { changes: [], resets: [], statuses: [], errors: [], ephemeral: [], presence: [] };
  const storage = options.storage ?? memoryStorage();
  const bootstraps = [];
  const stream = new UserStream({
    url: URL_,
    EventSource: ES,
    storage,
    share: false,
    fetch: fakeFetch({ status: 200 }),
    bootstrap: async () => {
      bootstraps.push(Date.now());
      return { cursor: cur(10), data: { items: 10 } };
    },
    onChange: (c) => log.changes.push(c),
    onReset: (data) => log.resets.push(data),
    onStatus: (status, error) => {
      log.statuses.push(status);
      log.errors.push(error);
    },
    onEphemeral: (s) => log.ephemeral.push(s),
    onPresence: (p) => log.presence.push(p),
    ...options,
  });
  const es = () => ES.instances.at(-1);
  const open = () => ES.instances.filter((e) => !e.closed);
  const applied = () => log.changes.map((c) => c.cursor);
  cleanup.push(() => stream.close());
  return { ES, log, storage, stream, bootstraps, es, open, applied };
}

const cleanup = [];
afterEach(() => {
  while (cleanup.length) cleanup.pop()();
});

describe("handoff from bootstrap()", { timeout: 10000 }, () => {
  it("streams from the bootstrap cursor and applies each later change once, in order", async () => {
    const { stream, es, log, storage, bootstraps, applied } = setup();
    assert.equal(stream.role, "alone");
    assert.equal(stream.status, null);
    const started = stream.start();
    await until(() => es());
    assert.equal(bootstraps.length, 1);
    assert.equal(es().params.get("offset"), cur(10));
    assert.equal(es().params.has("access_token"), false);
    assert.equal(es().withCredentials, false);

    es().changes(9, 10, 11, 12, 12, 11, 13); // 9 and 10: already in the bootstrap data
    es().live(13);
    await started;
    assert.deepEqual(applied(), [cur(11), cur(12), cur(13)]);
    assert.deepEqual(log.changes[0], change(11)); // the parsed data: line, nothing else
    assert.equal(stream.cursor, cur(13));
    assert.equal(stream.status, "live");
    assert.deepEqual(log.statuses, ["connecting", "live"]);
    assert.deepEqual(log.resets, []); // bootstrap data at start goes to the app, not onReset
    await settle();
    assert.equal(storage.map.get(storageKey(URL_, "")), cur(13));

    es().changes(14);
    await settle();
    assert.equal(storage.map.get(storageKey(URL_, "")), cur(14));
  });

  it("an offset frame ahead of the cursor moves it (what Last-Event-ID would resume from)", async () => {
    const { stream, es, storage } = setup();
    stream.start();
    await until(() => es());
    es().live(20);
    await settle();
    assert.equal(stream.cursor, cur(20));
    assert.equal(storage.map.get(storageKey(URL_, "")), cur(20));
    es().live(15); // never moves back
    assert.equal(stream.cursor, cur(20));
  });

  it("a bootstrap cursor that carries a snapshot is streamed from as is; later cursors compare after it", async () => {
    const { stream, es, storage, applied } = setup({
      bootstrap: async () => ({ cursor: snap(10), data: null }),
    });
    const started = stream.start();
    await until(() => es());
    assert.equal(es().params.get("offset"), snap(10));
    es().changeAt(12, snap(12)); // a transaction the snapshot did not see, positioned after it
    es().live(snap(12));
    await started;
    assert.equal(stream.cursor, snap(12));
    es().changes(13); // the watch is over: plain again
    assert.deepEqual(applied(), [snap(12), cur(13)]);
    assert.equal(stream.cursor, cur(13));
    await settle();
    assert.equal(storage.map.get(storageKey(URL_, "")), cur(13));
  });

  it("a plain offset cursor after a snapshot cursor is applied and stored", async () => {
    const { stream, es, storage } = setup({
      bootstrap: async () => ({ cursor: snap(10), data: null }),
    });
    stream.start();
    await until(() => es());
    es().live(12);
    await settle();
    assert.equal(stream.cursor, cur(12));
    assert.equal(storage.map.get(storageKey(URL_, "")), cur(12));
  });

  it("passes ephemeral and presence data on", async () => {
    const { stream, es, log } = setup();
    stream.start();
    await until(() => es());
    es().live(10);
    const signal = { type: "typing", workspaceId: "w1", streamId: "s1", userId: "u2", data: null, at: "x" };
    es().send("ephemeral", signal);
    es().send("presence", { workspaceId: "w1", online: ["u2"], offline: [] });
    assert.deepEqual(log.ephemeral, [signal]);
    assert.deepEqual(log.presence, [{ workspaceId: "w1", online: ["u2"], offline: [] }]);
    assert.equal(stream.cursor, cur(10)); // no id: nothing moves
  });

  it("reports an onChange exception and goes on", async (t) => {
    const reported = [];
    t.mock.method(console, "error", (e) => reported.push(e));
    const seen = [];
    const { stream, es } = setup({
      onChange: (c) => {
        if (c.cursor === cur(11)) throw new Error("app bug");
        seen.push(c.cursor);
      },
    });
    stream.start();
    await until(() => es());
    es().changes(11, 12);
    assert.equal(reported.length, 1);
    assert.equal(reported[0].message, "app bug");
    assert.deepEqual(seen, [cur(12)]);
    assert.equal(stream.cursor, cur(12));
  });
});

describe("credentials", { timeout: 10000 }, () => {
  it("cookies: withCredentials only for a cross-origin URL; a token never needs it", async (t) => {
    const saved = Object.getOwnPropertyDescriptor(globalThis, "location");
    Object.defineProperty(globalThis, "location", {
      value: new URL("http://app.example/inbox"),
      configurable: true,
    });
    t.after(() => {
      if (saved) Object.defineProperty(globalThis, "location", saved);
      else delete globalThis.location;
    });
    const cross = setup({ url: "http://gw.example/me/stream" });
    const same = setup({ url: "/me/stream" });
    const token = jwt({ sub: "a", exp: Math.floor(Date.now() / 1000) + 3600 });
    const bearer = setup({ url: "http://gw.example/me/stream", token: () => token });
    for (const s of [cross, same, bearer]) s.stream.start();
    await until(() => cross.es() && same.es() && bearer.es());
    assert.equal(cross.es().withCredentials, true);
    assert.equal(same.es().withCredentials, false);
    assert.equal(new URL(same.es().url).origin, "http://app.example");
    assert.equal(bearer.es().withCredentials, false);
    assert.equal(bearer.es().params.get("access_token"), token);
  });
});

describe("resume from the stored cursor", { timeout: 10000 }, () => {
  it("connects with offset=<stored> and does not call bootstrap()", async () => {
    const storage = memoryStorage({ [storageKey(URL_, "")]: cur(5) });
    const { stream, es, bootstraps, applied } = setup({ storage });
    const started = stream.start();
    await until(() => es());
    assert.equal(es().params.get("offset"), cur(5));
    assert.equal(stream.cursor, cur(5));
    es().changes(5, 6, 7);
    es().live(7);
    await started;
    assert.equal(bootstraps.length, 0);
    assert.deepEqual(applied(), [cur(6), cur(7)]);
  });

  it("keys the stored cursor by the token's sub, or by userId when given", async () => {
    const token = jwt({ sub: "alice", exp: Math.floor(Date.now() / 1000) + 3600 });
    const storage = memoryStorage({
      [storageKey(URL_, "alice")]: cur(40),
      [storageKey(URL_, "bob")]: cur(50),
    });
    const a = setup({ storage, token: async () => token });
    a.stream.start();
    await until(() => a.es());
    assert.equal(a.es().params.get("offset"), cur(40));
    assert.equal(a.es().params.get("access_token"), token);

    const b = setup({ storage, token: async () => token, userId: "bob" });
    b.stream.start();
    await until(() => b.es());
    assert.equal(b.es().params.get("offset"), cur(50));
  });

  it("an async storage works the same", async () => {
    const inner = memoryStorage({ [storageKey(URL_, "")]: cur(3) });
    const storage = {
      get: async (key) => inner.get(key),
      set: async (key, cursor) => inner.set(key, cursor),
    };
    const { stream, es } = setup({ storage });
    stream.start();
    await until(() => es());
    assert.equal(es().params.get("offset"), cur(3));
    es().changes(4, 5);
    await settle();
    assert.equal(inner.map.get(storageKey(URL_, "")), cur(5));
  });
});

describe("must-refetch", { timeout: 10000 }, () => {
  it("holds changes, bootstraps again, resets, applies only held changes after a plain new cursor", async () => {
    let boot = null;
    const { stream, es, log, applied, storage } = setup({
      bootstrap: async () => (boot ? boot.promise : { cursor: cur(10), data: "first" }),
    });
    stream.start();
    await until(() => es());
    es().changes(11);
    es().live(11);
    boot = deferred();
    es().send("must-refetch", { reason: "retention" });
    assert.equal(stream.status, "refetching");
    es().live(30); // the stream goes on live from now
    es().changes(31, 32, 35);
    assert.deepEqual(applied(), [cur(11)]); // held, not applied
    boot.resolve({ cursor: cur(32), data: "second" });
    await until(() => stream.status === "live");
    assert.deepEqual(log.resets, ["second"]);
    assert.deepEqual(applied(), [cur(11), cur(35)]);
    assert.equal(stream.cursor, cur(35));
    assert.deepEqual(log.statuses, ["connecting", "live", "refetching", "live"]);
    await settle();
    assert.equal(storage.map.get(storageKey(URL_, "")), cur(35));
    es().changes(35, 36);
    assert.deepEqual(applied(), [cur(11), cur(35), cur(36)]);
  });

  it("a new cursor that carries a snapshot: held changes dropped, reconnect from it, nothing twice", async () => {
    let boot = null;
    const { stream, es, ES, log, applied, storage } = setup({
      bootstrap: async () => (boot ? boot.promise : { cursor: cur(10), data: "first" }),
    });
    stream.start();
    await until(() => es());
    es().changes(11);
    es().live(11);
    boot = deferred();
    es().send("must-refetch", { reason: "retention" });
    es().live(30);
    es().changes(31, 32, 33); // 31 and 32 are in the new data though positioned after its cursor
    const first = es();
    boot.resolve({ cursor: snap(30), data: "second" });
    await until(() => ES.instances.length === 2, 2000, "the reconnect");
    assert.equal(first.closed, true);
    assert.equal(es().params.get("offset"), snap(30));
    assert.deepEqual(log.resets, ["second"]);
    assert.deepEqual(applied(), [cur(11)]); // no held change applied
    assert.equal(stream.cursor, snap(30));
    assert.equal(stream.status, "connecting");
    // The gateway leaves out 31 and 32 (seen by the snapshot) and sends 33 under the watch.
    es().changeAt(33, snap(33));
    es().live(snap(33));
    es().changes(34);
    assert.deepEqual(applied(), [cur(11), snap(33), cur(34)]);
    assert.equal(stream.cursor, cur(34));
    assert.deepEqual(log.statuses, ["connecting", "live", "refetching", "connecting", "live"]);
    await settle();
    assert.equal(storage.map.get(storageKey(URL_, "")), cur(34));
  });

  it("a reconnect while refetching resumes from the stream's position, not the old cursor", async () => {
    let boot = null;
    const token = () => jwt({ sub: "u", exp: Math.floor(Date.now() / 1000) + 3600 });
    const { stream, es, ES, applied, log } = setup({
      token: async () => token(),
      bootstrap: async () => (boot ? boot.promise : { cursor: cur(10), data: 1 }),
    });
    stream.start();
    await until(() => es());
    es().live(10);
    boot = deferred();
    es().send("must-refetch", { reason: "retention" });
    es().live(30);
    es().changes(31);
    es().send("close", { reason: "token_expired" });
    await until(() => ES.instances.length === 2);
    assert.equal(es().params.get("offset"), cur(31));
    es().changes(32);
    boot.resolve({ cursor: cur(30), data: 2 });
    await until(() => log.resets.length === 1);
    assert.deepEqual(applied(), [cur(31), cur(32)]);
    assert.equal(stream.status, "connecting"); // the new connection has sent no offset yet
    es().live(32);
    assert.equal(stream.status, "live");
  });

  it("a second must-refetch during the bootstrap bootstraps again", async () => {
    const boots = [];
    let calls = 0;
    const { stream, es, log, applied } = setup({
      bootstrap: async () => {
        calls += 1;
        if (calls === 1) return { cursor: cur(10), data: 0 };
        const d = deferred();
        boots.push(d);
        return d.promise;
      },
    });
    stream.start();
    await until(() => es());
    es().live(10);
    es().send("must-refetch", { reason: "retention" });
    await until(() => boots.length === 1);
    es().send("must-refetch", { reason: "retention" });
    es().live(40);
    es().changes(41);
    boots[0].resolve({ cursor: cur(20), data: "stale" });
    await until(() => boots.length === 2);
    es().changes(42);
    boots[1].resolve({ cursor: cur(41), data: "fresh" });
    await until(() => stream.status === "live");
    assert.deepEqual(log.resets, ["fresh"]);
    assert.deepEqual(applied(), [cur(42)]);
  });
});

describe("failures", { timeout: 10000 }, () => {
  it("401: token() again and one retry, then offline with the error", async () => {
    let tokens = 0;
    const fetch = fakeFetch({ status: 401, body: { detail: "token expired" } });
    const { stream, es, ES, log } = setup({
      fetch,
      token: async () => {
        tokens += 1;
        return jwt({ sub: "alice", exp: Math.floor(Date.now() / 1000) + 3600, n: tokens });
      },
    });
    stream.start();
    await until(() => es());
    const first = es();
    first.refuse();
    await until(() => ES.instances.length === 2);
    assert.equal(tokens, 2);
    assert.notEqual(es().params.get("access_token"), first.params.get("access_token"));
    assert.equal(fetch.calls[0].url, first.url); // the probe asks the same URL
    assert.ok(fetch.calls[0].init.signal instanceof AbortSignal);
    es().refuse();
    await until(() => stream.status === "offline");
    const error = log.errors.at(-1);
    assert.equal(error.status, 401);
    assert.equal(error.detail, "token expired");
    assert.equal(error.retryInMs, undefined);
    await settle(30);
    assert.equal(ES.instances.length, 2);
    assert.equal(tokens, 2);
  });

  it("a 401 retry that goes live allows another retry later", async () => {
    const { stream, es, ES } = setup({ fetch: fakeFetch({ status: 401 }) });
    stream.start();
    await until(() => es());
    es().refuse();
    await until(() => ES.instances.length === 2);
    es().live(10);
    es().refuse();
    await until(() => ES.instances.length === 3);
    assert.equal(stream.status, "connecting");
  });

  it("429: full-jitter backoff growing to the cap, Retry-After as a lower bound", async (t) => {
    t.mock.method(Math, "random", () => 0.999);
    // Four 429s without Retry-After, then one with "Retry-After: 2" (seconds).
    const fetch = fakeFetch((n) => (n <= 4 ? { status: 429 } : { status: 429, headers: { "Retry-After": "2" } }));
    const { stream, es, ES, log } = setup({ fetch, backoffBaseMs: 8, backoffCapMs: 40 });
    stream.start();
    await until(() => es());
    es().changes(11);
    const delays = [];
    for (let i = 0; i < 4; i += 1) {
      const count = ES.instances.length;
      es().refuse();
      await until(() => ES.instances.length === count + 1, 2000, `reconnect ${i}`);
      delays.push(log.errors.filter(Boolean).at(-1).retryInMs);
      assert.equal(es().params.get("offset"), cur(11));
    }
    assert.deepEqual(delays, [7, 15, 31, 39]); // floor(0.999 * min(40, 8 * 2^n))
    assert.ok(log.statuses.includes("offline"));
    assert.equal(log.errors.filter(Boolean)[0].status, 429);

    // Live resets the attempts; Retry-After (seconds) then raises the delay.
    es().live(11);
    const count = ES.instances.length;
    es().refuse();
    await until(() => stream.status === "offline");
    assert.equal(log.errors.at(-1).retryInMs, 2000);
    await settle(50);
    assert.equal(ES.instances.length, count); // still waiting
  });

  it("the window's online event reconnects at once while backing off", async () => {
    const window = new EventTarget();
    const { stream, es, ES } = setup({
      window,
      fetch: fakeFetch({ status: 503, headers: { "Retry-After": "60" } }),
    });
    stream.start();
    await until(() => es());
    es().changes(11);
    es().refuse();
    await until(() => stream.status === "offline");
    assert.equal(ES.instances.length, 1);
    window.dispatchEvent(new Event("online"));
    await until(() => ES.instances.length === 2);
    assert.equal(es().params.get("offset"), cur(11));
    es().live(11);
    assert.equal(stream.status, "live");
  });

  it("network loss (the probe fails) backs off; 403 goes offline for good", async () => {
    const answers = [{ error: new TypeError("Failed to fetch") }, { status: 403 }];
    const { stream, es, ES, log } = setup({
      fetch: fakeFetch((n) => answers[n - 1]),
      backoffBaseMs: 4,
    });
    stream.start();
    await until(() => es());
    es().refuse();
    await until(() => ES.instances.length === 2);
    assert.equal(log.errors.filter(Boolean)[0].status, 0);
    assert.ok(log.errors.filter(Boolean)[0].retryInMs < 4);
    es().refuse();
    await until(() => stream.status === "offline" && log.errors.at(-1)?.status === 403);
    await settle(20);
    assert.equal(ES.instances.length, 2);
  });

  it("EventSource's own reconnect (CONNECTING) is left to it and deduped", async () => {
    const { stream, es, ES, log, applied } = setup();
    stream.start();
    await until(() => es());
    es().changes(11, 12);
    es().live(12);
    es().drop();
    assert.equal(stream.status, "connecting");
    es().reopen();
    es().changes(12, 13); // resumed by Last-Event-ID
    es().live(13);
    assert.equal(ES.instances.length, 1);
    assert.deepEqual(applied(), [cur(11), cur(12), cur(13)]);
    assert.deepEqual(log.statuses, ["connecting", "live", "connecting", "live"]);
  });
});

describe("close frames", { timeout: 10000 }, () => {
  for (const reason of ["token_expired", "unauthorized"]) {
    it(`${reason}: token() again and a new EventSource from the last cursor at once`, async () => {
      let tokens = 0;
      const { stream, es, ES, applied } = setup({
        token: async () => {
          tokens += 1;
          return jwt({ sub: "alice", exp: Math.floor(Date.now() / 1000) + 3600, n: tokens });
        },
      });
      stream.start();
      await until(() => es());
      const first = es();
      first.changes(11, 12);
      first.live(12);
      first.send("close", { reason });
      assert.equal(first.closed, true);
      await until(() => ES.instances.length === 2);
      assert.equal(tokens, 2);
      assert.equal(es().params.get("offset"), cur(12));
      assert.notEqual(es().params.get("access_token"), first.params.get("access_token"));
      es().changes(12, 13);
      es().live(13);
      assert.deepEqual(applied(), [cur(11), cur(12), cur(13)]);
    });
  }

  it("shutdown: EventSource reconnects after the frame's retry by itself", async () => {
    const { stream, es, ES, applied } = setup();
    stream.start();
    await until(() => es());
    es().changes(11);
    es().live(11);
    es().send("close", { reason: "shutdown" });
    assert.equal(es().closed, false); // not closed: its own reconnect honours `retry:`
    es().drop(); // the server ended the response
    assert.equal(stream.status, "connecting");
    es().reopen();
    es().changes(11, 12);
    es().live(12);
    assert.equal(ES.instances.length, 1);
    assert.deepEqual(applied(), [cur(11), cur(12)]);
    assert.equal(stream.status, "live");
  });
});

describe("token renewal before exp", { timeout: 10000 }, () => {
  it("opens a second connection from the cursor and closes the first once it is live", async () => {
    let tokens = 0;
    const { stream, es, ES, applied } = setup({
      refreshBeforeExpS: 1,
      token: async () => {
        tokens += 1;
        // The first token is due for renewal in about 150 ms; the next ones in an hour.
        const exp = tokens === 1 ? Date.now() / 1000 + 1.15 : Date.now() / 1000 + 3600;
        return jwt({ sub: "alice", exp, n: tokens });
      },
    });
    stream.start();
    await until(() => es());
    const first = es();
    first.changes(11);
    first.live(11);
    await until(() => ES.instances.length === 2, 2000, "the renewed connection");
    const second = es();
    assert.equal(tokens, 2);
    assert.equal(second.params.get("offset"), cur(11));
    assert.notEqual(second.params.get("access_token"), first.params.get("access_token"));
    first.changes(12); // the first one still delivers meanwhile
    second.changes(12, 13);
    first.send("ephemeral", { type: "typing" });
    second.live(13);
    assert.equal(first.closed, true);
    second.changes(14);
    assert.deepEqual(applied(), [cur(11), cur(12), cur(13), cur(14)]);
    assert.equal(stream.status, "live");
  });

  it("refreshBeforeExpS 0 disables it", async () => {
    const { stream, es, ES } = setup({
      refreshBeforeExpS: 0,
      token: async () => jwt({ sub: "a", exp: Date.now() / 1000 + 1.05 }),
    });
    stream.start();
    await until(() => es());
    es().live(10);
    await settle(200);
    assert.equal(ES.instances.length, 1);
  });
});

describe("lifecycle", { timeout: 10000 }, () => {
  it("freeze closes the connection, resume reconnects from the applied cursor", async () => {
    const document = new EventTarget();
    const { stream, es, ES, open } = setup({ document });
    stream.start();
    await until(() => es());
    es().changes(11);
    es().live(11);
    document.dispatchEvent(new Event("freeze"));
    assert.equal(open().length, 0);
    document.dispatchEvent(new Event("resume"));
    await until(() => ES.instances.length === 2);
    assert.equal(es().params.get("offset"), cur(11));
  });

  it("close() closes the EventSource and reports closed", async () => {
    const { stream, es, log, open } = setup();
    const started = stream.start();
    await until(() => es());
    stream.close();
    await started; // resolves rather than hanging
    assert.equal(open().length, 0);
    assert.equal(stream.status, "closed");
    assert.equal(log.statuses.at(-1), "closed");
    assert.equal(log.statuses.filter((s) => s === "closed").length, 1);
  });

  it("start() rejects when the first bootstrap() fails", async () => {
    const { stream, ES, log } = setup({
      bootstrap: async () => {
        throw new Error("prefetch down");
      },
    });
    await assert.rejects(stream.start(), /prefetch down/);
    assert.equal(ES.instances.length, 0);
    assert.equal(log.statuses.at(-1), "offline");
  });
});
