import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { InvalidRequestError } from "../../../src/errors/index.js";
import {
  checkAllocationId,
  describeCounts,
  emptyCounts,
  encodeJson,
  freeRecord,
  parseAllocationIndex,
  parseLeaseRecord,
  requireIp,
} from "../../../src/lease/record.js";

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
