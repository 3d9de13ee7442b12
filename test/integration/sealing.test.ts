import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { jetstreamManager } from "@nats-io/jetstream";
import { connect, type NatsConnection } from "@nats-io/transport-node";

import { createAgent, type Agent } from "../../src/agent/index.js";
import { ByomError } from "../../src/errors/index.js";
import {
  RequestKind,
  requestSubject,
  resourceNames,
  type CreateRequest,
} from "../../src/protocol/index.js";
import { createPublisher, type Publisher } from "../../src/publisher/index.js";
import {
  createSealingKeyPair,
  createUnsealer,
  openUserData,
  type SealingKeyPair,
} from "../../src/sealing/index.js";
import {
  defaultQueueSettings,
  ensureQueue,
} from "../../src/transport/index.js";
import { startNatsServer, type NatsServer } from "../helpers/nats.js";
import {
  assertInvariants,
  sha256,
  watchResults,
  type ResultWatch,
} from "../helpers/request-invariants.js";
import { startSandbox, type TestSandbox } from "../helpers/sandbox.js";
import { waitFor } from "../helpers/wait.js";

const fixtures = new URL("../fixtures/userdata/", import.meta.url);
const names = resourceNames({
  subjectPrefix: "sealing.v1.requests",
  stream: "SEALING_REQUESTS",
  consumer: "sealing-agents",
  leaseBucket: "sealing-leases",
  resultBucket: "sealing-results",
});

function refusedWith(pattern: RegExp): (error: unknown) => boolean {
  return (error: unknown) => {
    assert.ok(error instanceof ByomError, String(error));
    assert.equal(error.code, "INVALID_REQUEST");
    assert.match(error.message, pattern);
    return true;
  };
}

