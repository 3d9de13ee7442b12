import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { UnavailableError } from "../../../src/errors/index.js";
import { LeaseCache } from "../../../src/lease/cache.js";
import { FreePositions } from "../../../src/lease/free-positions.js";
import { freeRecord } from "../../../src/lease/record.js";
import { LeaseState, preferredIndex } from "../../../src/protocol/index.js";

/** Deterministic pseudo-random numbers in [0, 1) (mulberry32). */
function randomFrom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let value = state;
    value = Math.imul(value ^ (value >>> 15), value | 1);
    value ^= value + Math.imul(value ^ (value >>> 7), value | 61);
    return ((value ^ (value >>> 14)) >>> 0) / 2 ** 32;
  };
}

function ipsOf(count: number): string[] {
  return Array.from(
    { length: count },
    (_, index) => `10.0.${Math.floor(index / 250)}.${(index % 250) + 1}`,
  );
}

function leaseOf(ip: string, revision: number, state: LeaseState) {
  return { record: { ...freeRecord(ip, "t"), state }, revision };
}

/**
 * The order acquire used before the free set existed, computed by scanning
 * the whole pool: the reference the cache must reproduce.
 */
function scannedOrder(
  cache: LeaseCache,
  pool: readonly string[],
  allocationId: string,
  exclude: ReadonlySet<string>,
): string[] {
  const free = pool.filter(
    (ip) => !exclude.has(ip) && cache.get(ip)?.record.state === LeaseState.Free,
  );
  const first = preferredIndex(allocationId, free.length);
  return first < 0 ? [] : [...free.slice(first), ...free.slice(0, first)];
}

describe("free positions", () => {
  it("answers rank, k-th and next-free like a scan, through random changes", () => {
    const random = randomFrom(7);
    for (const size of [0, 1, 2, 5, 64, 100, 1000]) {
      const positions = new FreePositions(size);
      const flags = new Array<boolean>(size).fill(false);
      for (let step = 0; step < 400; step += 1) {
        if (size > 0) {
          const position = Math.floor(random() * size);
          const free = random() < 0.5;
          positions.set(position, free);
          flags[position] = free;
        }
        const free = flags.flatMap((flag, index) => (flag ? [index] : []));
        assert.equal(positions.count, free.length);
        const probe = Math.floor(random() * (size + 1));
        assert.equal(
          positions.countBefore(probe),
          free.filter((index) => index < probe).length,
        );
        const rank = Math.floor(random() * (free.length + 1));
        assert.equal(positions.nth(rank), free[rank] ?? -1);
        assert.equal(
          positions.nextFrom(probe),
          free.find((index) => index >= probe) ?? -1,
        );
      }
    }
  });
});

describe("lease cache candidates", () => {
  it("starts at the upstream MD5 pick and wraps around in pool order", () => {
    const pool = ipsOf(6);
    const cache = new LeaseCache(pool);
    pool.forEach((ip, index) => cache.put(ip, leaseOf(ip, index + 1, "free")));
    // MD5("pod-1") picks index 3 of 6 (the upstream provider's choice).
    assert.deepEqual(
      [...cache.candidates("pod-1", new Set())],
      [pool[3], pool[4], pool[5], pool[0], pool[1], pool[2]],
    );
  });

  it("offers nothing when nothing is free", () => {
    const pool = ipsOf(3);
    const cache = new LeaseCache(pool);
    assert.deepEqual([...cache.candidates("pod-1", new Set())], []);
    pool.forEach((ip, index) =>
      cache.put(ip, leaseOf(ip, index + 1, "claimed")),
    );
    assert.deepEqual([...cache.candidates("pod-1", new Set())], []);
    assert.equal(cache.freeCount(new Set()), 0);
  });

  it("gives the order of a full scan, excluded IPs skipped, in random pools", () => {
    const random = randomFrom(11);
    const states = Object.values(LeaseState);
    for (let round = 0; round < 300; round += 1) {
      const pool = ipsOf(1 + Math.floor(random() * 40));
      const cache = new LeaseCache(pool);
      let revision = 0;
      for (let change = 0; change < pool.length * 2; change += 1) {
        const ip = pool[Math.floor(random() * pool.length)]!;
        revision += 1;
        if (random() < 0.1) {
          cache.remove(ip, revision);
        } else {
          const state = random() < 0.5 ? "free" : states[change % 5]!;
          cache.put(ip, leaseOf(ip, revision, state));
        }
      }
      const exclude = new Set(
        pool.filter(() => random() < 0.2).concat(["192.0.2.1"]),
      );
      const allocationId = `pod-${round}`;
      const expected = scannedOrder(cache, pool, allocationId, exclude);

      assert.deepEqual(
        [...cache.candidates(allocationId, exclude)],
        expected,
        `round ${round}`,
      );
      assert.equal(cache.freeCount(exclude), expected.length);
    }
  });

  it("passes over an IP taken while the caller tried the previous one", () => {
    const pool = ipsOf(6);
    const cache = new LeaseCache(pool);
    pool.forEach((ip, index) => cache.put(ip, leaseOf(ip, index + 1, "free")));
    const seen: string[] = [];
    for (const ip of cache.candidates("pod-1", new Set())) {
      seen.push(ip);
      if (ip === pool[3]) {
        cache.put(pool[4]!, leaseOf(pool[4]!, 10, "claimed"));
      }
    }
    assert.deepEqual(seen, [pool[3], pool[5], pool[0], pool[1], pool[2]]);
  });
});

describe("lease cache", () => {
  const lease = (revision: number, state: "free" | "claimed") =>
    leaseOf("10.0.0.1", revision, state);

  it("only moves forward in revision, whoever reports first", () => {
    const cache = new LeaseCache(["10.0.0.1"]);
    cache.put("10.0.0.1", lease(5, "claimed"));
    cache.put("10.0.0.1", lease(4, "free"));
    assert.equal(cache.get("10.0.0.1")?.revision, 5);
    assert.equal(cache.freeCount(new Set()), 0);
    cache.remove("10.0.0.1", 6);
    cache.put("10.0.0.1", lease(5, "claimed"));
    assert.equal(cache.get("10.0.0.1"), undefined);
    cache.put("10.0.0.1", lease(7, "free"));
    assert.equal(cache.freeCount(new Set()), 1);
    assert.equal(cache.freeCount(new Set(["10.0.0.1"])), 0);
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
