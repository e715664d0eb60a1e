// One connection per browser: tabs (UserStream instances) share a stream through a Web Lock
// (a faithful in-process lock manager) and Node's own BroadcastChannel. Each tab applies every
// change once, in order, across joins, leader changes and freezes.
import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";

import { UserStream, storageKey } from "../userstream.js";
import {
  FakeLocks,
  cur,
  fakeEventSourceClass,
  fakeFetch,
  memoryStorage,
  settle,
  snap,
  until,
} from "../test-support/doubles.mjs";

let run = 0;
const tabs = [];
afterEach(() => {
  while (tabs.length) tabs.pop().stream.close();
});

/** A browser: one lock manager and one EventSource class (to count connections) for its tabs. */
function browser() {
  run += 1;
  const url = `http://gw.example/me/stream?run=${run}`;
  const ES = fakeEventSourceClass();
  const locks = new FakeLocks();
  const open = () => ES.instances.filter((e) => !e.closed);
  return { url, ES, locks, open, key: storageKey(url, "") };
}

/**
 * A tab of that browser; `bootCursor` is what its bootstrap() returns: a position, a cursor
 * string, or a function of the call number returning either.
 */
function tab(b, options = {}) {
  const log = { changes: [], resets: [], statuses: [], ephemeral: [] };
  const document = new EventTarget();
  const bootCursor = options.bootCursor ?? 10;
  let boots = 0;
  const stream = new UserStream({
    url: b.url,
    EventSource: b.ES,
    locks: b.locks,
    BroadcastChannel,
    document,
    storage: options.storage ?? memoryStorage(),
    fetch: fakeFetch({ status: 200 }),
    ringSize: options.ringSize,
    bootstrap: async () => {
      boots += 1;
      const at = typeof bootCursor === "function" ? bootCursor(boots) : bootCursor;
      return { cursor: typeof at === "string" ? at : cur(at), data: boots };
    },
    onChange: (c) => log.changes.push(c.cursor),
    onReset: (data) => log.resets.push(data),
    onStatus: (s) => log.statuses.push(s),
    onEphemeral: (s) => log.ephemeral.push(s),
  });
  const t = { stream, log, document, boots: () => boots };
  tabs.push(t);
  return t;
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => cur(from + i));

