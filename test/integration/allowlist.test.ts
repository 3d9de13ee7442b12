import assert from "node:assert/strict";
import {
  mkdtemp,
  readdir,
  readFile,
  readlink,
  rm,
  symlink,
  writeFile,
} from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { after, before, describe, it } from "node:test";

import { connect, type NatsConnection } from "@nats-io/transport-node";
import { pino } from "pino";

import { createAgent, type Agent } from "../../src/agent/index.js";
import { createDelivery, type Delivery } from "../../src/delivery/index.js";
import { ByomError, HostKeyRejectedError } from "../../src/errors/index.js";
import {
  createAllowlistPolicy,
  hostKeyFromBlob,
  type AllowlistPolicy,
  type AllowlistReload,
  type HostKey,
} from "../../src/hostkeys/index.js";
import { createPublisher, type Publisher } from "../../src/publisher/index.js";
import {
  allocationIdOf,
  preferredIndex,
  resourceNames,
} from "../../src/protocol/index.js";
import { startNatsServer, type NatsServer } from "../helpers/nats.js";
import { startSandbox, type TestSandbox } from "../helpers/sandbox.js";
import {
  makePublicKeys,
  writeSecretVolume,
  type TestKey,
} from "../helpers/secret-volume.js";
import { waitFor } from "../helpers/wait.js";

const vmCount = 6;
const firstIp = `127.45.${10 + (process.pid % 200)}.2`;
const userData =
  "#cloud-config\nwrite_files:\n  - path: /run/peerpod/hello\n    content: hi\n";

/** The public key lines a sandbox VM has now, by type ("ed25519", "ecdsa"). */
async function vmKeyLines(
  sandbox: TestSandbox,
  ip: string,
): Promise<Record<"ed25519" | "ecdsa", string>> {
  const dir = sandbox.sandbox.vm(ip).dir;
  const line = async (type: string): Promise<string> =>
    (await readFile(join(dir, `ssh_host_${type}_key.pub`), "utf8")).trim();
  return { ed25519: await line("ed25519"), ecdsa: await line("ecdsa") };
}

function hostKeyOf(line: string): HostKey {
  return hostKeyFromBlob(Buffer.from(line.split(" ")[1] ?? "", "base64"));
}

function later(ms: number): Date {
  return new Date(Date.now() + ms);
}

function percentile(sorted: number[], fraction: number): number {
  const index = Math.min(
    sorted.length - 1,
    Math.ceil(fraction * sorted.length) - 1,
  );
  return sorted[Math.max(0, index)] ?? Number.NaN;
}

