import assert from "node:assert/strict";
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { createServer, type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { jetstream } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";

import { requestSubject, resourceNames } from "../../src/protocol/index.js";
import { createSandbox, type Sandbox } from "../../src/sandbox/index.js";
import { startNatsServer, type NatsServer } from "../helpers/nats.js";
import { waitFor } from "../helpers/wait.js";

const cli = new URL("../../bin/byom.js", import.meta.url).pathname;
const fixtures = new URL("../fixtures/userdata/", import.meta.url).pathname;

interface CliRun {
  code: number;
  stdout: string;
  stderr: string;
}

describe("byom agent, create, delete and pool from the shell", () => {
  let server: NatsServer;
  let sandbox: Sandbox;
  let workDir: string;
  let agent: ChildProcess;
  let agentLog = "";
  let env: NodeJS.ProcessEnv;

  function byom(...args: string[]): Promise<CliRun> {
    return new Promise((resolve) => {
      execFile(
        process.execPath,
        [cli, ...args],
        { env, timeout: 30_000 },
        (error, stdout, stderr) => {
          const code =
            error === null
              ? 0
              : typeof error.code === "number"
                ? error.code
                : 1;
          resolve({ code, stdout, stderr });
        },
      );
    });
  }

  before(async () => {
    server = await startNatsServer();
    workDir = await mkdtemp(join(tmpdir(), "byom-cli-test-"));
    const keyPath = join(workDir, "id_ed25519");
    await new Promise<void>((resolve, reject) =>
      execFile(
        "ssh-keygen",
        ["-q", "-t", "ed25519", "-N", "", "-f", keyPath],
        (error) => (error ? reject(error) : resolve()),
      ),
    );
    sandbox = await createSandbox({
      vms: 2,
      firstIp: "127.43.0.2",
      stateDir: `/var/lib/byom-sandbox-test/cli-${process.pid}`,
      authorizedKeys: await readFile(`${keyPath}.pub`, "utf8"),
    });
    env = {
      ...process.env,
      NATS_URL: server.url,
      VM_POOL_IPS: "127.43.0.2-127.43.0.3",
      SSH_PRIV_KEY_PATH: keyPath,
      SSH_TIMEOUT: "5",
      NODE_NAME: "cli-node",
      BYOM_RELEASE_TIMEOUT_MS: "20000",
      BYOM_REQUEST_TIMEOUT_MS: "20000",
      BYOM_LOG_LEVEL: "info",
      BYOM_HTTP_PORT: "0",
    };
    agent = spawn(process.execPath, [cli, "agent"], {
      env,
      stdio: ["ignore", "ignore", "pipe"],
    });
    agent.stderr?.on("data", (chunk: Buffer) => (agentLog += chunk.toString()));
    await waitFor(() => agentLog.includes("agent serving requests"), {
      timeoutMs: 20_000,
      what: "the agent to serve",
    });
  });

  after(async () => {
    if (agent && agent.exitCode === null) {
      const exited = once(agent, "exit");
      agent.kill("SIGTERM");
      await exited;
    }
    await sandbox?.close();
    await server?.stop();
    await rm(workDir, { recursive: true, force: true });
  });

  it("creates a pod VM and prints the instance as JSON", async () => {
    const result = await byom(
      "create",
      "--pod",
      "shell-1",
      "--sandbox-id",
      "abc",
      "--user-data",
      join(fixtures, "pod-basic.yaml"),
      "--json",
    );
    assert.equal(result.code, 0, result.stderr);
    const output = JSON.parse(result.stdout) as {
      ok: boolean;
      instance: { id: string; name: string; ips: string[] };
    };
    assert.equal(output.ok, true);
    assert.match(output.instance.id, /^127\.43\.0\.[23]$/);
    assert.equal(output.instance.name, `byom-${output.instance.id}`);
    assert.deepEqual(output.instance.ips, [output.instance.id]);
  });

  it("prints a readable result without --json", async () => {
    const result = await byom(
      "create",
      "--pod",
      "shell-1",
      "--sandbox-id",
      "abc",
      "--user-data",
      join(fixtures, "pod-basic.yaml"),
    );
    assert.equal(result.code, 0, result.stderr);
    assert.match(
      result.stdout,
      /^created byom-127\.43\.0\.\d \(ip 127\.43\.0\.\d\) for default\/shell-1/,
    );
    assert.match(result.stdout, /host key\s+ssh-ed25519 SHA256:/);
  });

  it("lists the live pool", async () => {
    const result = await byom("pool", "list", "--json");
    assert.equal(result.code, 0, result.stderr);
    const output = JSON.parse(result.stdout) as {
      leases: Array<{ ip: string; state: string; podName?: string }>;
    };
    assert.deepEqual(
      output.leases.map((lease) => lease.ip),
      ["127.43.0.2", "127.43.0.3"],
    );
    assert.equal(
      output.leases.filter((lease) => lease.podName === "shell-1").length,
      1,
    );
  });

  it("refuses invalid user-data with INVALID_REQUEST and exit code 2", async () => {
    const result = await byom(
      "create",
      "--pod",
      "shell-2",
      "--sandbox-id",
      "abc",
      "--user-data",
      join(fixtures, "invalid/unknown-key.yaml"),
      "--json",
    );
    assert.equal(result.code, 2);
    const output = JSON.parse(result.stdout) as {
      ok: boolean;
      error: { code: string; message: string; retryable: boolean };
    };
    assert.deepEqual(
      {
        ok: output.ok,
        code: output.error.code,
        retryable: output.error.retryable,
      },
      { ok: false, code: "INVALID_REQUEST", retryable: false },
    );
    assert.match(output.error.message, /runcmd/);
  });

  it("names the file when user-data cannot be read", async () => {
    const missing = join(workDir, "nope.yaml");
    const result = await byom(
      "create",
      "--pod",
      "p",
      "--sandbox-id",
      "s",
      "--user-data",
      missing,
    );
    assert.equal(result.code, 2);
    assert.match(result.stderr, new RegExp(`${missing}.*ENOENT`));
  });

  it("exits 3 with POOL_EXHAUSTED when no VM is free", async () => {
    const userData = join(workDir, "ok.yaml");
    await writeFile(
      userData,
      "#cloud-config\nwrite_files:\n  - path: /run/peerpod/x\n    content: x\n",
    );
    const second = await byom(
      "create",
      "--pod",
      "shell-3",
      "--sandbox-id",
      "x",
      "--user-data",
      userData,
    );
    assert.equal(second.code, 0, second.stderr);
    const third = await byom(
      "create",
      "--pod",
      "shell-4",
      "--sandbox-id",
      "x",
      "--user-data",
      userData,
      "--json",
    );
    assert.equal(third.code, 3);
    assert.equal(
      (JSON.parse(third.stdout) as { error: { code: string } }).error.code,
      "POOL_EXHAUSTED",
    );
  });

  it("deletes a pod VM and the VM returns to the pool", async () => {
    const list = JSON.parse((await byom("pool", "list", "--json")).stdout) as {
      leases: Array<{ ip: string; podName?: string; allocationId?: string }>;
    };
    const lease = list.leases.find((entry) => entry.podName === "shell-1")!;
    const result = await byom(
      "delete",
      lease.ip,
      "--allocation-id",
      lease.allocationId!,
      "--json",
    );
    assert.equal(result.code, 0, result.stderr);
    assert.equal(
      (JSON.parse(result.stdout) as { release: { state: string } }).release
        .state,
      "releasing",
    );
    await waitFor(
      async () => {
        const status = JSON.parse(
          (await byom("pool", "status", "--json")).stdout,
        ) as { counts: { free: number } };
        return status.counts.free === 1;
      },
      { timeoutMs: 20_000, what: "the VM to be free again" },
    );
  });

  it("exits 6 with NOT_OWNER when another allocation asks to delete", async () => {
    const list = JSON.parse((await byom("pool", "list", "--json")).stdout) as {
      leases: Array<{ ip: string; state: string }>;
    };
    const ready = list.leases.find((entry) => entry.state === "ready")!;
    const result = await byom(
      "delete",
      ready.ip,
      "--allocation-id",
      "someone-else",
      "--json",
    );
    assert.equal(result.code, 6);
  });

  it("refuses an IP that is not an address before sending anything", async () => {
    const result = await byom("delete", "not-an-ip");
    assert.equal(result.code, 2);
    assert.match(result.stderr, /<ip> \(field "instanceId"\).*"not-an-ip"/);
  });

  it("names the flag of a bad value, and checks it without NATS", async () => {
    const saved = env;
    // Nothing listens there: a check that needed NATS would fail UNAVAILABLE.
    env = { ...env, NATS_URL: "nats://127.0.0.1:1" };
    try {
      const result = await byom(
        "create",
        "--pod",
        "a/b",
        "--sandbox-id",
        "s",
        "--user-data",
        join(fixtures, "pod-basic.yaml"),
      );
      assert.equal(result.code, 2, result.stderr);
      assert.match(
        result.stderr,
        /^byom: INVALID_REQUEST: --pod \(field "podName"\) must match .* \(got "a\/b"\)/,
      );
      const owner = await byom(
        "delete",
        "127.43.0.2",
        "--allocation-id",
        "x y",
      );
      assert.equal(owner.code, 2, owner.stderr);
      assert.match(owner.stderr, /--allocation-id \(field "allocationId"\)/);
    } finally {
      env = saved;
    }
  });

  it("lets an operator quarantine, unquarantine and force-release a VM", async () => {
    const list = JSON.parse((await byom("pool", "list", "--json")).stdout) as {
      leases: Array<{ ip: string; state: string }>;
    };
    const ready = list.leases.find((entry) => entry.state === "ready")!;

    const quarantined = await byom(
      "pool",
      "quarantine",
      ready.ip,
      "--reason",
      "disk check",
      "--json",
    );
    assert.equal(quarantined.code, 0, quarantined.stderr);
    const table = await byom("pool", "list");
    assert.match(
      table.stdout,
      new RegExp(
        `${ready.ip.replaceAll(".", "\\.")}\\s+quarantined.*operator: disk check`,
      ),
    );

    const unquarantined = await byom("pool", "unquarantine", ready.ip);
    assert.equal(unquarantined.code, 0, unquarantined.stderr);
    assert.match(unquarantined.stdout, /now free/);

    const withoutForce = await byom("pool", "release", ready.ip);
    assert.equal(withoutForce.code, 2);
    assert.match(withoutForce.stderr, /--force/);
    const released = await byom(
      "pool",
      "release",
      ready.ip,
      "--force",
      "--json",
    );
    assert.equal(released.code, 0, released.stderr);
    assert.equal(
      (JSON.parse(released.stdout) as { lease: { state: string } }).lease.state,
      "free",
    );
  });

  it("refuses pool actions on an IP that is not in the pool", async () => {
    for (const args of [
      ["pool", "quarantine", "127.43.9.9", "--reason", "x"],
      ["pool", "unquarantine", "127.43.9.9"],
      ["pool", "release", "127.43.9.9", "--force"],
    ]) {
      const result = await byom(...args);
      assert.equal(result.code, 2, args.join(" "));
      assert.match(result.stderr, /127\.43\.9\.9.*is not in the pool/);
    }
    const notIp = await byom("pool", "release", "nope", "--force");
    assert.equal(notIp.code, 2);
    assert.match(
      notIp.stderr,
      /argument <ip> must be an IPv4 or IPv6 address \(got "nope"\)/,
    );
    const notQuarantined = await byom("pool", "unquarantine", "127.43.0.2");
    assert.equal(notQuarantined.code, 2);
    assert.match(
      notQuarantined.stderr,
      /127\.43\.0\.2 is \w+, not quarantined; nothing done/,
    );
  });

  it("exits 2 naming BYOM_HTTP_PORT when the metrics port is taken", async () => {
    const taken = createServer();
    taken.listen(0, "127.0.0.1");
    await once(taken, "listening");
    const { port } = taken.address() as AddressInfo;
    try {
      const result = await new Promise<CliRun>((resolve) => {
        execFile(
          process.execPath,
          [cli, "agent"],
          {
            env: { ...env, BYOM_HTTP_PORT: String(port) },
            timeout: 30_000,
          },
          (error, stdout, stderr) =>
            resolve({
              code: typeof error?.code === "number" ? error.code : 0,
              stdout,
              stderr,
            }),
        );
      });
      assert.equal(result.code, 2);
      assert.match(
        result.stderr,
        new RegExp(
          `BYOM_HTTP_PORT=${port}: cannot listen for metrics and health \\(EADDRINUSE\\)`,
        ),
      );
    } finally {
      taken.close();
    }
  });

  it("logs errors with their class, message and code", async () => {
    // A request the agent cannot decode is logged with its error.
    const nc = await connect({ servers: server.url });
    try {
      await jetstream(nc).publish(
        requestSubject(resourceNames({}), "create"),
        "{not json",
      );
    } finally {
      await nc.close();
    }
    await waitFor(() => agentLog.includes('"msg":"invalid request"'), {
      what: "the agent to log the invalid request",
    });
    const errors = agentLog
      .split("\n")
      .filter((line) => line.startsWith("{"))
      .map((line) => JSON.parse(line) as { err?: Record<string, unknown> })
      .flatMap((entry) => (entry.err === undefined ? [] : [entry.err]));
    assert.ok(errors.length > 0, "the runs above logged some errors");
    for (const err of errors) {
      assert.notEqual(err.type, "Object");
      assert.match(String(err.type), /Error$/);
      assert.equal(typeof err.message, "string");
      assert.equal(err.stack, undefined);
    }
  });

  it("never logs the private key or user-data contents", async () => {
    const key = await readFile(join(workDir, "id_ed25519"), "utf8");
    const keyBody = key
      .split("\n")
      .filter((line) => line.length > 0 && !line.startsWith("-----"));
    assert.ok(agentLog.length > 0);
    for (const secret of [
      ...keyBody,
      "PRIVATE KEY",
      "FAKEFAKE",
      "pod-network",
      "/run/peerpod/x",
    ]) {
      assert.ok(
        !agentLog.includes(secret),
        `agent log contains ${secret.slice(0, 12)}...`,
      );
    }
  });
});
