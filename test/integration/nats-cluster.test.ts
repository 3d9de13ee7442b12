/*
 * A 3-node JetStream cluster on loopback, requests stream and both buckets
 * replicated 3 times, two agents on different nodes; one node is killed
 * (SIGKILL) under load. nats-server 2.9 (Debian's) needs the lease
 * writer's de-duplicated compare-and-swap here; see src/lease/cas.ts.
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { after, before, describe, it } from "node:test";

import { jetstreamManager } from "@nats-io/jetstream";
import { Kvm, type KV } from "@nats-io/kv";
import { pino } from "pino";
import { connect, type NatsConnection } from "@nats-io/transport-node";

import { createAgent, type Agent } from "../../src/agent/index.js";
import { resourceNames } from "../../src/protocol/index.js";
import { createPublisher, type Publisher } from "../../src/publisher/index.js";
import { startNatsCluster, type NatsCluster } from "../helpers/cluster.js";
import { untilAnswered } from "../helpers/load.js";
import {
  assertInvariants,
  sha256,
  watchResults,
  type ResultWatch,
} from "../helpers/request-invariants.js";
import { startSandbox, type TestSandbox } from "../helpers/sandbox.js";
import { waitFor } from "../helpers/wait.js";

const userDataFile = new URL(
  "../fixtures/userdata/pod-initdata.yaml",
  import.meta.url,
);
const pods = 8;
/** Kill rounds; `npm run test:soak` runs more (BYOM_CLUSTER_ROUNDS). */
const rounds = Number(process.env.BYOM_CLUSTER_ROUNDS ?? 1);
/** BYOM_TEST_LOG=FILE keeps the agents' debug log, to study a failure. */
const logger =
  process.env.BYOM_TEST_LOG === undefined
    ? undefined
    : pino(
        { level: "debug" },
        pino.destination({ dest: process.env.BYOM_TEST_LOG, sync: true }),
      );

