import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import {
  InvalidRequestError,
  NotOwnerError,
  PoolExhaustedError,
  UnavailableError,
} from "../../src/errors/index.js";
import { createLeaseStore } from "../../src/lease/index.js";
import { allocationKey, leaseKey } from "../../src/protocol/index.js";
import {
  claimFor,
  connectFor,
  pool,
  rawBucket,
  startStore,
  uniqueBucket,
} from "../helpers/lease.js";
import { startNatsServer, type NatsServer } from "../helpers/nats.js";

const hostKey = { type: "ssh-ed25519", fingerprint: "SHA256:abc" };

describe("lease store", () => {
  let server: NatsServer;

  before(async () => {
    server = await startNatsServer();
  });
  after(async () => {
    await server?.stop();
  });

  it("walks a lease through claimed, ready, releasing and free", async (t) => {
    const ips = pool("127.0.1", 1, 3);
    const store = await startStore(t, server.url, {
      bucket: uniqueBucket(),
      pool: ips,
      agent: "agent-1",
    });

    const { lease, existing } = await store.acquire(claimFor("pod-a-1"));
    assert.equal(existing, false);
    assert.equal(lease.record.state, "claimed");
    assert.equal(lease.record.allocationId, "pod-a-1");
    assert.equal(lease.record.agent, "agent-1");
    const ip = lease.record.ip;

    const ready = await store.markReady(ip, "pod-a-1", hostKey);
    assert.equal(ready.record.state, "ready");
    assert.deepEqual(ready.record.hostKey, hostKey);
    const again = await store.markReady(ip, "pod-a-1", hostKey);
    assert.equal(again.revision, ready.revision, "markReady is idempotent");

    const releasing = await store.beginRelease(ip, "pod-a-1");
    assert.equal(releasing?.record.state, "releasing");
    assert.equal(releasing?.record.allocationId, "pod-a-1");
    assert.deepEqual(releasing?.record.hostKey, hostKey);
    const stillReleasing = await store.beginRelease(ip, "pod-a-1");
    assert.equal(stillReleasing?.revision, releasing?.revision);
    assert.equal(
      (await store.findByAllocation("pod-a-1"))?.record.ip,
      ip,
      "a releasing lease still belongs to its allocation",
    );

    const freed = await store.free(ip);
    assert.equal(freed.record.state, "free");
    assert.equal(freed.record.allocationId, undefined);
    assert.equal(freed.record.hostKey, undefined);
    assert.equal(await store.findByAllocation("pod-a-1"), undefined);
    assert.deepEqual(await store.counts(), {
      free: 3,
      claimed: 0,
      ready: 0,
      releasing: 0,
      quarantined: 0,
    });
  });

  it("gives the same IP to the same allocation id, one after another", async (t) => {
    const bucket = uniqueBucket();
    const store = await startStore(t, server.url, {
      bucket,
      pool: pool("127.0.1", 1, 4),
      agent: "agent-1",
    });

    const first = await store.acquire(claimFor("pod-b-1"));
    const second = await store.acquire(claimFor("pod-b-1"));
    assert.equal(second.existing, true);
    assert.equal(second.lease.record.ip, first.lease.record.ip);
    assert.equal(second.lease.record.requestId, first.lease.record.requestId);
    assert.equal((await store.counts()).claimed, 1);

    const kv = await rawBucket(t, server.url, bucket);
    const index = await kv.get(allocationKey("pod-b-1"));
    assert.equal(index?.json<{ ip: string }>().ip, first.lease.record.ip);
  });

  it("gives one IP to concurrent acquires of one allocation id", async (t) => {
    const bucket = uniqueBucket();
    const options = { bucket, pool: pool("127.0.1", 1, 12) };
    const stores = [
      await startStore(t, server.url, { ...options, agent: "agent-1" }),
      await startStore(t, server.url, { ...options, agent: "agent-2" }),
      await startStore(t, server.url, { ...options, agent: "agent-3" }),
    ];

    for (let round = 0; round < 10; round += 1) {
      const allocationId = `pod-c-${round}`;
      const results = await Promise.all(
        stores.flatMap((store) => [
          store.acquire(claimFor(allocationId)),
          store.acquire(claimFor(allocationId)),
        ]),
      );
      const ips = new Set(results.map((result) => result.lease.record.ip));
      assert.equal(ips.size, 1, `round ${round}: ${[...ips].join(", ")}`);
      const fresh = results.filter((result) => !result.existing);
      assert.ok(fresh.length >= 1, "someone claimed it");
      const owned = (await stores[0]!.list()).filter(
        (lease) => lease.record.allocationId === allocationId,
      );
      assert.equal(owned.length, 1, `round ${round}: one lease`);
    }
  });

  it("refuses with PoolExhaustedError and changes nothing when no IP is free", async (t) => {
    const bucket = uniqueBucket();
    const store = await startStore(t, server.url, {
      bucket,
      pool: pool("127.0.1", 1, 2),
      agent: "agent-1",
    });
    await store.acquire(claimFor("pod-d-1"));
    const second = await store.acquire(claimFor("pod-d-2"));
    await store.markReady(second.lease.record.ip, "pod-d-2", hostKey);
    const before = await store.list();

    await assert.rejects(store.acquire(claimFor("pod-d-3")), (error) => {
      assert.ok(error instanceof PoolExhaustedError);
      assert.equal(error.code, "POOL_EXHAUSTED");
      assert.match(error.message, /pool of 2: 0 free, 1 claimed, 1 ready/);
      return true;
    });

    assert.deepEqual(await store.list(), before);
    const kv = await rawBucket(t, server.url, bucket);
    assert.equal(await kv.get(allocationKey("pod-d-3")), null);
  });

  it("skips excluded IPs and says so when only they are free", async (t) => {
    const ips = pool("127.0.1", 1, 2);
    const store = await startStore(t, server.url, {
      bucket: uniqueBucket(),
      pool: ips,
      agent: "agent-1",
    });
    const { lease } = await store.acquire(claimFor("pod-e-1"), {
      exclude: new Set([ips[0]!]),
    });
    assert.equal(lease.record.ip, ips[1]);
    await assert.rejects(
      store.acquire(claimFor("pod-e-2"), { exclude: new Set([ips[0]!]) }),
      /1 free IPs excluded/,
    );
  });

  it("refuses to release a lease of another allocation with NotOwnerError", async (t) => {
    const store = await startStore(t, server.url, {
      bucket: uniqueBucket(),
      pool: pool("127.0.1", 1, 2),
      agent: "agent-1",
    });
    const { lease } = await store.acquire(claimFor("pod-f-1"));

    await assert.rejects(
      store.beginRelease(lease.record.ip, "pod-f-2"),
      NotOwnerError,
    );
    await assert.rejects(
      store.markReady(lease.record.ip, "pod-f-2", hostKey),
      NotOwnerError,
    );
    const unchanged = await store.get(lease.record.ip);
    assert.equal(unchanged?.revision, lease.revision);
  });

  it("treats release of an unknown or free IP as done, and refuses unknown IPs to operator actions", async (t) => {
    const ips = pool("127.0.1", 1, 2);
    const store = await startStore(t, server.url, {
      bucket: uniqueBucket(),
      pool: ips,
      agent: "agent-1",
    });

    assert.equal(await store.beginRelease("10.99.0.1"), undefined);
    assert.equal(await store.beginRelease(ips[0]!, "pod-g-1"), undefined);
    assert.equal(await store.get("10.99.0.1"), undefined);
    for (const action of [
      () => store.forceRelease("10.99.0.1"),
      () => store.unquarantine("10.99.0.1"),
      () => store.quarantine("10.99.0.1", "test"),
      () => store.free("10.99.0.1"),
    ]) {
      await assert.rejects(action(), (error) => {
        assert.ok(error instanceof InvalidRequestError);
        assert.match(error.message, /10\.99\.0\.1/);
        return true;
      });
    }
    await assert.rejects(store.get("not-an-ip"), InvalidRequestError);
    await assert.rejects(
      store.acquire(claimFor("bad id with spaces")),
      InvalidRequestError,
    );
  });

  it("never leases a quarantined IP and unbinds its allocation", async (t) => {
    const ips = pool("127.0.1", 1, 3);
    const store = await startStore(t, server.url, {
      bucket: uniqueBucket(),
      pool: ips,
      agent: "agent-1",
    });
    const { lease } = await store.acquire(claimFor("pod-h-1"));
    const bad = lease.record.ip;

    await assert.rejects(
      store.quarantine(bad, "probe failed", { expectAllocationId: "pod-h-9" }),
      NotOwnerError,
    );
    const quarantined = await store.quarantine(bad, "probe failed", {
      expectAllocationId: "pod-h-1",
    });
    assert.equal(quarantined.record.state, "quarantined");
    assert.equal(quarantined.record.reason, "probe failed");
    await assert.rejects(
      store.markReady(bad, "pod-h-1", hostKey),
      NotOwnerError,
    );
    assert.equal(
      (await store.beginRelease(bad, "pod-h-1"))?.record.state,
      "quarantined",
    );

    const next = await store.acquire(claimFor("pod-h-1"));
    assert.equal(next.existing, false);
    assert.notEqual(next.lease.record.ip, bad);
    const other = await store.acquire(claimFor("pod-h-2"));
    assert.notEqual(other.lease.record.ip, bad);
    await assert.rejects(
      store.acquire(claimFor("pod-h-3")),
      PoolExhaustedError,
    );

    await assert.rejects(store.free(bad), NotOwnerError);
    const back = await store.unquarantine(bad);
    assert.equal(back.record.state, "free");
    assert.equal(
      (await store.acquire(claimFor("pod-h-3"))).lease.record.ip,
      bad,
    );
  });

  it("keeps the first reason of a quarantine unless the new one replaces it", async (t) => {
    const [ip] = pool("127.0.1", 1, 1);
    const store = await startStore(t, server.url, {
      bucket: uniqueBucket(),
      pool: [ip!],
      agent: "agent-1",
    });
    const first = await store.quarantine(ip!, "unreachable: timeout");
    const again = await store.quarantine(ip!, "unreachable: refused");
    assert.equal(again.record.reason, "unreachable: timeout");
    assert.equal(again.revision, first.revision);

    const replaced = await store.quarantine(ip!, "operator: disk", {
      replaceReason: true,
    });
    assert.equal(replaced.record.state, "quarantined");
    assert.equal(replaced.record.reason, "operator: disk");
    assert.equal(replaced.record.since, first.record.since);
    assert.equal((await store.get(ip!))?.record.reason, "operator: disk");
  });

  it("reconciles: keeps live leases and orphans, adds new pool IPs, reports orphans", async (t) => {
    const bucket = uniqueBucket();
    const [a, b, c, d] = pool("127.0.2", 1, 4) as [
      string,
      string,
      string,
      string,
    ];
    const first = await startStore(t, server.url, {
      bucket,
      pool: [a, b, c],
      agent: "agent-1",
    });
    const onA = await first.acquire(claimFor("pod-i-1"), {
      exclude: new Set([b, c]),
    });
    const onB = await first.acquire(claimFor("pod-i-2"), {
      exclude: new Set([a, c]),
    });
    assert.equal(onB.lease.record.ip, b);
    await first.close();

    const nc = await connectFor(t, server.url);
    const second = createLeaseStore({
      nc,
      bucket,
      pool: [a, c, d],
      agent: "agent-2",
    });
    t.after(() => second.close());
    const report = await second.start();

    assert.deepEqual(report.created, [d]);
    assert.equal(report.present, 2);
    assert.deepEqual(
      report.orphans.map((lease) => [lease.record.ip, lease.record.state]),
      [[b, "claimed"]],
    );
    assert.equal((await second.get(a))?.revision, onA.lease.revision);
    assert.equal((await second.get(b))?.revision, onB.lease.revision);
    assert.deepEqual(
      (await second.list()).map((lease) => lease.record.ip),
      [a, c, d, b],
    );
    const again = await second.acquire(claimFor("pod-i-1"));
    assert.equal(again.existing, true);
    assert.equal(again.lease.record.ip, a);
  });

  it("follows the upstream pick order on a fresh pool", async (t) => {
    const store = await startStore(t, server.url, {
      bucket: uniqueBucket(),
      pool: pool("127.0.3", 10, 6),
      agent: "agent-1",
    });
    const picked: string[] = [];
    for (const allocationId of ["pod-1", "pod-2", "pod-3", "pod-4", "pod-5"]) {
      picked.push(
        (await store.acquire(claimFor(allocationId))).lease.record.ip,
      );
    }
    assert.deepEqual(picked, [
      "127.0.3.13",
      "127.0.3.12",
      "127.0.3.11",
      "127.0.3.15",
      "127.0.3.10",
    ]);
  });

  it("recovers an acquire that died after claiming: the retry adopts that IP", async (t) => {
    const bucket = uniqueBucket();
    const store = await startStore(t, server.url, {
      bucket,
      pool: pool("127.0.4", 1, 4),
      agent: "agent-1",
      pendingTimeoutMs: 200,
    });
    const { lease } = await store.acquire(claimFor("pod-j-1"));
    // What a crash between the claim and the index update leaves behind.
    const kv = await rawBucket(t, server.url, bucket);
    await kv.put(
      allocationKey("pod-j-1"),
      JSON.stringify({ allocationId: "pod-j-1", token: "dead", since: "x" }),
    );

    const retry = await store.acquire(claimFor("pod-j-1"));
    assert.equal(retry.existing, true);
    assert.equal(retry.lease.record.ip, lease.record.ip);
    assert.equal((await store.counts()).claimed, 1);
    const index = await kv.get(allocationKey("pod-j-1"));
    assert.equal(index?.json<{ ip: string }>().ip, lease.record.ip);
  });

  it("recovers an acquire that died before claiming: the retry takes an IP", async (t) => {
    const bucket = uniqueBucket();
    const store = await startStore(t, server.url, {
      bucket,
      pool: pool("127.0.4", 1, 4),
      agent: "agent-1",
      pendingTimeoutMs: 200,
    });
    const kv = await rawBucket(t, server.url, bucket);
    await kv.create(
      allocationKey("pod-k-1"),
      JSON.stringify({ allocationId: "pod-k-1", token: "dead", since: "x" }),
    );

    const retry = await store.acquire(claimFor("pod-k-1"));
    assert.equal(retry.existing, false);
    assert.equal((await store.counts()).claimed, 1);
  });

  it("closes idempotently and refuses calls afterwards", async (t) => {
    const store = await startStore(t, server.url, {
      bucket: uniqueBucket(),
      pool: pool("127.0.5", 1, 1),
      agent: "agent-1",
    });
    await assert.rejects(store.start(), InvalidRequestError);
    await store.close();
    await store.close();
    await assert.rejects(store.get("127.0.5.1"), UnavailableError);
    await assert.rejects(store.acquire(claimFor("pod-m-1")), UnavailableError);
  });

  it("reads a damaged lease value as quarantined until forced free", async (t) => {
    const bucket = uniqueBucket();
    const ips = pool("127.0.5", 1, 1);
    const store = await startStore(t, server.url, {
      bucket,
      pool: ips,
      agent: "agent-1",
    });
    const kv = await rawBucket(t, server.url, bucket);
    await kv.put(leaseKey(ips[0]!), "not json");

    const damaged = await store.get(ips[0]!);
    assert.equal(damaged?.record.state, "quarantined");
    await assert.rejects(
      store.acquire(claimFor("pod-l-1")),
      PoolExhaustedError,
    );
    await store.forceRelease(ips[0]!);
    assert.equal(
      (await store.acquire(claimFor("pod-l-1"))).lease.record.ip,
      ips[0],
    );
  });
});