describe("sealed user-data end to end", () => {
  let server: NatsServer;
  let vms: TestSandbox;
  let agentConnection: NatsConnection;
  let clientConnection: NatsConnection;
  let agent: Agent | undefined;
  let watch: ResultWatch;
  const oldKey: SealingKeyPair = createSealingKeyPair();
  const newKey: SealingKeyPair = createSealingKeyPair();
  const userData = new Map<string, Buffer>();
  const requestIds: string[] = [];
  const delivered = new Set<string>();
  const live: Record<string, string> = {};

  before(async () => {
    for (const name of ["pod-initdata.yaml", "pod-large-policy.yaml"]) {
      userData.set(name, await readFile(new URL(name, fixtures)));
    }
    server = await startNatsServer();
    vms = await startSandbox({ vms: 3, firstIp: "127.49.0.2" });
    agentConnection = await connect({ servers: server.url });
    clientConnection = await connect({ servers: server.url });
    watch = watchResults(clientConnection);
    // The stream exists before any agent runs, so requests wait in it.
    await ensureQueue(agentConnection, names, defaultQueueSettings);
  });

  after(async () => {
    watch?.close();
    await agent?.close();
    await clientConnection?.close();
    await agentConnection?.close();
    await vms?.stop();
    await server?.stop();
  });

  async function startAgent(
    seeds: string[],
    requireSealed: boolean,
  ): Promise<Agent> {
    await agent?.close();
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
      releaseTimeoutMs: 20_000,
      quarantineProbeIntervalMs: 0,
      ...(seeds.length > 0 ? { unseal: createUnsealer(seeds) } : {}),
      requireSealed,
    });
    return agent;
  }

  function publisher(sealingPublicKey?: string): Publisher {
    return createPublisher({
      nc: clientConnection,
      names,
      requestingNode: "node-a",
      requestTimeoutMs: 20_000,
      ...(sealingPublicKey ? { sealingPublicKey } : {}),
    });
  }

  async function check(): Promise<void> {
    assert.ok(agent);
    await assertInvariants({
      leases: agent.leases,
      sandbox: vms.sandbox,
      watch,
      requestIds,
      live,
      delivered,
    });
  }

  it("stores only the sealed box in the stream; an agent with the seed delivers it byte for byte", async () => {
    const large = userData.get("pod-large-policy.yaml")!;
    const pending = publisher(oldKey.publicKey).createInstance({
      podName: "sealed-1",
      sandboxId: "s1",
      userData: large,
      requestId: "sealed-1",
    });
    requestIds.push("sealed-1");

    const jsm = await jetstreamManager(clientConnection);
    const sequence = await waitFor(
      async () => {
        const info = await jsm.streams.info(names.stream);
        return info.state.messages > 0 ? info.state.last_seq : undefined;
      },
      { what: "the request in the stream" },
    );
    const stored = await jsm.streams.getMessage(names.stream, {
      seq: sequence,
    });
    assert.equal(stored?.subject, requestSubject(names, RequestKind.Create));
    const text = stored!.string();
    const request = JSON.parse(text) as CreateRequest;
    assert.equal(request.userData, undefined);
    assert.equal(request.userDataSealed?.alg, "x25519-xsalsa20-poly1305");
    assert.ok(!text.includes("cloud-config"));
    const lines = large
      .toString("utf8")
      .split("\n")
      .map((line) => line.trim())
      .filter((line) => line.length >= 24);
    assert.ok(lines.length > 100);
    assert.deepEqual(
      lines.filter((line) => text.includes(line)),
      [],
      "no user-data line in clear in the stream",
    );
    assert.equal(
      openUserData(request.userDataSealed!, oldKey.seed),
      large.toString("utf8"),
    );

    await startAgent([oldKey.seed], true);
    const created = await pending;
    const held = await readFile(
      join(vms.sandbox.vm(created.instance.id).cidataDir, "user-data"),
    );
    assert.equal(sha256(held), sha256(large));
    delivered.add(sha256(large));
    live[created.instance.id] = created.allocationId;
    await check();
  });

  it("refuses user-data in clear when sealing is required, leasing nothing", async () => {
    await assert.rejects(
      publisher().createInstance({
        podName: "clear-1",
        sandboxId: "s1",
        userData: userData.get("pod-initdata.yaml")!,
        requestId: "clear-1",
      }),
      refusedWith(
        /^field "userData" must be sealed: this agent requires sealed user-data \(BYOM_REQUIRE_SEALED\)$/,
      ),
    );
    requestIds.push("clear-1");
    await check();
  });

  it("refuses a box sealed to another key, naming userDataSealed", async () => {
    const stranger = createSealingKeyPair();
    await assert.rejects(
      publisher(stranger.publicKey).createInstance({
        podName: "stranger-1",
        sandboxId: "s1",
        userData: userData.get("pod-initdata.yaml")!,
        requestId: "stranger-1",
      }),
      refusedWith(/^field "userDataSealed" cannot be opened/),
    );
    requestIds.push("stranger-1");
    await check();
  });

  it("rotates: new and old seeds together, then publishers switch, then the old seed goes", async () => {
    const small = userData.get("pod-initdata.yaml")!;
    await startAgent([newKey.seed, oldKey.seed], true);
    for (const [index, key] of [oldKey, newKey].entries()) {
      const created = await publisher(key.publicKey).createInstance({
        podName: `rotate-${index}`,
        sandboxId: "s1",
        userData: small,
        requestId: `rotate-${index}`,
      });
      requestIds.push(`rotate-${index}`);
      live[created.instance.id] = created.allocationId;
      delivered.add(sha256(small));
      const held = await readFile(
        join(vms.sandbox.vm(created.instance.id).cidataDir, "user-data"),
      );
      assert.equal(sha256(held), sha256(small));
    }
    await check();

    await startAgent([newKey.seed], true);
    await assert.rejects(
      publisher(oldKey.publicKey).createInstance({
        podName: "rotate-late",
        sandboxId: "s1",
        userData: small,
        requestId: "rotate-late",
      }),
      refusedWith(/^field "userDataSealed" cannot be opened/),
    );
    requestIds.push("rotate-late");
    await check();
  });
});
