/*
 * Compare-and-swap on a bucket replicated 3 times. nats-server 2.9 (Debian's)
 * lets two updates with the same expected revision both succeed when they
 * reach the leader together; the lease store's writer must not.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { Kvm, type KV } from "@nats-io/kv";
import { connect, type NatsConnection } from "@nats-io/transport-node";

import { createKeyWriter, type KeyWriter } from "../../src/lease/index.js";
import { startNatsCluster, type NatsCluster } from "../helpers/cluster.js";
import { waitFor } from "../helpers/wait.js";

const bucket = "cas-cluster";
const rounds = 100;
const encoder = new TextEncoder();

describe("compare-and-swap on a 3-node cluster, replicas 3", () => {
  let cluster: NatsCluster;
  const connections: NatsConnection[] = [];
  const buckets: KV[] = [];
  const writers: KeyWriter[] = [];

  before(async () => {
    cluster = await startNatsCluster(3, "byom-cas");
    for (const url of cluster.nodes.map((node) => node.url)) {
      connections.push(await connect({ servers: url }));
    }
    // A new cluster answers before it can place replicated streams.
    await waitFor(
      async () => {
        const kv = await new Kvm(connections[0]!).create(bucket, {
          replicas: 3,
          history: 5,
          allow_direct: false,
        });
        await kv.put("probe", "1");
        return true;
      },
      {
        timeoutMs: 30_000,
        intervalMs: 500,
        what: "the cluster to take replicated writes",
      },
    );
    for (const nc of connections) {
      const kv = await new Kvm(nc).open(bucket);
      buckets.push(kv);
      writers.push(createKeyWriter(nc, bucket, kv));
    }
  });

  after(async () => {
    await Promise.allSettled(connections.map((nc) => nc.close()));
    await cluster?.close();
  });

  it(`lets exactly one of two updates at one revision win, ${rounds} times`, async (t) => {
    const [first, second] = writers as [KeyWriter, KeyWriter];
    for (let round = 0; round < rounds; round += 1) {
      const key = `update.${round}`;
      const revision = await first.put(key, encoder.encode("start"));
      assert.ok(revision !== undefined, `create ${key}`);

      const results = await Promise.all([
        first.put(key, encoder.encode("first"), revision),
        second.put(key, encoder.encode("second"), revision),
      ]);

      const winners = results.filter((result) => result !== undefined);
      assert.equal(winners.length, 1, `round ${round}: ${String(results)}`);
      const stored = await buckets[2]!.get(key);
      assert.equal(stored?.revision, winners[0]);
      assert.equal(
        stored?.string(),
        results[0] === undefined ? "second" : "first",
      );
    }
    t.diagnostic(`${rounds} rounds, one winner each`);
  });

  it("lets exactly one of two deletes at one revision win", async () => {
    const [first, second] = writers as [KeyWriter, KeyWriter];
    for (let round = 0; round < 20; round += 1) {
      const key = `delete.${round}`;
      const revision = await first.put(key, encoder.encode("start"));
      assert.ok(revision !== undefined);

      const results = await Promise.all([
        first.delete(key, revision),
        second.put(key, encoder.encode("second"), revision),
      ]);

      assert.equal(results.filter(Boolean).length, 1, `round ${round}`);
      const stored = await buckets[1]!.get(key);
      assert.equal(stored?.operation, results[0] === true ? "DEL" : "PUT");
    }
  });

  it("lets exactly one of two creates over a delete marker win", async () => {
    const [first, second] = writers as [KeyWriter, KeyWriter];
    const key = "recreate";
    const revision = await first.put(key, encoder.encode("one"));
    assert.ok(revision !== undefined);
    assert.equal(await first.delete(key, revision), true);

    const results = await Promise.all([
      first.put(key, encoder.encode("first")),
      second.put(key, encoder.encode("second")),
    ]);
    assert.equal(results.filter((result) => result !== undefined).length, 1);
  });
});
