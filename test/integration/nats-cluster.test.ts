/*
 * Not in `npm test`: on nats-server 2.9.10 (what Debian ships) a replicated
 * KV bucket sometimes keeps refusing an allocation's entry after a node is
 * killed, so one create of eight can stay unanswered (about 1 run in 5).
 * The invariants (one owner per IP, no lost lease) held in every run. Run
 * with `npm run test:soak`; see docs/operations.md. Issue #5.
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { after, before, describe, it } from "node:test";

import { Kvm } from "@nats-io/kv";
import { connect, type NatsConnection } from "@nats-io/transport-node";

import { createAgent, type Agent } from "../../src/agent/index.js";
import { resourceNames } from "../../src/protocol/index.js";
import { createPublisher, type Publisher } from "../../src/publisher/index.js";
import { startNatsCluster, type NatsCluster } from "../helpers/cluster.js";
import { assertOneOwnerEach, createAll } from "../helpers/load.js";
import { startSandbox, type TestSandbox } from "../helpers/sandbox.js";
import { waitFor } from "../helpers/wait.js";

const userDataFile = new URL(
  "../fixtures/userdata/pod-initdata.yaml",
  import.meta.url,
);

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
