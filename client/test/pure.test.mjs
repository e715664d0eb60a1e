// The pure rules of userstream.js: cursor order and dedupe, the must-refetch hold, full-jitter
// backoff, Retry-After, JWT claims, the storage key and connection URL, the ring slice.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  DEFAULTS,
  HeldQueue,
  backoffDelayMs,
  carriesSnapshot,
  compareCursors,
  isAfter,
  parseRetryAfter,
  ringAfter,
  storageKey,
  streamUrl,
  tokenClaims,
  tokenExpiry,
} from "../userstream.js";
import { jwt } from "../test-support/doubles.mjs";

describe("cursors", { timeout: 10000 }, () => {
  it("compare as plain strings, so fixed-width hex sorts by position", () => {
    assert.equal(compareCursors("000000000000002a", "000000000000002b"), -1);
    assert.equal(compareCursors("000000000000002b", "000000000000002a"), 1);
    assert.equal(compareCursors("00000000000000ff", "00000000000000ff"), 0);
    // A prefetch snapshot suffix sorts after its bare position and below the next one.
    assert.equal(compareCursors("000000000000002a", "000000000000002a-10:12:"), -1);
    assert.equal(compareCursors("000000000000002a-10:12:", "000000000000002b"), -1);
  });

  it("a change is new only when strictly after the applied cursor", () => {
    assert.equal(isAfter("0000000000000005", null), true);
    assert.equal(isAfter("0000000000000005", undefined), true);
    assert.equal(isAfter("0000000000000005", "0000000000000004"), true);
    assert.equal(isAfter("0000000000000005", "0000000000000005"), false);
    assert.equal(isAfter("0000000000000004", "0000000000000005"), false);
  });

  it("a cursor carries a prefetch snapshot when it has a '-'", () => {
    assert.equal(carriesSnapshot("000000000000002a-773:773:"), true);
    assert.equal(carriesSnapshot("000000000000002a-770:775:771,772"), true);
    assert.equal(carriesSnapshot("000000000000002a"), false);
    assert.equal(carriesSnapshot(null), false);
    assert.equal(carriesSnapshot(undefined), false);
  });
});

describe("HeldQueue", { timeout: 10000 }, () => {
  const c = (n) => ({ cursor: n.toString(16).padStart(16, "0"), n });

  it("releases only changes after the new cursor, each once, in order", () => {
    const held = new HeldQueue();
    for (const n of [3, 4, 4, 5, 7, 6, 8]) held.hold(c(n));
    const out = held.release(c(4).cursor).map((x) => x.n);
    assert.deepEqual(out, [5, 7, 8]); // 4 twice and 6 (after 7) dropped
    assert.deepEqual(held.changes, []);
  });

  it("releases nothing when the bootstrap is past every held change", () => {
    const held = new HeldQueue();
    held.hold(c(1));
    held.hold(c(2));
    assert.deepEqual(held.release(c(9).cursor), []);
  });

  it("tracks the stream position from changes and offset frames, reset by restart()", () => {
    const held = new HeldQueue();
    assert.equal(held.position, null);
    held.note(c(10).cursor);
    held.hold(c(12));
    held.note(c(11).cursor); // never moves back
    assert.equal(held.position, c(12).cursor);
    held.restart();
    assert.equal(held.position, null);
    assert.equal(held.changes.length, 1);
  });
});

describe("backoffDelayMs (full jitter)", { timeout: 10000 }, () => {
  it("stays in [0, min(cap, base * 2^attempt)) and honours the minimum", () => {
    for (let attempt = 0; attempt < 12; attempt += 1) {
      const ceiling = Math.min(30000, 1000 * 2 ** attempt);
      assert.equal(backoffDelayMs(attempt, { random: () => 0 }), 0);
      assert.equal(backoffDelayMs(attempt, { random: () => 0.999999 }), Math.floor(0.999999 * ceiling));
      assert.ok(backoffDelayMs(attempt, { random: () => 0.999999 }) < ceiling);
    }
    assert.equal(backoffDelayMs(0, { random: () => 0.5, minMs: 5000 }), 5000);
    assert.equal(backoffDelayMs(10, { random: () => 0.5, minMs: 5000 }), 15000);
    assert.equal(backoffDelayMs(2, { baseMs: 10, capMs: 25, random: () => 0.5 }), 12);
  });

  it("defaults to base 1000 ms and cap 30000 ms", () => {
    assert.equal(DEFAULTS.backoffBaseMs, 1000);
    assert.equal(DEFAULTS.backoffCapMs, 30000);
    assert.equal(backoffDelayMs(0, { random: () => 0.5 }), 500);
    assert.equal(backoffDelayMs(40, { random: () => 0.5 }), 15000);
  });

  it("spreads delays uniformly over the whole window", () => {
    const samples = 20000;
    const ceiling = 8000; // attempt 3
    const buckets = new Array(10).fill(0);
    let sum = 0;
    for (let i = 0; i < samples; i += 1) {
      const d = backoffDelayMs(3);
      assert.ok(d >= 0 && d < ceiling, `delay ${d} outside [0, ${ceiling})`);
      buckets[Math.floor((d / ceiling) * 10)] += 1;
      sum += d;
    }
    // Each tenth of the window gets about 10% (binomial sd ~0.2%); the mean is about half.
    for (const count of buckets) assert.ok(Math.abs(count / samples - 0.1) < 0.015, `${buckets}`);
    assert.ok(Math.abs(sum / samples - ceiling / 2) < ceiling * 0.02);
  });
});