describe("tabs share one connection", { timeout: 10000 }, () => {
  it("a second tab follows the leader's connection and gets the frames sent before it joined", async () => {
    const b = browser();
    const a = tab(b);
    const started = a.stream.start();
    await until(() => b.ES.instances.length === 1);
    await until(() => a.stream.role === "leader");
    const es = b.ES.instances[0];
    assert.equal(es.params.get("offset"), cur(10));
    es.changes(11, 12);
    es.live(12);
    await started;

    const t2 = tab(b, { bootCursor: 11 }); // its bootstrap already has 11; 12 is only in the ring
    await t2.stream.start();
    assert.equal(t2.stream.role, "follower");
    assert.equal(t2.stream.status, "live");
    assert.deepEqual(t2.log.changes, [cur(12)]);

    es.changes(13, 14);
    es.send("ephemeral", { type: "typing" });
    await until(() => t2.log.changes.length === 3);
    assert.deepEqual(a.log.changes, range(11, 14));
    assert.deepEqual(t2.log.changes, range(12, 14));
    assert.deepEqual(t2.log.ephemeral, [{ type: "typing" }]);
    assert.equal(b.ES.instances.length, 1); // one connection for both tabs
    assert.equal(t2.stream.cursor, cur(14));
  });

  it("when the leader closes, the next tab connects from its own cursor: no gap, no duplicate", async () => {
    const b = browser();
    const a = tab(b);
    a.stream.start();
    await until(() => b.ES.instances.length === 1);
    const first = b.ES.instances[0];
    first.changes(11);
    first.live(11);
    const t2 = tab(b);
    const t3 = tab(b);
    await Promise.all([t2.stream.start(), t3.stream.start()]);
    first.changes(12, 13);
    await until(() => t2.log.changes.length === 3 && t3.log.changes.length === 3);

    a.stream.close();
    assert.equal(first.closed, true);
    await until(() => b.ES.instances.length === 2, 2000, "the next leader's connection");
    const leader = [t2, t3].find((t) => t.stream.role === "leader");
    const follower = [t2, t3].find((t) => t !== leader);
    assert.ok(leader && follower.stream.role === "follower");
    const second = b.ES.instances[1];
    assert.equal(second.params.get("offset"), cur(13));
    second.changes(13, 14); // catch-up after 13 may repeat 13 on another replica
    second.live(14);
    second.changes(15);
    await until(() => follower.log.changes.length === 5);
    for (const t of [t2, t3]) assert.deepEqual(t.log.changes, range(11, 15));
    assert.equal(follower.stream.status, "live");
    assert.equal(b.open().length, 1);
  });

  it("a tab whose cursor the ring no longer covers catches up on its own, then follows", async () => {
    const b = browser();
    const a = tab(b, { ringSize: 2 });
    a.stream.start();
    await until(() => b.ES.instances.length === 1);
    const shared = b.ES.instances[0];
    shared.changes(...Array.from({ length: 10 }, (_, i) => 11 + i)); // 11..20; the ring keeps 19, 20
    shared.live(20);

    const late = tab(b, { storage: memoryStorage({ [b.key]: cur(12) }) });
    const started = late.stream.start();
    await until(() => b.ES.instances.length === 2, 2000, "the catch-up connection");
    const own = b.ES.instances[1];
    assert.equal(own.params.get("offset"), cur(12));
    shared.changes(21, 22); // buffered by the late tab meanwhile
    await settle();
    assert.deepEqual(late.log.changes, []);
    own.changes(13, 14, 15, 16, 17, 18, 19, 20);
    assert.equal(own.closed, true); // at the leader's cursor: back to one connection
    await started;
    assert.deepEqual(late.log.changes, range(13, 22));
    shared.changes(23);
    await until(() => late.log.changes.length === 11);
    assert.deepEqual(late.log.changes, range(13, 23));
    assert.equal(late.boots(), 0); // resumed from its stored cursor
  });

  it("a frozen leader gives up; the next tab leads; the frozen tab rejoins on resume", async () => {
    const b = browser();
    const a = tab(b);
    a.stream.start();
    await until(() => b.ES.instances.length === 1);
    const first = b.ES.instances[0];
    first.changes(11);
    first.live(11);
    const t2 = tab(b);
    await t2.stream.start();

    a.document.dispatchEvent(new Event("freeze"));
    assert.equal(first.closed, true);
    await until(() => t2.stream.role === "leader");
    const second = b.ES.instances[1];
    assert.equal(second.params.get("offset"), cur(11));
    second.live(11);
    second.changes(12);

    a.document.dispatchEvent(new Event("resume"));
    await until(() => a.stream.role === "follower" && a.stream.status === "live");
    second.changes(13);
    await until(() => a.log.changes.length === 3);
    assert.deepEqual(a.log.changes, range(11, 13));
    assert.deepEqual(t2.log.changes, range(11, 13));
    assert.equal(b.open().length, 1);
  });

  it("must-refetch reaches every tab: each bootstraps again and, with a plain cursor, applies only what follows", async () => {
    const b = browser();
    const boot = (n) => (n === 1 ? 10 : 32);
    const a = tab(b, { bootCursor: boot });
    a.stream.start();
    await until(() => b.ES.instances.length === 1);
    const es = b.ES.instances[0];
    es.live(10);
    const t2 = tab(b, { bootCursor: boot });
    await t2.stream.start();

    es.send("must-refetch", { reason: "retention" });
    es.live(30);
    es.changes(31, 32, 35);
    await until(() => a.log.resets.length === 1 && t2.log.resets.length === 1);
    await until(() => t2.log.changes.length === 1);
    assert.deepEqual(a.log.changes, [cur(35)]);
    assert.deepEqual(t2.log.changes, [cur(35)]);
    assert.equal(a.boots(), 2);
    assert.equal(t2.boots(), 2);
  });

  it("a tab with a snapshot cursor never takes the free lock: alone until a plain cursor, then leads on that connection", async () => {
    const b = browser();
    const a = tab(b, { bootCursor: snap(10) });
    const started = a.stream.start();
    await until(() => b.ES.instances.length === 1);
    const own = b.ES.instances[0];
    assert.equal(own.params.get("offset"), snap(10));
    own.changeAt(11, snap(11));
    own.live(snap(11));
    await started;
    await settle(20);
    assert.equal(a.stream.role, "alone");
    assert.equal(b.locks.holder(b.key), null);

    own.changes(12); // plain: the watch is over
    await until(() => a.stream.role === "leader");
    assert.equal(b.ES.instances.length, 1); // it leads with the connection it has
    assert.equal(own.closed, false);
    const t2 = tab(b, { bootCursor: 12 });
    await t2.stream.start();
    assert.equal(t2.stream.role, "follower");
    own.changes(13);
    await until(() => t2.log.changes.length === 1);
    assert.deepEqual(a.log.changes, [snap(11), cur(12), cur(13)]);
    assert.deepEqual(t2.log.changes, [cur(13)]);
    assert.deepEqual(a.log.statuses, ["connecting", "live"]);
    assert.equal(b.open().length, 1);
  });

  it("a joining tab with a snapshot cursor streams alone, not judging the leader's frames, then follows", async () => {
    const b = browser();
    const a = tab(b);
    a.stream.start();
    await until(() => a.stream.role === "leader" && b.ES.instances.length === 1);
    const shared = b.ES.instances[0];
    shared.changes(11, 12);
    shared.live(12);

    // Its prefetch saw 13's transaction (positioned later), not 14's (702, still running).
    const t2 = tab(b, { bootCursor: snap(12) });
    const started = t2.stream.start();
    await until(() => b.ES.instances.length === 2, 2000, "the joining tab's own connection");
    const own = b.ES.instances[1];
    assert.equal(own.params.get("offset"), snap(12));
    assert.equal(t2.stream.role, "alone");
    shared.changes(13, 14); // applied by the leader; 13 is already in t2's data
    own.changeAt(14, snap(14)); // the gateway left 13 out
    own.live(snap(14));
    await started;
    await settle(20);
    assert.deepEqual(t2.log.changes, [snap(14)]);
    assert.equal(t2.stream.role, "alone");
    assert.equal(b.locks.holder(b.key) !== null, true);

    shared.changes(15);
    own.changes(15); // plain: the watch is over, it joins the leader
    await until(() => t2.stream.role === "follower" && own.closed, 2000, "the join");
    shared.changes(16);
    await until(() => t2.log.changes.length === 3);
    assert.deepEqual(t2.log.changes, [snap(14), cur(15), cur(16)]);
    assert.deepEqual(a.log.changes, range(11, 16));
    assert.equal(t2.stream.status, "live");
    assert.deepEqual(t2.log.statuses, ["connecting", "live"]);
    assert.equal(b.open().length, 1);
  });

  it("must-refetch with snapshot cursors: the leader gives up, each tab reconnects from its own cursor, then they share again", async () => {
    const b = browser();
    const snapA = snap(31);
    const snapB = snap(32, "700:706:702");
    const a = tab(b, { bootCursor: (n) => (n === 1 ? 10 : snapA) });
    a.stream.start();
    await until(() => a.stream.role === "leader" && b.ES.instances.length === 1);
    const shared = b.ES.instances[0];
    shared.live(10);
    const t2 = tab(b, { bootCursor: (n) => (n === 1 ? 10 : snapB) });
    await t2.stream.start();
    const from = (offset) => b.ES.instances.find((es) => !es.closed && es.params.get("offset") === offset);

    shared.send("must-refetch", { reason: "retention" });
    shared.live(30);
    shared.changes(31, 32, 33); // some of these are in the new data, positioned after its cursor
    await until(() => from(snapA), 2000, "the former leader's own connection");
    assert.equal(shared.closed, true);
    await until(() => from(snapB) || from(cur(10)), 2000, "the other tab's connection");
    const relead = from(cur(10));
    if (relead) {
      // It took the free lock before it read the broadcast frames: it leads from its own
      // cursor, and the gateway tells it to refetch as well.
      relead.send("must-refetch", { reason: "retention" });
      relead.live(30);
      relead.changes(31, 32, 33);
    }
    await until(() => from(snapB), 2000, "the other tab's own connection");
    await until(() => b.locks.holder(b.key) === null, 2000, "the lock to be free");
    assert.equal(b.open().length, 2);
    assert.deepEqual([a.stream.role, t2.stream.role], ["alone", "alone"]);
    const ownA = from(snapA);
    const ownB = from(snapB);
    ownA.changeAt(33, snap(33));
    ownA.live(snap(33));
    ownB.live(snapB); // 33 is in t2's data
    await until(() => a.stream.status === "live" && t2.stream.status === "live");
    assert.deepEqual(a.log.changes, [snap(33)]);
    assert.deepEqual(t2.log.changes, []);

    ownA.changes(34); // plain: a's watch is over, it leads with this connection
    await until(() => a.stream.role === "leader");
    ownB.changes(34);
    await until(() => t2.stream.role === "follower" && ownB.closed, 2000, "the join");
    ownA.changes(35);
    await until(() => t2.log.changes.length === 2);
    assert.deepEqual(a.log.changes, [snap(33), cur(34), cur(35)]);
    assert.deepEqual(t2.log.changes, [cur(34), cur(35)]);
    assert.deepEqual(a.log.resets, [2]);
    assert.deepEqual(t2.log.resets, [2]);
    assert.equal(b.open().length, 1);
  });

  it("followers mirror the leader's status", async () => {
    const b = browser();
    const a = tab(b);
    a.stream.start();
    await until(() => b.ES.instances.length === 1);
    b.ES.instances[0].live(10);
    const t2 = tab(b);
    await t2.stream.start();
    b.ES.instances[0].drop();
    await until(() => t2.stream.status === "connecting");
    b.ES.instances[0].reopen();
    b.ES.instances[0].live(10);
    await until(() => t2.stream.status === "live");
    assert.deepEqual(t2.log.statuses, ["connecting", "live", "connecting", "live"]);
  });
});

