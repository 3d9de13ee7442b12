import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync, readFileSync } from "node:fs";
import { mkdir, readdir, readFile } from "node:fs/promises";
import { randomInt } from "node:crypto";
import { createServer } from "node:net";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";

import { UnavailableError } from "../../src/errors/index.js";
import { parseUserData } from "../../src/protocol/index.js";
import { createSandbox } from "../../src/sandbox/index.js";
import {
  makeClientKey,
  sandboxTestRoot,
  sftpBatch,
  startSandbox,
  uniqueStateDir,
  type TestSandbox,
} from "../helpers/sandbox.js";
import { waitFor } from "../helpers/wait.js";

const execFileAsync = promisify(execFile);

/**
 * A random third octet per run, so two runs of this file at once (two
 * checkouts, a developer and CI) do not fight over addresses.
 */
const block = randomInt(0, 250);
const ip = (offset: number, host: number): string =>
  `127.20.${block + offset}.${host}`;

const fixtures = new URL("../fixtures/userdata", import.meta.url).pathname;
const basicFixture = join(fixtures, "pod-basic.yaml");
const invalidFixture = join(fixtures, "invalid", "unknown-key.yaml");

/** Fingerprints the VM serves, as `ssh-keyscan | ssh-keygen -l` prints them. */
async function servedFingerprints(ip: string, port: number): Promise<string[]> {
  const { stdout: scanned } = await execFileAsync("ssh-keyscan", [
    "-p",
    String(port),
    "-T",
    "5",
    ip,
  ]);
  const child = spawn("ssh-keygen", ["-l", "-f", "-"], {
    stdio: ["pipe", "pipe", "ignore"],
  });
  child.stdin.end(scanned);
  let output = "";
  child.stdout.setEncoding("utf8").on("data", (chunk: string) => {
    output += chunk;
  });
  await once(child, "close");
  return output
    .trim()
    .split("\n")
    .map((line) => line.split(" ")[1] ?? "")
    .sort();
}

/** Every process whose ancestry reaches `pid`, including `pid`. */
async function processTree(pid: number): Promise<number[]> {
  const parents = new Map<number, number>();
  for (const entry of await readdir("/proc")) {
    const stat = await readFile(`/proc/${entry}/stat`, "utf8").catch(() => "");
    if (/^\d+$/.test(entry) && stat !== "") {
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      parents.set(Number(entry), Number(fields[1]));
    }
  }
  const tree = [pid];
  for (let index = 0; index < tree.length; index += 1) {
    for (const [child, parent] of parents) {
      if (parent === tree[index]) {
        tree.push(child);
      }
    }
  }
  return tree;
}

/** Alive and not a zombie. */
function isRunning(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
}

before(async () => {
  await mkdir(sandboxTestRoot, { recursive: true, mode: 0o755 });
});