describe("host-key allowlist against sandbox VMs", () => {
  let sandbox: TestSandbox;
  let root: string;
  let ips: string[];
  let strangers: TestKey[];
  const closers: Array<() => Promise<void>> = [];

  before(async () => {
    root = await mkdtemp(join(tmpdir(), "byom-allowlist-it-"));
    strangers = await makePublicKeys(2);
    sandbox = await startSandbox({
      vms: vmCount,
      firstIp,
      stateDir: `/var/lib/byom-sandbox-test/hostkeys-${process.pid}`,
    });
    ips = sandbox.sandbox.status().map((vm) => vm.ip);
  });

  after(async () => {
    for (const close of closers.reverse()) {
      await close().catch(() => undefined);
    }
    await sandbox?.stop();
    await rm(root, { recursive: true, force: true });
  });

  function vmIp(index: number): string {
    const ip = ips[index];
    assert.ok(ip !== undefined, `no vm ${index}`);
    return ip;
  }

  function stranger(index: number): string {
    return strangers[index]?.line ?? "";
  }

  async function policyOn(
    files: Record<string, string>,
    onReload?: (reload: AllowlistReload) => void,
  ): Promise<{ dir: string; policy: AllowlistPolicy; delivery: Delivery }> {
    const dir = await mkdtemp(join(root, "secret-"));
    await writeSecretVolume(dir, files);
    const policy = await createAllowlistPolicy({
      dir,
      reloadIntervalMs: 0,
      retryDelayMs: 20,
      ...(onReload ? { onReload } : {}),
    });
    const delivery = createDelivery({
      privateKey: sandbox.privateKey,
      connectTimeoutMs: 3000,
      policy,
      backoff: { initialMs: 50, maxMs: 200 },
    });
    closers.push(
      () => policy.close(),
      () => delivery.close(),
    );
    return { dir, policy, delivery };
  }

  it("applies Secret volume updates without a restart, and measures the latency to enforcement", async (t) => {
    const ip = vmIp(0);
    const vm = await vmKeyLines(sandbox, ip);
    const { dir, policy, delivery } = await policyOn({ "a.pub": stranger(0) });
    await assert.rejects(delivery.inspect(ip), HostKeyRejectedError);

    const key = hostKeyOf(vm.ed25519);
    const latencies: number[] = [];
    for (let round = 0; round < 20; round++) {
      const listed = round % 2 === 0;
      const files: Record<string, string> = listed
        ? { "a.pub": stranger(0), "vm.pub": `${vm.ed25519}\n${vm.ecdsa}\n` }
        : { "a.pub": stranger(0) };
      const started = performance.now();
      await writeSecretVolume(dir, files);
      await waitFor(() => policy.check(ip, key).ok === listed, {
        intervalMs: 1,
        timeoutMs: 5000,
        what: `round ${round} to take effect`,
      });
      latencies.push(performance.now() - started);

      // A real connection agrees with the policy.
      if (listed) {
        const seen = await delivery.inspect(ip);
        assert.equal(seen.hostKey.fingerprint, key.fingerprint);
      } else {
        await assert.rejects(delivery.inspect(ip), HostKeyRejectedError);
      }
    }

    const sorted = latencies.slice().sort((a, b) => a - b);
    t.diagnostic(
      `reload latency, Secret-style swap to enforcement over ${sorted.length} updates: p50 ${percentile(sorted, 0.5).toFixed(1)} ms, p99 ${percentile(sorted, 0.99).toFixed(1)} ms, max ${percentile(sorted, 1).toFixed(1)} ms`,
    );
    assert.ok(policy.status().reloads >= 20);
    assert.ok(percentile(sorted, 0.99) < 2000);
  });

  it("ends with the last of several updates in quick succession", async () => {
    const ip = vmIp(0);
    const vm = await vmKeyLines(sandbox, ip);
    const reloads: AllowlistReload[] = [];
    const { dir, policy, delivery } = await policyOn(
      { "a.pub": stranger(0) },
      (reload) => reloads.push(reload),
    );

    for (let round = 0; round < 10; round++) {
      await writeSecretVolume(
        dir,
        round % 2 === 0
          ? { [`r${round}.pub`]: stranger(round % 2) }
          : { "vm.pub": vm.ed25519, [`r${round}.pub`]: stranger(1) },
      );
    }
    await writeSecretVolume(dir, { "vm.pub": vm.ed25519, "z.pub": vm.ecdsa });

    await waitFor(
      () =>
        policy
          .keys()
          .map((key) => key.file)
          .join(",") === "vm.pub,z.pub",
      { timeoutMs: 5000, what: "the last update" },
    );
    const seen = await delivery.inspect(ip);
    assert.equal(seen.hostKey.fingerprint, hostKeyOf(vm.ed25519).fingerprint);
    assert.ok(reloads.length >= 2, `${reloads.length} reloads`);
    assert.equal(policy.status().keys, 2);
    const last = reloads.at(-1);
    assert.ok(last?.ok);
    assert.ok(policy.status().lastReloadAt instanceof Date);
  });

  it("keeps the last good set when a read fails midway, and retries", async () => {
    const ip = vmIp(0);
    const vm = await vmKeyLines(sandbox, ip);
    const reloads: AllowlistReload[] = [];
    const { dir, policy, delivery } = await policyOn(
      { "vm.pub": vm.ed25519 },
      (reload) => reloads.push(reload),
    );

    // A top-level name whose target is not there yet: listed, unreadable.
    // chokidar reports no event for a dangling link; the period would.
    await symlink(join("..data", "late.pub"), join(dir, "late.pub"));
    const failed = await policy.reload();
    assert.equal(failed.ok, false);
    assert.deepEqual(failed.removed, []);
    assert.equal(policy.status().keys, 1);
    assert.ok(policy.readiness().ok);
    await delivery.inspect(ip);

    const target = await readlink(join(dir, "..data"));
    await writeFile(join(dir, target, "late.pub"), stranger(1));
    await waitFor(() => policy.status().keys === 2, {
      what: "the retry to read the fixed file",
    });
    assert.match(failed.problems.join("; "), /late\.pub cannot be read/);
    assert.equal(reloads.at(-1)?.ok, true);
  });

  it("negotiates the listed key type when the VM also has an unlisted one", async () => {
    const ip = vmIp(1);
    const vm = await vmKeyLines(sandbox, ip);
    const { policy, delivery } = await policyOn({ "vm.pub": vm.ecdsa });

    assert.deepEqual(policy.algorithms(), ["ecdsa-sha2-nistp256"]);
    const seen = await delivery.deliver(ip, Buffer.from(userData), {
      deadline: later(10_000),
    });
    assert.equal(seen.hostKey.type, "ecdsa-sha2-nistp256");
    assert.equal(seen.hostKey.fingerprint, hostKeyOf(vm.ecdsa).fingerprint);
  });

  it("reaches VMs listed by different key types from one set", async () => {
    const byEd25519 = vmIp(1);
    const byEcdsa = vmIp(0);
    const first = await vmKeyLines(sandbox, byEd25519);
    const second = await vmKeyLines(sandbox, byEcdsa);
    const { policy, delivery } = await policyOn({
      "a.pub": first.ed25519,
      "b.pub": second.ecdsa,
    });
    assert.equal(policy.algorithms()?.length, 2);

    const seenFirst = await delivery.deliver(byEd25519, Buffer.from(userData), {
      deadline: later(10_000),
    });
    const seenSecond = await delivery.deliver(byEcdsa, Buffer.from(userData), {
      deadline: later(10_000),
    });

    assert.equal(
      seenFirst.hostKey.fingerprint,
      hostKeyOf(first.ed25519).fingerprint,
    );
    assert.equal(
      seenSecond.hostKey.fingerprint,
      hostKeyOf(second.ecdsa).fingerprint,
    );
  });

  it("refuses delivery to a VM whose host key is not listed and writes nothing", async () => {
    const ip = vmIp(2);
    const other = await vmKeyLines(sandbox, vmIp(1));
    const { delivery } = await policyOn({
      "other.pub": `${other.ed25519}\n${other.ecdsa}\n`,
    });

    await assert.rejects(
      delivery.deliver(ip, Buffer.from(userData), { deadline: later(5000) }),
      (error: unknown) =>
        error instanceof HostKeyRejectedError &&
        /not in the allowlist/.test(error.message),
    );
    assert.deepEqual(await readdir(sandbox.sandbox.vm(ip).cidataDir), []);
  });

  describe("the agent", () => {
    let server: NatsServer;
    const connections: NatsConnection[] = [];
    const logLines: string[] = [];

    before(async () => {
      server = await startNatsServer();
    });

    after(async () => {
      for (const nc of connections) {
        await nc.close().catch(() => undefined);
      }
      await server?.stop();
    });

    async function startAgent(
      prefix: string,
      pool: string[],
      policy: AllowlistPolicy | undefined,
      quarantineProbeIntervalMs: number,
    ): Promise<{ agent: Agent; publisher: Publisher }> {
      const names = resourceNames({
        stream: `${prefix.toUpperCase()}_REQ`,
        leaseBucket: `${prefix}-leases`,
        resultBucket: `${prefix}-results`,
        subjectPrefix: `${prefix}.v1.requests`,
        consumer: `${prefix}-agents`,
      });
      const sink = new Writable({
        write(chunk: Buffer, _encoding, callback) {
          logLines.push(chunk.toString());
          callback();
        },
      });
      const agentConnection = await connect({ servers: server.url });
      const clientConnection = await connect({ servers: server.url });
      connections.push(agentConnection, clientConnection);
      const agent = await createAgent({
        nc: agentConnection,
        names,
        pool,
        agentId: `${prefix}-node`,
        ssh: {
          username: "peerpod",
          privateKey: Buffer.from(sandbox.privateKey),
          port: 22,
          connectTimeoutMs: 3000,
        },
        ...(policy ? { policy } : {}),
        releaseTimeoutMs: 10_000,
        quarantineProbeIntervalMs,
        logger: pino({ level: "info" }, sink),
      });
      const publisher = createPublisher({
        nc: clientConnection,
        names,
        requestingNode: `${prefix}-node`,
        requestTimeoutMs: 20_000,
      });
      closers.push(
        () => publisher.close(),
        () => agent.close(),
      );
      return { agent, publisher };
    }

    /** A sandbox id whose allocation the upstream rule sends to pool index `index`. */
    function sandboxIdFor(
      pod: string,
      index: number,
      poolSize: number,
    ): string {
      for (let attempt = 0; ; attempt++) {
        const id = `s${attempt}`;
        if (preferredIndex(allocationIdOf(pod, id), poolSize) === index) {
          return id;
        }
      }
    }

    it("with an allowlist, quarantines a VM whose key is not listed, moves on, and refuses a rebooted VM until its new key is added", async () => {
      const [unlisted, listed] = [vmIp(3), vmIp(4)];
      const listedKeys = await vmKeyLines(sandbox, listed);
      const dir = await mkdtemp(join(root, "agent-secret-"));
      await writeSecretVolume(dir, {
        "vm.pub": `${listedKeys.ed25519}\n${listedKeys.ecdsa}\n`,
      });
      const policy = await createAllowlistPolicy({
        dir,
        reloadIntervalMs: 0,
      });
      const { agent, publisher } = await startAgent(
        "allow",
        [unlisted, listed],
        policy,
        300,
      );

      const created = await publisher.createInstance({
        podName: "web-a",
        sandboxId: sandboxIdFor("web-a", 0, 2),
        userData,
      });
      assert.equal(created.instance.id, listed);
      const refused = await agent.leases.get(unlisted);
      assert.equal(refused?.record.state, "quarantined");
      assert.match(refused?.record.reason ?? "", /host key not allowed/);

      // Delete: the VM reboots with new host keys that nobody listed.
      const boots = sandbox.sandbox.vm(listed).boots;
      await publisher.deleteInstance({
        instanceId: listed,
        allocationId: created.allocationId,
      });
      await waitFor(
        async () =>
          (await agent.leases.get(listed))?.record.state === "quarantined",
        { timeoutMs: 15_000, what: `${listed} quarantined after reboot` },
      );
      assert.equal(sandbox.sandbox.vm(listed).boots, boots + 1);
      assert.match(
        (await agent.leases.get(listed))?.record.reason ?? "",
        /not in the allowlist/,
      );
      await assert.rejects(
        publisher.createInstance({
          podName: "web-b",
          sandboxId: "s1",
          userData,
        }),
        (error: unknown) =>
          error instanceof ByomError && error.code === "POOL_EXHAUSTED",
      );

      // The operator scans the rebooted VM and updates the Secret.
      const fresh = await vmKeyLines(sandbox, listed);
      await writeSecretVolume(dir, {
        "vm.pub": `${fresh.ed25519}\n${fresh.ecdsa}\n`,
      });
      await waitFor(
        async () => (await agent.leases.get(listed))?.record.state === "free",
        { timeoutMs: 10_000, what: `${listed} back in the pool` },
      );
      const again = await publisher.createInstance({
        podName: "web-c",
        sandboxId: "s1",
        userData,
      });
      assert.equal(again.instance.id, listed);
      assert.equal(
        again.hostKey?.fingerprint,
        hostKeyOf(fresh.ed25519).fingerprint,
      );
      assert.equal(
        (await agent.leases.get(unlisted))?.record.state,
        "quarantined",
      );
    });

    it("with TOFU, accepts the new key a VM made at reboot", async () => {
      const ip = vmIp(5);
      const { agent, publisher } = await startAgent("tofu", [ip], undefined, 0);

      const first = await publisher.createInstance({
        podName: "web-t",
        sandboxId: "s1",
        userData,
      });
      await publisher.deleteInstance({
        instanceId: ip,
        allocationId: first.allocationId,
      });
      await waitFor(
        async () => (await agent.leases.get(ip))?.record.state === "free",
        { timeoutMs: 15_000, what: `${ip} free after reboot` },
      );
      const second = await publisher.createInstance({
        podName: "web-u",
        sandboxId: "s1",
        userData,
      });

      assert.equal(second.instance.id, ip);
      assert.notEqual(second.hostKey?.fingerprint, first.hostKey?.fingerprint);
      const fresh = await vmKeyLines(sandbox, ip);
      assert.equal(
        second.hostKey?.fingerprint,
        hostKeyOf(fresh.ed25519).fingerprint,
      );

      // Pinning: the VM changes its key behind the lease; delete writes nothing.
      await sandbox.sandbox.reboot(ip);
      const boots = sandbox.sandbox.vm(ip).boots;
      const deleted = await publisher.deleteInstance({
        instanceId: ip,
        allocationId: second.allocationId,
      });

      assert.equal(deleted.release.state, "quarantined");
      assert.equal(sandbox.sandbox.vm(ip).boots, boots);
      assert.deepEqual(await readdir(sandbox.sandbox.vm(ip).cidataDir), []);
      const lease = await agent.leases.get(ip);
      assert.equal(lease?.record.state, "quarantined");
      assert.match(lease?.record.reason ?? "", /reboot trigger failed/);
      const alert = logLines
        .map((line) => JSON.parse(line) as Record<string, unknown>)
        .find((entry) => entry.alert === "host-key-changed");
      assert.ok(alert, "an alert log line");
      assert.equal(alert.level, 50);
      assert.equal(alert.pinned, second.hostKey?.fingerprint);
    });
  });
});