describe("alone", { timeout: 10000 }, () => {
  it("without Web Locks, or with share: false, a tab connects by itself", async () => {
    const ES = fakeEventSourceClass();
    const common = { url: "http://gw.example/me/stream?alone=1", EventSource: ES, BroadcastChannel };
    const s1 = new UserStream({ ...common, bootstrap: () => ({ cursor: cur(1), data: null }), onChange() {}, storage: memoryStorage() });
    const s2 = new UserStream({
      ...common,
      locks: new FakeLocks(),
      share: false,
      bootstrap: () => ({ cursor: cur(1), data: null }),
      onChange() {},
      storage: memoryStorage(),
    });
    tabs.push({ stream: s1 }, { stream: s2 });
    assert.equal(s1.role, "alone"); // Node 20 has no navigator.locks
    assert.equal(s2.role, "alone");
    s1.start();
    s2.start();
    await until(() => ES.instances.length === 2);
  });

  it("falls back to alone when the lock cannot be taken here", async (t) => {
    t.mock.method(console, "warn", () => {});
    const ES = fakeEventSourceClass();
    const locks = {
      request: async () => {
        throw new DOMException("opaque origin", "SecurityError");
      },
    };
    const stream = new UserStream({
      url: "http://gw.example/me/stream?alone=2",
      EventSource: ES,
      BroadcastChannel,
      locks,
      bootstrap: () => ({ cursor: cur(1), data: null }),
      onChange() {},
      storage: memoryStorage(),
    });
    tabs.push({ stream });
    assert.equal(stream.role, "follower");
    const started = stream.start();
    await until(() => ES.instances.length === 1);
    assert.equal(stream.role, "alone");
    ES.instances[0].live(1);
    await started;
  });
});