describe("parseRetryAfter", { timeout: 10000 }, () => {
  it("reads delay-seconds and HTTP-dates, in milliseconds", () => {
    assert.equal(parseRetryAfter("3"), 3000);
    assert.equal(parseRetryAfter(" 0 "), 0);
    const now = Date.parse("2026-01-01T00:00:00Z");
    assert.equal(parseRetryAfter("Thu, 01 Jan 2026 00:00:05 GMT", now), 5000);
    assert.equal(parseRetryAfter("Wed, 31 Dec 2025 23:59:00 GMT", now), 0);
  });

  it("returns null when absent or unparsable", () => {
    assert.equal(parseRetryAfter(null), null);
    assert.equal(parseRetryAfter(undefined), null);
    assert.equal(parseRetryAfter("soon"), null);
    assert.equal(parseRetryAfter("-1"), null);
  });
});

describe("token claims", { timeout: 10000 }, () => {
  it("reads sub and exp from a base64url payload, UTF-8 included", () => {
    const token = jwt({ sub: "zoë/ü?>", exp: 1893456000 });
    assert.match(token.split(".")[1], /^[A-Za-z0-9_-]+$/); // base64url, unpadded
    assert.deepEqual(tokenClaims(token), { sub: "zoë/ü?>", exp: 1893456000 });
    assert.equal(tokenExpiry(token), 1893456000);
  });

  it("gives null for non-JWTs, payloads that are not objects, and missing exp", () => {
    assert.equal(tokenClaims("not-a-jwt"), null);
    assert.equal(tokenClaims("a.%%%.c"), null);
    assert.equal(tokenClaims(`x.${Buffer.from("[1]").toString("base64url")}.y`), null);
    assert.equal(tokenClaims(undefined), null);
    assert.equal(tokenExpiry(jwt({ sub: "a" })), null);
    assert.equal(tokenExpiry(jwt({ sub: "a", exp: "1893456000" })), null);
  });
});

describe("storageKey and streamUrl", { timeout: 10000 }, () => {
  it("keys the cursor by user and absolute URL, ignoring offset and access_token", () => {
    const key = storageKey("http://gw.example/me/stream", "alice");
    assert.equal(key, 'userstream:["alice","http://gw.example/me/stream"]');
    assert.equal(storageKey("http://gw.example/me/stream?offset=00&access_token=x", "alice"), key);
    assert.notEqual(storageKey("http://gw.example/me/stream", "bob"), key);
    assert.notEqual(storageKey("http://other.example/me/stream", "alice"), key);
    assert.notEqual(storageKey("http://gw.example/me/stream?tenant=2", "alice"), key);
  });

  it("puts the cursor in offset and the token in access_token", () => {
    const url = new URL(streamUrl("http://gw.example/me/stream?x=1&offset=old", "000000000000002a", "t.o.k"));
    assert.equal(url.pathname, "/me/stream");
    assert.equal(url.searchParams.get("x"), "1");
    assert.equal(url.searchParams.get("offset"), "000000000000002a");
    assert.equal(url.searchParams.get("access_token"), "t.o.k");
    const bare = new URL(streamUrl("http://gw.example/me/stream", null, null));
    assert.equal(bare.searchParams.has("offset"), false);
    assert.equal(bare.searchParams.has("access_token"), false);
  });
});

describe("ringAfter", { timeout: 10000 }, () => {
  const f = (n, frame) => ({ n, frame });
  const ring = [
    f(1, { t: "change", cursor: "a1" }),
    f(2, { t: "change", cursor: "a3" }),
    f(3, { t: "must-refetch" }),
    f(4, { t: "offset", cursor: "a5" }),
    f(5, { t: "change", cursor: "a6" }),
  ];

  it("starts after the last frame at or before the cursor", () => {
    assert.deepEqual(ringAfter(ring, "a5").map((x) => x.n), [5]);
    assert.deepEqual(ringAfter(ring, "a6").map((x) => x.n), []);
  });

  it("keeps a must-refetch that came after the cursor", () => {
    assert.deepEqual(ringAfter(ring, "a3").map((x) => x.n), [3, 4, 5]);
    assert.deepEqual(ringAfter(ring, "a0").map((x) => x.n), [1, 2, 3, 4, 5]);
  });
});
