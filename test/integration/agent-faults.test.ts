import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { jetstreamManager } from "@nats-io/jetstream";
import { connect, type NatsConnection } from "@nats-io/transport-node";

import { ByomError } from "../../src/errors/index.js";
import { createLeaseStore, type LeaseStore } from "../../src/lease/index.js";
import {
  allocationIdOf,
  preferredIndex,
  resourceNames,
  type ResourceNames,
} from "../../src/protocol/index.js";
import { createPublisher, type Publisher } from "../../src/publisher/index.js";
import {
  startAgentProcess,
  type AgentProcess,
} from "../helpers/agent-process.js";
import { startNatsServer, type NatsServer } from "../helpers/nats.js";
import {
  assertInvariants,
  sha256,
  watchResults,
  type ResultWatch,
} from "../helpers/request-invariants.js";
import { startSandbox, type TestSandbox } from "../helpers/sandbox.js";
import { waitFor } from "../helpers/wait.js";

const userDataFile = new URL(
  "../fixtures/userdata/pod-large-policy.yaml",
  import.meta.url,
);

/** One deployment's names and env, so scenarios do not share a consumer. */
function deployment(
  prefix: string,
  server: NatsServer,
  vms: TestSandbox,
  extra: NodeJS.ProcessEnv,
) {
  const names = resourceNames({
    subjectPrefix: `${prefix}.v1.requests`,
    stream: `${prefix.toUpperCase()}_REQUESTS`,
    consumer: `${prefix}-agents`,
    leaseBucket: `${prefix}-leases`,
    resultBucket: `${prefix}-results`,
  });
  const pool = vms.sandbox.status().map((vm) => vm.ip);
  const env: NodeJS.ProcessEnv = {
    NATS_URL: server.url,
    VM_POOL_IPS: pool.join(","),
    SSH_PRIV_KEY_PATH: vms.privateKeyPath,
    SSH_TIMEOUT: "2",
    BYOM_SUBJECT_PREFIX: names.subjectPrefix,
    BYOM_STREAM: names.stream,
    BYOM_CONSUMER: names.consumer,
    BYOM_LEASE_BUCKET: names.leaseBucket,
    BYOM_RESULT_BUCKET: names.resultBucket,
    BYOM_ACK_WAIT_MS: "2000",
    BYOM_QUARANTINE_PROBE_INTERVAL_MS: "300",
    ...extra,
  };
  return { names, pool, env };
}

