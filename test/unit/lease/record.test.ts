import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  InvalidRequestError,
  UnavailableError,
} from "../../../src/errors/index.js";
import { LeaseCache } from "../../../src/lease/cache.js";
import {
  candidateOrder,
  checkAllocationId,
  describeCounts,
  emptyCounts,
  encodeJson,
  freeRecord,
  parseAllocationIndex,
  parseLeaseRecord,
  requireIp,
} from "../../../src/lease/record.js";

describe("lease candidate order", () => {
  it("starts at the upstream MD5 pick and wraps around in pool order", () => {
    const free = [
      "10.0.0.1",
      "10.0.0.2",
      "10.0.0.3",
      "10.0.0.4",
      "10.0.0.5",
      "10.0.0.6",
    ];
    // MD5("pod-1") picks index 3 of 6 (the upstream provider's choice).
    assert.deepEqual(candidateOrder("pod-1", free), [
      "10.0.0.4",
      "10.0.0.5",
      "10.0.0.6",
      "10.0.0.1",
      "10.0.0.2",
      "10.0.0.3",
    ]);
  });

  it("offers nothing when nothing is free", () => {
    assert.deepEqual(candidateOrder("pod-1", []), []);
  });
});

describe("allocation ids and IPs", () => {
  it("accepts upstream allocation ids", () => {
    assert.equal(checkAllocationId("nginx-7d9-abc123"), "nginx-7d9-abc123");
    assert.equal(checkAllocationId("a.b_c=d"), "a.b_c=d");
  });

  it("refuses ids that cannot be a KV key part", () => {
    for (const bad of [
      "",
      "a b",
      "a..b",
      ".a",
      "a.",
      "a*",
      "a>",
      "x".repeat(256),
      7,
    ]) {
      assert.throws(() => checkAllocationId(bad), InvalidRequestError);
    }
  });

  it("makes IPs canonical and names a bad one", () => {
    assert.equal(requireIp("2001:DB8:0:0::1"), "2001:db8::1");
    assert.throws(
      () => requireIp("10.0.0"),
      /"10\.0\.0" is not an IPv4 or IPv6/,
    );
  });
});

describe("stored values", () => {
  it("reads back a lease record for its own IP only", () => {
    const record = freeRecord("10.0.0.1", "2026-01-01T00:00:00.000Z");
    assert.deepEqual(parseLeaseRecord(encodeJson(record), "10.0.0.1"), record);
    assert.equal(parseLeaseRecord(encodeJson(record), "10.0.0.2"), undefined);
  });

  it("refuses damaged values", () => {
    const encoder = new TextEncoder();
    for (const text of ["not json", "[]", '{"ip":"10.0.0.1","state":"gone"}']) {
      assert.equal(
        parseLeaseRecord(encoder.encode(text), "10.0.0.1"),
        undefined,
      );
    }
    assert.equal(parseAllocationIndex(encodeJson({ token: "t" })), undefined);
    assert.deepEqual(
      parseAllocationIndex(
        encodeJson({ allocationId: "a", token: "t", since: "s" }),
      ),
      { allocationId: "a", token: "t", since: "s" },
    );
  });

  it("describes counts in lifecycle order", () => {
    const counts = { ...emptyCounts(), claimed: 2 };
    assert.equal(
      describeCounts(counts),
      "0 free, 2 claimed, 0 ready, 0 releasing, 0 quarantined",
    );
  });
});

describe("lease cache", () => {
  const lease = (revision: number, state: "free" | "claimed") => ({
    record: { ...freeRecord("10.0.0.1", "t"), state },
    revision,
  });

  it("only moves forward in revision, whoever reports first", () => {
    const cache = new LeaseCache();
    cache.put("10.0.0.1", lease(5, "claimed"));
    cache.put("10.0.0.1", lease(4, "free"));
    assert.equal(cache.get("10.0.0.1")?.revision, 5);
    cache.remove("10.0.0.1", 6);
    cache.put("10.0.0.1", lease(5, "claimed"));
    assert.equal(cache.get("10.0.0.1"), undefined);
  });

  it("resolves a catch-up once the watch passes the revision, and fails when closed", async () => {
    const cache = new LeaseCache();
    const waiting = cache.caughtUp(3, 1000);
    cache.watched(2);
    cache.watched(3);
    await waiting;
    const never = cache.caughtUp(10, 1000);
    cache.close(new UnavailableError("closed"));
    await assert.rejects(never, UnavailableError);
    await assert.rejects(cache.caughtUp(11, 1000), UnavailableError);
  });

  it("times out a catch-up the watch never reaches", async () => {
    const cache = new LeaseCache();
    await assert.rejects(cache.caughtUp(1, 20), /did not reach revision 1/);
  });
});