describe("sandbox pod VMs", () => {
  let running: TestSandbox;

  before(async () => {
    running = await startSandbox({ vms: 3, firstIp: ip(0, 2) });
  });
  after(() => running?.stop());

  it("starts every VM with sshd serving the reported host keys", async () => {
    const vms = running.sandbox.status();
    assert.deepEqual(
      vms.map((vm) => vm.ip),
      [ip(0, 2), ip(0, 3), ip(0, 4)],
    );
    for (const vm of vms) {
      assert.equal(vm.state, "running");
      assert.equal(vm.boots, 1);
      assert.equal(vm.port, 22);
      assert.ok(vm.pid !== undefined && vm.pid > 0);
      assert.deepEqual(vm.appliedFiles, []);
      assert.deepEqual(vm.hostKeys.map((key) => key.type).sort(), [
        "ecdsa-sha2-nistp256",
        "ssh-ed25519",
      ]);
    }
    const first = running.sandbox.vm(ip(0, 2));
    assert.deepEqual(
      await servedFingerprints(first.ip, first.port),
      first.hostKeys.map((key) => key.fingerprint).sort(),
    );
    assert.throws(() => running.sandbox.vm(ip(0, 99)), /no sandbox VM/);
  });

  it("accepts SFTP as peerpod and applies put user-data byte for byte", async () => {
    const vm = running.sandbox.vm(ip(0, 2));
    const result = await sftpBatch(vm, running.privateKeyPath, [
      `put ${basicFixture} cidata/user-data`,
      "ls cidata",
    ]);
    assert.equal(result.code, 0, result.stderr);

    const expected = parseUserData(await readFile(basicFixture, "utf8"), {
      requireHeader: false,
    });
    const paths = expected.map((file) => join(vm.appliedDir, file.path));
    // A plain put is not atomic: the VM may see the empty file first.
    await waitFor(
      () => {
        const now = running.sandbox.vm(vm.ip);
        return (
          now.userDataError === undefined &&
          now.appliedFiles.join("\n") === paths.join("\n")
        );
      },
      { what: "user-data applied" },
    );
    for (const file of expected) {
      const written = await readFile(join(vm.appliedDir, file.path));
      assert.ok(written.equals(Buffer.from(file.content, "utf8")), file.path);
    }
  });

  it("refuses a user-data with an unknown key and applies nothing", async () => {
    const vm = running.sandbox.vm(ip(0, 3));
    const result = await sftpBatch(vm, running.privateKeyPath, [
      `put ${invalidFixture} cidata/.user-data.tmp`,
      "rename cidata/.user-data.tmp cidata/user-data",
    ]);
    assert.equal(result.code, 0, result.stderr);

    const error = await waitFor(() => running.sandbox.vm(vm.ip).userDataError, {
      what: "user-data refused",
    });
    assert.match(error, /runcmd/);
    assert.deepEqual(running.sandbox.vm(vm.ip).appliedFiles, []);
    assert.deepEqual(await readdir(vm.appliedDir), []);
  });

  it("refuses a client key it was not given", async () => {
    const stranger = await makeClientKey();
    try {
      const result = await sftpBatch(
        running.sandbox.vm(ip(0, 4)),
        stranger.privateKeyPath,
        ["ls cidata"],
      );
      assert.notEqual(result.code, 0);
      assert.match(result.stderr, /Permission denied/);
    } finally {
      await execFileAsync("rm", ["-rf", stranger.keyDir]);
    }
  });

  it("reboots on cidata/reboot: boots 2, new host keys, empty cidata", async () => {
    const vm = running.sandbox.vm(ip(0, 2));
    const result = await sftpBatch(vm, running.privateKeyPath, [
      `put ${basicFixture} cidata/reboot`,
    ]);
    // The VM may drop the session while sftp says goodbye (exit 255), as a
    // real VM rebooting would; the reboot below is what counts.
    assert.ok([0, 255].includes(result.code ?? -1), result.stderr);

    const rebooted = await waitFor(
      () => {
        const now = running.sandbox.vm(vm.ip);
        return now.boots === 2 && now.state === "running" && now;
      },
      { what: "reboot" },
    );
    const before = vm.hostKeys.map((key) => key.fingerprint);
    for (const key of rebooted.hostKeys) {
      assert.ok(!before.includes(key.fingerprint), "host keys are new");
    }
    assert.notEqual(rebooted.pid, vm.pid);
    assert.deepEqual(await readdir(vm.cidataDir), []);
    assert.deepEqual(await readdir(vm.appliedDir), []);
    assert.deepEqual(rebooted.appliedFiles, []);
    assert.deepEqual(
      await servedFingerprints(vm.ip, vm.port),
      rebooted.hostKeys.map((key) => key.fingerprint).sort(),
    );
    const listing = await sftpBatch(vm, running.privateKeyPath, ["ls cidata"]);
    assert.equal(listing.code, 0, listing.stderr);
  });

  it("stops a VM and starts it again with the same host keys", async () => {
    const vm = running.sandbox.vm(ip(0, 4));
    await running.sandbox.stopVm(vm.ip);
    assert.equal(running.sandbox.vm(vm.ip).state, "stopped");
    assert.equal(running.sandbox.vm(vm.ip).pid, undefined);
    const refused = await sftpBatch(vm, running.privateKeyPath, ["ls"]);
    assert.notEqual(refused.code, 0);

    await running.sandbox.startVm(vm.ip);
    const started = running.sandbox.vm(vm.ip);
    assert.equal(started.state, "running");
    assert.equal(started.boots, 1);
    assert.deepEqual(started.hostKeys, vm.hostKeys);
    const listing = await sftpBatch(vm, running.privateKeyPath, ["ls cidata"]);
    assert.equal(listing.code, 0, listing.stderr);
  });

  it("reboot() acts like cidata/reboot", async () => {
    const vm = running.sandbox.vm(ip(0, 3));
    await running.sandbox.reboot(vm.ip);
    const rebooted = running.sandbox.vm(vm.ip);
    assert.equal(rebooted.boots, 2);
    assert.equal(rebooted.userDataError, undefined);
    assert.deepEqual(await readdir(vm.cidataDir), []);
  });
});