describe("agent faults: killed agents, used-up deliveries, expired requests", () => {
  let server: NatsServer;
  let vms: TestSandbox;
  let nc: NatsConnection;
  const agents: AgentProcess[] = [];
  const stores: LeaseStore[] = [];
  const stopped = new Set<number>();
  let userData: Buffer;
  let watch: ResultWatch;

  before(async () => {
    server = await startNatsServer();
    vms = await startSandbox({ vms: 3, firstIp: "127.61.0.2" });
    nc = await connect({ servers: server.url });
    watch = watchResults(nc);
    userData = await readFile(userDataFile);
  });

  after(async () => {
    watch?.close();
    for (const pid of stopped) {
      process.kill(pid, "SIGCONT");
    }
    for (const agent of agents) {
      await agent.stop("SIGKILL");
    }
    for (const store of stores) {
      await store.close();
    }
    await nc?.close();
    await vms?.stop();
    await server?.stop();
  });

  async function agent(
    env: NodeJS.ProcessEnv,
    node: string,
  ): Promise<AgentProcess> {
    const started = await startAgentProcess({ ...env, NODE_NAME: node });
    agents.push(started);
    return started;
  }

  /** Freezes a VM's sshd: TCP still connects, SSH never answers. */
  function freeze(ip: string): void {
    const pid = vms.sandbox.vm(ip).pid!;
    process.kill(pid, "SIGSTOP");
    stopped.add(pid);
  }

  function thaw(ip: string): void {
    const pid = vms.sandbox.vm(ip).pid!;
    process.kill(pid, "SIGCONT");
    stopped.delete(pid);
  }

  async function leases(
    names: ResourceNames,
    pool: string[],
  ): Promise<LeaseStore> {
    const store = createLeaseStore({
      nc,
      bucket: names.leaseBucket,
      pool,
      agent: "test",
    });
    await store.start();
    stores.push(store);
    return store;
  }

  /**
   * The invariants every fault test ends with, on one deployment's bucket:
   * each request answered once, the live leases exactly `live`, no partial
   * user-data on any VM (the VMs are shared by the scenarios, which all
   * deliver the same user-data).
   */
  async function invariants(
    names: ResourceNames,
    pool: string[],
    requestIds: string[],
    live: Record<string, string>,
  ): Promise<void> {
    await assertInvariants({
      leases: await leases(names, pool),
      sandbox: vms.sandbox,
      watch,
      requestIds,
      live,
      delivered: new Set([sha256(userData)]),
    });
  }

  function publisherFor(names: ResourceNames): Publisher {
    return createPublisher({
      nc,
      names,
      requestingNode: "node-x",
      requestTimeoutMs: 40_000,
    });
  }

  it("lets another agent finish a create whose agent was killed mid-delivery, on the same lease", async () => {
    const { names, pool, env } = deployment("killed", server, vms, {
      BYOM_MAX_DELIVER: "5",
    });
    const target =
      pool[preferredIndex(allocationIdOf("kill-1", "s"), pool.length)]!;
    freeze(target);
    const first = await agent(env, "node-a");

    const creating = publisherFor(names).createInstance({
      podName: "kill-1",
      sandboxId: "s",
      userData,
      requestId: "kill-1-req",
    });
    await first.waitForLog(
      new RegExp(`"ip":"${target.replaceAll(".", "\\.")}".*lease acquired`),
    );
    await first.stop("SIGKILL");
    thaw(target);
    await agent(env, "node-b");

    const created = await creating;
    assert.equal(created.instance.id, target);
    const store = await leases(names, pool);
    assert.equal((await store.get(target))?.record.state, "ready");
    const cidata = vms.sandbox.vm(target).cidataDir;
    assert.deepEqual(await readdir(cidata), ["user-data"]);
    assert.deepEqual(await readFile(join(cidata, "user-data")), userData);
    await invariants(names, pool, ["kill-1-req"], { [target]: "kill-1-s" });
  });

  it("answers a request that used up its deliveries, quarantines its VM and removes it from the stream", async () => {
    const { names, pool, env } = deployment("exhausted", server, vms, {
      BYOM_MAX_DELIVER: "2",
    });
    const target =
      pool[preferredIndex(allocationIdOf("kill-2", "s"), pool.length)]!;
    freeze(target);
    // Every agent that takes the request hangs on the frozen VM and is
    // killed there; a fresh one is started each time to receive the next
    // delivery, and the last one answers the used-up request.
    let current = await agent(env, "node-c");
    const creating = publisherFor(names)
      .createInstance({
        podName: "kill-2",
        sandboxId: "s",
        userData,
        requestId: "kill-2-req",
      })
      .then(
        () => undefined,
        (error: unknown) => error,
      );
    for (let delivery = 1; delivery <= 2; delivery += 1) {
      await current.waitForLog(/"allocationId":"kill-2-s".*lease acquired/);
      await current.stop("SIGKILL");
      current = await agent(env, `node-c${delivery}`);
    }
    const survivor = current;

    const error = await creating;
    assert.ok(
      error instanceof ByomError,
      `expected a ByomError, got ${String(error)}`,
    );
    assert.equal(error.code, "UNAVAILABLE");
    assert.match(error.message, /delivered 2 times/);

    const store = await leases(names, pool);
    const lease = await store.get(target);
    assert.equal(lease?.record.state, "quarantined");
    assert.match(lease?.record.reason ?? "", /abandoned/);
    const jsm = await jetstreamManager(nc);
    await waitFor(
      async () => (await jsm.streams.info(names.stream)).state.messages === 0,
      {
        what: "the abandoned request to leave the stream",
      },
    );

    thaw(target);
    await waitFor(
      async () => (await store.get(target))?.record.state === "free",
      {
        timeoutMs: 15_000,
        what: `${target} to return once its sshd answers with an empty cidata`,
      },
    );
    assert.ok(survivor.child.exitCode === null);
    await invariants(names, pool, ["kill-2-req"], {});
  });

  it("on SIGTERM hands an unfinished request back within the bound, and another agent finishes it", async () => {
    const { names, pool, env } = deployment("drained", server, vms, {
      BYOM_SHUTDOWN_TIMEOUT_MS: "1000",
    });
    const target =
      pool[preferredIndex(allocationIdOf("term-1", "s"), pool.length)]!;
    freeze(target);
    const first = await agent(env, "node-t");
    const creating = publisherFor(names).createInstance({
      podName: "term-1",
      sandboxId: "s",
      userData,
      requestId: "term-1-req",
    });
    await first.waitForLog(/"allocationId":"term-1-s".*lease acquired/);

    const exit = await first.stop("SIGTERM");
    assert.equal(exit, 0);
    assert.match(
      first.log(),
      /in-flight requests did not finish in time; handing them back/,
    );
    thaw(target);
    await agent(env, "node-u");

    const created = await creating;
    assert.equal(created.instance.id, target);
    const store = await leases(names, pool);
    assert.equal((await store.get(target))?.record.state, "ready");
    await invariants(names, pool, ["term-1-req"], { [target]: "term-1-s" });
  });

  it("exits at once on a second signal", async () => {
    const { names, pool, env } = deployment("twice", server, vms, {
      BYOM_SHUTDOWN_TIMEOUT_MS: "60000",
    });
    const target =
      pool[preferredIndex(allocationIdOf("term-2", "s"), pool.length)]!;
    freeze(target);
    const stubborn = await agent(env, "node-v");
    const creating = publisherFor(names).createInstance({
      podName: "term-2",
      sandboxId: "s",
      userData,
      requestId: "term-2-req",
    });
    await stubborn.waitForLog(/"allocationId":"term-2-s".*lease acquired/);

    stubborn.child.kill("SIGTERM");
    await stubborn.waitForLog(/shutting down/);
    const exit = await stubborn.stop("SIGINT");
    assert.equal(exit, 130);
    thaw(target);

    // Nothing was settled: the request comes back to the next agent.
    await agent(env, "node-w");
    assert.equal((await creating).instance.id, target);
    await invariants(names, pool, ["term-2-req"], { [target]: "term-2-s" });
  });

  it("answers EXPIRED to a request whose deadline passed, and leases nothing", async () => {
    const { names, pool, env } = deployment("expired", server, vms, {});
    await agent(env, "node-e");
    const store = await leases(names, pool);

    await assert.rejects(
      publisherFor(names).createInstance({
        podName: "late-1",
        sandboxId: "s",
        userData,
        requestId: "late-1-req",
        timeoutMs: 1,
      }),
      (error: unknown) =>
        error instanceof ByomError &&
        (error.code === "EXPIRED" || error.code === "UNAVAILABLE"),
    );
    await invariants(names, pool, ["late-1-req"], {});
    assert.deepEqual(
      watch.answers
        .get("late-1-req")
        ?.map((answer) => (answer.ok ? "ok" : answer.error.code)),
      ["EXPIRED"],
    );
    assert.equal((await store.counts()).free, pool.length);
  });
});
