import { createHash } from "node:crypto";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import type { Command } from "commander";
import { pino } from "pino";

import { createAgent, type Agent } from "../../agent/index.js";
import { loadConfig } from "../../config/index.js";
import type { LeaseStore } from "../../lease/index.js";
import { createPublisher } from "../../publisher/index.js";
import {
  checkSandboxPrerequisites,
  createSandbox,
  generateClientKey,
  type Sandbox,
  type SandboxVmStatus,
} from "../../sandbox/index.js";
import { connectNats, startEmbeddedNats } from "../../transport/index.js";
import { formatPoolTable } from "./pool.js";

const fixtureNames = [
  "pod-basic.yaml",
  "pod-initdata.yaml",
  "pod-large-policy.yaml",
];

interface DemoOptions {
  fixtures: string;
  firstIp: string;
  port: string;
  json?: boolean;
  verbose?: boolean;
}

/** `byom demo`: the whole flow on one machine, then cleans up. */
export function registerDemoCommand(program: Command): void {
  program
    .command("demo")
    .description(
      "run the whole flow locally: embedded nats-server, 3 sandbox VMs, an agent; create 3 pods, delete one; clean up",
    )
    .option(
      "--fixtures <dir>",
      "folder with the user-data fixtures",
      defaultFixtures(),
    )
    .option(
      "--first-ip <ip>",
      "address of the first sandbox VM (127.0.0.0/8)",
      "127.0.0.2",
    )
    .option("--port <port>", "sshd port of the sandbox VMs", "22")
    .option("--json", "print a JSON summary instead of the narration")
    .option("--verbose", "show the agent's logs on stderr")
    .action(async (options: DemoOptions) => {
      await runDemo(options);
    });
}

function defaultFixtures(): string {
  const here = dirname(fileURLToPath(import.meta.url));
  return resolve(here, "../../../test/fixtures/userdata");
}

