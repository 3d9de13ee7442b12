import assert from "node:assert/strict";
import { readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { allocationIdOf, preferredIndex } from "../../src/protocol/index.js";
import {
  assertInvariants,
  sha256,
  watchResults,
  type ResultWatch,
} from "../helpers/request-invariants.js";
import { startStack, type TestStack } from "../helpers/stack.js";
import { waitFor } from "../helpers/wait.js";

const userDataFile = new URL(
  "../fixtures/userdata/pod-basic.yaml",
  import.meta.url,
);

describe("quarantine: unfit VMs leave the pool and come back when healthy", () => {
  let stack: TestStack;
  let userData: Buffer;
  let watch: ResultWatch;
  const live: Record<string, string> = {};

  before(async () => {
    userData = await readFile(userDataFile);
    stack = await startStack({
      vms: 4,
      firstIp: "127.46.0.2",
      prefix: "quarantine",
      agent: { quarantineProbeIntervalMs: 200, readinessTimeoutMs: 600 },
    });
    watch = watchResults(stack.clientConnection);
  });

  after(async () => {
    watch?.close();
    await stack?.close();
  });

  /** The IP a fresh allocation would be offered first, given the free IPs. */
  async function firstPick(
    podName: string,
    sandboxId: string,
  ): Promise<string> {
    const free = (await stack.agent.leases.list())
      .filter((lease) => lease.record.state === "free")
      .map((lease) => lease.record.ip);
    return free[
      preferredIndex(allocationIdOf(podName, sandboxId), free.length)
    ]!;
  }

  async function stateOf(
    ip: string,
  ): Promise<{ state: string; reason?: string }> {
    const lease = await stack.agent.leases.get(ip);
    return {
      state: lease?.record.state ?? "missing",
      ...(lease?.record.reason ? { reason: lease.record.reason } : {}),
    };
  }

  it("quarantines a VM that does not answer and serves the pod from the next one", async () => {
    const down = await firstPick("down-1", "s");
    await stack.vms.sandbox.stopVm(down);

    const created = await stack.publisher.createInstance({
      podName: "down-1",
      sandboxId: "s",
      userData,
      requestId: "down-1-req",
    });

    assert.notEqual(created.instance.id, down);
    live[created.instance.id] = "down-1-s";
    const quarantined = await stateOf(down);
    assert.equal(quarantined.state, "quarantined");
    assert.match(quarantined.reason ?? "", /^unreachable: /);
  });

  it("returns the VM to the pool once the prober finds it healthy", async () => {
    const down = (await stack.agent.leases.list()).find(
      (lease) => lease.record.state === "quarantined",
    )!.record.ip;
    await stack.vms.sandbox.startVm(down);

    await waitFor(async () => (await stateOf(down)).state === "free", {
      timeoutMs: 10_000,
      what: `${down} to be unquarantined`,
    });
    // The unreachable VM fault is over: every invariant holds.
    await assertInvariants({
      leases: stack.agent.leases,
      sandbox: stack.vms.sandbox,
      watch,
      requestIds: ["down-1-req"],
      live,
      delivered: new Set([sha256(userData)]),
    });
  });

  it("quarantines a VM whose cidata still holds user-data, and tries the next", async () => {
    const dirty = await firstPick("dirty-1", "s");
    const cidata = stack.vms.sandbox.vm(dirty).cidataDir;
    await writeFile(join(cidata, "user-data"), userData);

    const created = await stack.publisher.createInstance({
      podName: "dirty-1",
      sandboxId: "s",
      userData,
    });

    assert.notEqual(created.instance.id, dirty);
    const quarantined = await stateOf(dirty);
    assert.equal(quarantined.state, "quarantined");
    assert.match(quarantined.reason ?? "", /never reset/);
  });

  it("keeps a dirty VM out until its cidata is empty", async () => {
    const dirty = (await stack.agent.leases.list()).find(
      (lease) => lease.record.state === "quarantined",
    )!.record.ip;
    // The prober runs every 200 ms; a pass over a dirty VM must not free it.
    const passes = await new Promise<number>((resolve) => {
      let seen = 0;
      const stop = stack.agent.events.on("prober:pass", () => {
        seen += 1;
        if (seen === 3) {
          stop();
          resolve(seen);
        }
      });
    });
    assert.equal(passes, 3);
    assert.equal((await stateOf(dirty)).state, "quarantined");

    await rm(join(stack.vms.sandbox.vm(dirty).cidataDir, "user-data"));
    await waitFor(async () => (await stateOf(dirty)).state === "free", {
      timeoutMs: 10_000,
      what: `${dirty} to be unquarantined`,
    });
  });

  it("never frees a VM an operator quarantined", async () => {
    const ip = (await stack.agent.leases.list()).find(
      (lease) => lease.record.state === "free",
    )!.record.ip;
    await stack.agent.leases.quarantine(ip, "operator: disk replacement");

    await new Promise<void>((resolve) => {
      let seen = 0;
      const stop = stack.agent.events.on("prober:pass", () => {
        seen += 1;
        if (seen === 3) {
          stop();
          resolve();
        }
      });
    });
    assert.deepEqual(await stateOf(ip), {
      state: "quarantined",
      reason: "operator: disk replacement",
    });
  });

  it("reboots a VM quarantined while it held a pod when that pod is deleted", async () => {
    const created = await stack.publisher.createInstance({
      podName: "held-1",
      sandboxId: "s",
      userData,
    });
    const ip = created.instance.id;
    const bootsBefore = stack.vms.sandbox.vm(ip).boots;
    await stack.agent.leases.quarantine(ip, "operator: check while in use");

    await assert.rejects(
      stack.publisher.deleteInstance({
        instanceId: ip,
        allocationId: "someone-else",
      }),
      /NOT_OWNER|was leased to allocation held-1-s/,
    );
    assert.equal(stack.vms.sandbox.vm(ip).boots, bootsBefore);

    const deleted = await stack.publisher.deleteInstance({
      instanceId: ip,
      allocationId: created.allocationId,
    });
    assert.equal(deleted.release.state, "quarantined");
    await waitFor(() => stack.vms.sandbox.vm(ip).boots === bootsBefore + 1, {
      timeoutMs: 10_000,
      what: `${ip} to reboot`,
    });
    assert.deepEqual(await stateOf(ip), {
      state: "quarantined",
      reason: "operator: check while in use",
    });
  });

  it("answers POOL_EXHAUSTED when the only VMs left are quarantined", async () => {
    const leases = await stack.agent.leases.list();
    for (const lease of leases.filter(
      (entry) => entry.record.state === "free",
    )) {
      await stack.agent.leases.quarantine(lease.record.ip, "operator: test");
    }
    await assert.rejects(
      stack.publisher.createInstance({
        podName: "none-1",
        sandboxId: "s",
        userData,
      }),
      /POOL_EXHAUSTED|no free/i,
    );
  });
});