describe("NATS faults: a 3-node cluster loses a node", () => {
  let cluster: NatsCluster;
  let vms: TestSandbox;
  const connections: NatsConnection[] = [];
  const agents: Agent[] = [];
  let publisher: Publisher;
  let watch: ResultWatch;
  let results: KV;
  let userData: Buffer;

  /** A connection that prefers node `first` and fails over to the others. */
  async function connectFrom(first: number): Promise<NatsConnection> {
    const urls = cluster.nodes.map((node) => node.url);
    const nc = await connect({
      servers: [...urls.slice(first), ...urls.slice(0, first)],
      noRandomize: true,
      maxReconnectAttempts: -1,
      reconnectTimeWait: 250,
    });
    connections.push(nc);
    return nc;
  }

  before(async () => {
    userData = await readFile(userDataFile);
    cluster = await startNatsCluster(3);
    vms = await startSandbox({ vms: pods, firstIp: "127.63.0.2" });
    const probe = await connectFrom(2);
    // A new cluster answers before it can place replicated assets.
    await waitFor(
      async () => {
        const kv = await new Kvm(probe).create("cluster-ready", {
          replicas: 3,
        });
        await kv.put("probe", "1");
        return true;
      },
      {
        timeoutMs: 30_000,
        intervalMs: 500,
        what: "the JetStream cluster to take replicated writes",
      },
    );
    const names = resourceNames({});
    for (const [index, node] of ["node-a", "node-b"].entries()) {
      agents.push(
        await createAgent({
          nc: await connectFrom(index),
          names,
          pool: vms.sandbox.status().map((vm) => vm.ip),
          agentId: node,
          ...(logger ? { logger: logger.child({ node }) } : {}),
          ssh: {
            username: "peerpod",
            privateKey: Buffer.from(vms.privateKey),
            port: 22,
            connectTimeoutMs: 5000,
          },
          queue: { replicas: 3, ackWaitMs: 5000 },
          quarantineProbeIntervalMs: 0,
        }),
      );
    }
    const client = await connectFrom(2);
    watch = watchResults(client);
    results = await new Kvm(client).open(names.resultBucket);
    publisher = createPublisher({
      nc: client,
      names,
      requestingNode: "node-a",
    });
  });

  after(async () => {
    watch?.close();
    for (const agent of agents) {
      await agent.close();
    }
    await Promise.allSettled(connections.map((nc) => nc.close()));
    await vms?.stop();
    await cluster?.close();
  });

  /** Waits until every replica of the request stream and both buckets is current. */
  async function replicasCurrent(): Promise<void> {
    const jsm = await jetstreamManager(connections[connections.length - 1]!);
    const names = resourceNames({});
    const streams = [
      names.stream,
      `KV_${names.leaseBucket}`,
      `KV_${names.resultBucket}`,
    ];
    await waitFor(
      async () => {
        for (const stream of streams) {
          const { cluster: placement } = await jsm.streams.info(stream);
          const replicas = placement?.replicas ?? [];
          if (
            placement?.leader === undefined ||
            replicas.length !== 2 ||
            replicas.some((replica) => !replica.current || replica.offline)
          ) {
            return false;
          }
        }
        return true;
      },
      { timeoutMs: 60_000, intervalMs: 500, what: "every replica to catch up" },
    );
  }

  /**
   * One round: a create per VM, node `victim` killed (SIGKILL) while they
   * run, then every pod deleted on the two nodes left; the invariants
   * after each half. Returns how many requests had to be sent again.
   */
  async function round(index: number, victim: number): Promise<number> {
    const retries = { count: 0 };
    const plan = (requestId: string, used: string[]) => ({
      requestId,
      used,
      status: (id: string) => publisher.status(id),
      retries,
      untilMs: Date.now() + 60_000,
    });
    const createIds: string[] = [];
    const creates = Array.from({ length: pods }, (_, pod) =>
      untilAnswered(
        (requestId) =>
          publisher.createInstance({
            podName: `r${index}-${pod}`,
            sandboxId: "s",
            userData,
            requestId,
            timeoutMs: 20_000,
          }),
        plan(`r${index}-create-${pod}`, createIds),
      ),
    );
    await waitFor(async () => (await agents[1]!.leases.counts()).ready >= 2, {
      timeoutMs: 20_000,
      what: "the load to be under way",
    });
    await cluster.nodes[victim]!.stop("SIGKILL");

    const created = await Promise.all(creates);
    const live: Record<string, string> = {};
    for (const [pod, result] of created.entries()) {
      live[result.instance.id] = `r${index}-${pod}-s`;
    }
    assert.equal(Object.keys(live).length, pods, "one VM per pod");
    for (const agent of agents) {
      await waitFor(async () => (await agent.leases.counts()).ready === pods, {
        timeoutMs: 20_000,
        what: "every agent's view to settle",
      });
      await assertInvariants({
        leases: agent.leases,
        sandbox: vms.sandbox,
        watch,
        requestIds: createIds,
        live,
        delivered: new Set([sha256(userData)]),
        results,
      });
    }

    // Two of three nodes keep the quorum: deletes work too.
    const deleteIds: string[] = [];
    await Promise.all(
      Object.entries(live).map(([ip, allocationId], pod) =>
        untilAnswered(
          (requestId) =>
            publisher.deleteInstance({
              instanceId: ip,
              allocationId,
              requestId,
              timeoutMs: 20_000,
            }),
          plan(`r${index}-delete-${pod}`, deleteIds),
        ),
      ),
    );
    await waitFor(
      async () => (await agents[1]!.leases.counts()).free === pods,
      {
        timeoutMs: 30_000,
        what: "every VM to come back free",
      },
    );
    await assertInvariants({
      leases: agents[1]!.leases,
      sandbox: vms.sandbox,
      watch,
      requestIds: [...createIds, ...deleteIds],
      live: {},
      delivered: new Set([sha256(userData)]),
      results,
    });
    return retries.count;
  }

  it(`keeps serving with replicas 3 when a node is killed under load (${rounds} round${rounds === 1 ? "" : "s"})`, async (t) => {
    for (let index = 0; index < rounds; index += 1) {
      const victim = index % cluster.nodes.length;
      const resent = await round(index, victim);
      t.diagnostic(
        `round ${index + 1}: node ${victim + 1} killed under load; ${pods} creates and ${pods} deletes answered once each, ${resent} sent again`,
      );
      if (index + 1 < rounds) {
        await cluster.nodes[victim]!.restart();
        await replicasCurrent();
      }
    }
  });
});
