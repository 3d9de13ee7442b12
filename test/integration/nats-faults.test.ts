import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { after, before, describe, it } from "node:test";

import { jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { connect, type NatsConnection } from "@nats-io/transport-node";

import { createAgent, type Agent } from "../../src/agent/index.js";
import { ByomError } from "../../src/errors/index.js";
import { resourceNames } from "../../src/protocol/index.js";
import { createPublisher, type Publisher } from "../../src/publisher/index.js";
import { startNatsCluster, type NatsCluster } from "../helpers/cluster.js";
import { startSandbox, type TestSandbox } from "../helpers/sandbox.js";
import { startStack, type TestStack } from "../helpers/stack.js";
import { waitFor } from "../helpers/wait.js";

const userDataFile = new URL(
  "../fixtures/userdata/pod-initdata.yaml",
  import.meta.url,
);

/**
 * Creates `count` pods, retrying a retryable failure until `untilMs`;
 * returns the IP of each allocation.
 */
async function createAll(
  publisher: Publisher,
  prefix: string,
  count: number,
  userData: Buffer,
  untilMs: number,
): Promise<{ ips: Map<string, string>; retries: number }> {
  const ips = new Map<string, string>();
  let retries = 0;
  await Promise.all(
    Array.from({ length: count }, async (_, index) => {
      const podName = `${prefix}-${index}`;
      // A new request id per attempt: the allocation id, not the request
      // id, is what makes a retried create land on the same VM.
      for (let attempt = 0; ; attempt += 1) {
        const requestId = `${prefix}-req-${index}-${attempt}`;
        try {
          const created = await publisher.createInstance({
            podName,
            sandboxId: "s",
            userData,
            requestId,
            timeoutMs: 8000,
          });
          ips.set(`${podName}-s`, created.instance.id);
          return;
        } catch (error) {
          if (
            !(error instanceof ByomError) ||
            !error.retryable ||
            Date.now() > untilMs
          ) {
            throw error;
          }
          retries += 1;
        }
      }
    }),
  );
  return { ips, retries };
}

/** Every lease that is not free belongs to exactly one of `expected`. */
async function assertOneOwnerEach(
  agent: Agent,
  expected: Map<string, string>,
): Promise<void> {
  const live = (await agent.leases.list()).filter(
    (lease) => lease.record.state !== "free",
  );
  const owners = new Map(
    live.map((lease) => [lease.record.allocationId ?? "", lease.record.ip]),
  );
  assert.equal(live.length, expected.size, "one lease per allocation, no leak");
  assert.equal(
    new Set(live.map((lease) => lease.record.ip)).size,
    live.length,
    "no IP twice",
  );
  assert.deepEqual(owners, expected);
  for (const lease of live) {
    assert.equal(lease.record.state, "ready");
  }
}

describe("NATS faults: a restarted server", () => {
  let stack: TestStack;
  let userData: Buffer;

  before(async () => {
    userData = await readFile(userDataFile);
    stack = await startStack({
      vms: 8,
      firstIp: "127.62.0.2",
      prefix: "restart",
      // A delivery lost in the restart comes back after the ack wait.
      agent: { queue: { ackWaitMs: 5000 } },
    });
  });

  after(async () => {
    await stack?.close();
  });

  it("keeps every request answered and every lease through a restart under load", async (t) => {
    const load = createAll(
      stack.publisher,
      "restart",
      8,
      userData,
      Date.now() + 60_000,
    );
    await waitFor(async () => (await stack.agent.leases.counts()).ready >= 2, {
      what: "the load to be under way",
    });
    await stack.server.restart();

    const { ips, retries } = await load;
    assert.equal(ips.size, 8);
    await waitFor(async () => (await stack.agent.leases.counts()).ready === 8, {
      what: "the agent's view to re-sync after the restart",
    });
    await assertOneOwnerEach(stack.agent, ips);
    // Acks travel after the results: wait for the last of them.
    const jsm = await jetstreamManager(stack.clientConnection);
    await waitFor(
      async () =>
        (await jsm.streams.info(stack.names.stream)).state.messages === 0,
      { timeoutMs: 30_000, what: "every request to leave the stream" },
    );
    t.diagnostic(`restart under load: 8 creates answered, ${retries} retried`);
  });
});

describe("NATS faults: a 3-node cluster loses a node", () => {
  let cluster: NatsCluster;
  let vms: TestSandbox;
  let agentConnection: NatsConnection;
  let clientConnection: NatsConnection;
  let agent: Agent;
  let publisher: Publisher;
  let userData: Buffer;

  before(async () => {
    userData = await readFile(userDataFile);
    cluster = await startNatsCluster(3);
    vms = await startSandbox({ vms: 8, firstIp: "127.63.0.2" });
    agentConnection = await connect({
      servers: cluster.urls.split(","),
      maxReconnectAttempts: -1,
    });
    clientConnection = await connect({
      servers: cluster.urls.split(","),
      maxReconnectAttempts: -1,
    });
    const names = resourceNames({});
    // A new cluster answers account info before it can place replicated
    // assets: wait until a replicated bucket takes a write.
    await waitFor(
      async () => {
        const probe = await new Kvm(agentConnection).create("cluster-ready", {
          replicas: 3,
        });
        await probe.put("probe", "1");
        return true;
      },
      {
        timeoutMs: 30_000,
        intervalMs: 500,
        what: "the JetStream cluster to take replicated writes",
      },
    );
    agent = await createAgent({
      nc: agentConnection,
      names,
      pool: vms.sandbox.status().map((vm) => vm.ip),
      agentId: "node-a",
      ssh: {
        username: "peerpod",
        privateKey: Buffer.from(vms.privateKey),
        port: 22,
        connectTimeoutMs: 5000,
      },
      queue: { replicas: 3 },
      quarantineProbeIntervalMs: 0,
    });
    publisher = createPublisher({
      nc: clientConnection,
      names,
      requestingNode: "node-a",
    });
  });

  after(async () => {
    await agent?.close();
    await clientConnection?.close();
    await agentConnection?.close();
    await vms?.stop();
    await cluster?.close();
  });

  it("keeps serving with replicas 3 after one node is killed under load", async (t) => {
    const load = createAll(
      publisher,
      "cluster",
      8,
      userData,
      Date.now() + 60_000,
    );
    await waitFor(async () => (await agent.leases.counts()).ready >= 2, {
      timeoutMs: 20_000,
      what: "the load to be under way",
    });
    await cluster.nodes[0]!.stop();

    const { ips, retries } = await load;
    assert.equal(ips.size, 8);
    await waitFor(async () => (await agent.leases.counts()).ready === 8, {
      timeoutMs: 20_000,
      what: "the agent's view to settle",
    });
    await assertOneOwnerEach(agent, ips);
    t.diagnostic(
      `cluster node killed under load: 8 creates answered, ${retries} retried`,
    );
  });
});