async function runDemo(options: DemoOptions): Promise<void> {
  const started = Date.now();
  const say = options.json
    ? () => undefined
    : (line: string) => console.log(line);
  const config = loadConfig();
  const cleanups: Array<[string, () => Promise<unknown>]> = [];
  const summary: Record<string, unknown> = {};

  try {
    await checkSandboxPrerequisites();
    const userData = await Promise.all(
      fixtureNames.map(async (name) => ({
        name,
        bytes: await readFile(join(options.fixtures, name)),
      })),
    );

    const externalNats =
      process.env.NATS_URL !== undefined && process.env.NATS_URL !== "";
    let natsUrl = config.natsUrl;
    if (!externalNats) {
      const nats = await startEmbeddedNats();
      cleanups.push(["nats-server", () => nats.close()]);
      natsUrl = nats.url;
      say(`1. started nats-server -js at ${nats.url} (store ${nats.storeDir})`);
    } else {
      say(`1. using NATS at ${natsUrl}`);
    }

    const keyDir = await mkdtemp(join(tmpdir(), "byom-demo-key-"));
    cleanups.push([
      "client key",
      () => rm(keyDir, { recursive: true, force: true }),
    ]);
    const clientKey = await generateClientKey(
      join(keyDir, "id_ed25519"),
      "byom-demo",
    );
    const keyPath = clientKey.privateKeyPath;
    const publicKey = clientKey.publicKey;

    const sandbox: Sandbox = await createSandbox({
      vms: 3,
      firstIp: options.firstIp,
      port: Number(options.port),
      stateDir: `/var/lib/byom-demo-${process.pid}`,
      authorizedKeys: publicKey,
    });
    cleanups.push(["sandbox", () => sandbox.close()]);
    const pool = sandbox.status().map((vm) => vm.ip);
    say(
      `2. sandbox up: ${pool.length} pod VMs (OpenSSH sshd, chroot, SFTP only) at ${pool.join(", ")}`,
    );

    const logger = pino(
      { level: options.verbose ? "info" : "silent" },
      pino.destination(2),
    );
    const nc = await connectNats({ servers: natsUrl, name: "byom-demo" });
    cleanups.push(["nats connection", () => nc.close()]);
    const agent: Agent = await createAgent({
      nc,
      names: config.names,
      pool,
      agentId: "demo-node",
      ssh: {
        username: config.sshUsername,
        privateKey: await readFile(keyPath),
        port: Number(options.port),
        connectTimeoutMs: 5000,
      },
      releaseTimeoutMs: 30_000,
      quarantineProbeIntervalMs: 0,
      logger,
    });
    cleanups.push(["agent", () => agent.close()]);
    say(`3. agent started (TOFU host keys, pool of ${pool.length})`);

    const publisher = createPublisher({
      nc,
      names: config.names,
      requestingNode: "demo-node",
      requestTimeoutMs: 30_000,
    });
    const pods: Array<{
      pod: string;
      ip: string;
      allocationId: string;
      fixture: string;
      sent: string;
      held: string;
      fingerprint: string;
    }> = [];
    say("4. creating 3 pods:");
    for (const [index, fixture] of userData.entries()) {
      const pod = `demo-pod-${index + 1}`;
      const created = await publisher.createInstance({
        podName: pod,
        podNamespace: "default",
        sandboxId: `sandbox${index + 1}`,
        userData: fixture.bytes,
      });
      const vm = await waitForApplied(sandbox, created.instance.id, 10_000);
      const held = sha256(await readFile(join(vm.cidataDir, "user-data")));
      const sent = sha256(fixture.bytes);
      if (held !== sent) {
        throw new Error(
          `VM ${vm.ip} holds user-data ${held}, but ${sent} was sent`,
        );
      }
      pods.push({
        pod,
        ip: created.instance.id,
        allocationId: created.allocationId,
        fixture: fixture.name,
        sent,
        held,
        fingerprint: created.hostKey?.fingerprint ?? "",
      });
      say(
        `   ${pod} -> ${created.instance.name}  ${fixture.name} (${fixture.bytes.length} bytes)`,
      );
      say(`      sha256 sent ${sent}`);
      say(
        `      sha256 held ${held}  match; applied ${vm.appliedFiles.length} file(s); host key ${created.hostKey?.type} ${created.hostKey?.fingerprint}`,
      );
    }
    summary.pods = pods;

    say("5. the pool now (byom pool list):");
    say(indent(formatPoolTable(await agent.leases.list())));

    const victim = pods[0]!;
    const bootsBefore = sandbox.vm(victim.ip).boots;
    say(
      `6. deleting ${victim.pod} (${victim.ip}): reboot trigger, wait for the VM to reset`,
    );
    const deleted = await publisher.deleteInstance({
      instanceId: victim.ip,
      allocationId: victim.allocationId,
    });
    await waitUntilFree(agent.leases, victim.ip, 30_000);
    const after = sandbox.vm(victim.ip);
    const newKeys = after.hostKeys.map((key) => key.fingerprint);
    if (after.boots <= bootsBefore || newKeys.includes(victim.fingerprint)) {
      throw new Error(`VM ${victim.ip} did not reboot with new host keys`);
    }
    say(
      `   result: ${deleted.release.state}; VM boots ${bootsBefore} -> ${after.boots}; cidata empty: ${after.appliedFiles.length === 0}`,
    );
    say(`   host key before ${victim.fingerprint}`);
    say(
      `   host key after  ${after.hostKeys.find((key) => key.type === "ssh-ed25519")?.fingerprint ?? newKeys[0]}`,
    );
    say(indent(formatPoolTable(await agent.leases.list())));
    summary.deleted = {
      ip: victim.ip,
      bootsBefore,
      bootsAfter: after.boots,
      state: "free",
    };
  } finally {
    for (const [name, cleanup] of cleanups.reverse()) {
      try {
        await cleanup();
      } catch (error) {
        console.error(
          `byom demo: cleanup of ${name} failed: ${(error as Error).message}`,
        );
      }
    }
  }

  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  summary.ok = true;
  summary.seconds = Number(seconds);
  if (options.json) {
    console.log(JSON.stringify(summary));
  } else {
    console.log(
      `7. cleaned up: agent, sandbox VMs, nats-server and temporary files removed (${seconds} s in all)`,
    );
  }
}

async function waitUntilFree(
  leases: LeaseStore,
  ip: string,
  timeoutMs: number,
): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    const lease = await leases.get(ip);
    if (lease?.record.state === "free") {
      return;
    }
    if (lease?.record.state === "quarantined") {
      throw new Error(`VM ${ip} was quarantined: ${lease.record.reason}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`VM ${ip} did not return to the pool within ${timeoutMs} ms`);
}

/** Waits until the VM's watcher has applied (or refused) its user-data. */
async function waitForApplied(
  sandbox: Sandbox,
  ip: string,
  timeoutMs: number,
): Promise<SandboxVmStatus> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const vm = sandbox.vm(ip);
    if (vm.userDataError !== undefined) {
      throw new Error(`VM ${ip} refused its user-data: ${vm.userDataError}`);
    }
    if (vm.appliedFiles.length > 0) {
      return vm;
    }
    if (Date.now() > until) {
      throw new Error(
        `VM ${ip} did not apply its user-data within ${timeoutMs} ms`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

function sha256(bytes: Buffer): string {
  return createHash("sha256").update(bytes).digest("hex");
}

function indent(text: string): string {
  return text
    .split("\n")
    .map((line) => `   ${line}`)
    .join("\n");
}