describe("sandbox start and close", () => {
  it("refuses an address and port that is taken, naming both", async () => {
    const blocker = createServer();
    blocker.listen(22, ip(1, 3));
    await once(blocker, "listening");
    const stateDir = uniqueStateDir();
    try {
      await assert.rejects(
        startSandbox({ vms: 3, firstIp: ip(1, 2), stateDir }),
        (error: unknown) =>
          error instanceof UnavailableError &&
          error.message.includes(`${ip(1, 3)} port 22`) &&
          error instanceof UnavailableError,
      );
      assert.equal(existsSync(stateDir), false);
    } finally {
      blocker.close();
    }
  });

  it("refuses a state dir under /tmp", async () => {
    const key = await makeClientKey();
    try {
      await assert.rejects(
        createSandbox({
          vms: 1,
          firstIp: ip(1, 9),
          stateDir: "/tmp/byom-sandbox",
          authorizedKeys: key.publicKey,
        }),
        /under \/tmp/,
      );
      await assert.rejects(
        createSandbox({
          vms: 1,
          firstIp: "10.0.0.1",
          authorizedKeys: key.publicKey,
        }),
        /127\.0\.0\.0\/8/,
      );
    } finally {
      await execFileAsync("rm", ["-rf", key.keyDir]);
    }
  });

  it("close() ends every sshd and connection and removes every file", async () => {
    const started = await startSandbox({ vms: 2, firstIp: ip(1, 20) });
    const vm = started.sandbox.vm(ip(1, 20));
    const client = spawn(
      "sftp",
      [
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-i",
        started.privateKeyPath,
        `peerpod@${vm.ip}`,
      ],
      { stdio: ["pipe", "ignore", "ignore"], timeout: 20_000 },
    );
    const clientExit = once(client, "exit");
    try {
      const pids = await waitFor(
        async () => {
          const trees = await Promise.all(
            started.sandbox.status().map((each) => processTree(each.pid ?? 0)),
          );
          const all = trees.flat();
          // listener + privileged and unprivileged connection processes
          return all.length >= 4 && all;
        },
        { what: "an open SFTP session" },
      );

      await started.stop();
      await started.stop();

      // sftp notices the dropped connection at its next read of stdin.
      client.stdin.end("ls\n");
      await clientExit;
      assert.deepEqual(
        pids.filter((pid) => isRunning(pid)),
        [],
      );
      assert.equal(existsSync(started.stateDir), false);
    } finally {
      client.kill("SIGKILL");
      await started.stop();
    }
  });
});

describe("byom sandbox CLI", () => {
  const stateDir = uniqueStateDir();
  const cli = (...args: string[]) =>
    execFileAsync(
      process.execPath,
      ["--import", "tsx", "src/cli/main.ts", "sandbox", ...args],
      { encoding: "utf8", timeout: 30_000 },
    );

  after(async () => {
    await cli("down", "--state-dir", stateDir).catch(() => undefined);
  });

  it("brings VMs up, reports them as JSON and takes them down", async () => {
    const up = await cli(
      "up",
      "--vms",
      "2",
      "--first-ip",
      ip(2, 2),
      "--state-dir",
      stateDir,
      "--json",
    );
    const shown = JSON.parse(up.stdout) as {
      supervisorPid: number;
      clientKey: string;
      vms: Array<{ ip: string; pid: number; state: string; boots: number }>;
    };
    assert.deepEqual(
      shown.vms.map((vm) => [vm.ip, vm.state, vm.boots]),
      [
        [ip(2, 2), "running", 1],
        [ip(2, 3), "running", 1],
      ],
    );
    assert.equal(shown.clientKey, join(stateDir, "client", "id_ed25519"));

    const listing = await sftpBatch(
      { ip: ip(2, 3), port: 22 },
      shown.clientKey,
      ["ls cidata"],
    );
    assert.equal(listing.code, 0, listing.stderr);

    const status = JSON.parse(
      (await cli("status", "--state-dir", stateDir, "--json")).stdout,
    ) as typeof shown;
    assert.equal(status.supervisorPid, shown.supervisorPid);
    assert.deepEqual(
      status.vms.map((vm) => vm.pid),
      shown.vms.map((vm) => vm.pid),
    );

    await assert.rejects(
      cli("up", "--vms", "1", "--first-ip", ip(2, 9), "--state-dir", stateDir),
      (error: { code?: number; stderr?: string }) =>
        error.code === 2 && /already up/.test(error.stderr ?? ""),
    );

    await cli("down", "--state-dir", stateDir);
    for (const pid of [shown.supervisorPid, ...shown.vms.map((vm) => vm.pid)]) {
      assert.equal(isRunning(pid), false, `process ${pid} ended`);
    }
    assert.equal(existsSync(stateDir), false);
    await assert.rejects(
      cli("status", "--state-dir", stateDir),
      (error: { code?: number; stderr?: string }) =>
        error.code === 2 && /no sandbox is up/.test(error.stderr ?? ""),
    );
    await cli("down", "--state-dir", stateDir);
  });
});
