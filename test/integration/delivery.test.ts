import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";

import { pino } from "pino";

import {
  createDelivery,
  loadPrivateKey,
  type Delivery,
  type HostKeySeen,
} from "../../src/delivery/index.js";
import {
  AuthFailedError,
  HostKeyRejectedError,
  VmUnreachableError,
} from "../../src/errors/index.js";
import {
  createTofuPolicy,
  type HostKeyPolicy,
} from "../../src/hostkeys/index.js";
import { createSandbox, type Sandbox } from "../../src/sandbox/index.js";
import { waitFor } from "../helpers/wait.js";

const run = promisify(execFile);

const fixture = new URL(
  "../fixtures/userdata/pod-large-policy.yaml",
  import.meta.url,
).pathname;
// One address per scenario, so that no scenario sees another's files.
const vmCount = 9;
const firstIp = `127.30.${10 + (process.pid % 200)}.2`;

/** sshd's chroot rule keeps state dirs out of /tmp; this root is root-owned 0755. */
const stateRoot = "/var/lib/byom-sandbox-test";

/** Makes a client key pair with ssh-keygen; returns the paths and public line. */
async function makeKey(
  dir: string,
  name: string,
  args: string[],
): Promise<{ path: string; publicKey: string }> {
  const path = join(dir, name);
  await run("ssh-keygen", ["-q", "-N", "", "-C", name, "-f", path, ...args]);
  return { path, publicKey: (await readFile(`${path}.pub`, "utf8")).trim() };
}

/** Collects a delivery's log lines to count attempts and check for leaks. */
function recordingLogger(): { logger: pino.Logger; lines: string[] } {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      lines.push(chunk.toString());
      callback();
    },
  });
  return { logger: pino({ level: "debug" }, sink), lines };
}

function sha256(data: Buffer): string {
  return createHash("sha256").update(data).digest("hex");
}

function later(ms: number): Date {
  return new Date(Date.now() + ms);
}

describe("delivery to sandbox pod VMs", () => {
  let sandbox: Sandbox;
  let keyDir: string | undefined;
  let clientKey: Buffer;
  let rsaKey: Buffer;
  let strangerKey: Buffer;
  let ips: string[];
  const deliveries: Delivery[] = [];
  let userData: Buffer;

  function delivery(
    overrides: { privateKey?: Buffer; logger?: pino.Logger } = {},
  ): Delivery {
    const created = createDelivery({
      privateKey: overrides.privateKey ?? clientKey,
      connectTimeoutMs: 3000,
      policy: createTofuPolicy(),
      backoff: { initialMs: 100, maxMs: 500 },
      ...(overrides.logger === undefined ? {} : { logger: overrides.logger }),
    });
    deliveries.push(created);
    return created;
  }

  let extraKeys: Record<"sec1" | "pkcs8", Buffer>;
  let extraPublicKeys = "";

  function vmIp(index: number): string {
    const ip = ips[index];
    assert.ok(ip !== undefined, `no vm ${index}`);
    return ip;
  }

  function hostFingerprint(ip: string, seen: HostKeySeen): string {
    const key = sandbox
      .vm(ip)
      .hostKeys.find((hostKey) => hostKey.type === seen.type);
    assert.ok(key, `sandbox vm ${ip} has no ${seen.type} host key`);
    return key.fingerprint;
  }

  before(async () => {
    keyDir = await mkdtemp(join(tmpdir(), "byom-delivery-keys-"));
    const main = await makeKey(keyDir, "id_ed25519", ["-t", "ed25519"]);
    const stranger = await makeKey(keyDir, "stranger", ["-t", "ed25519"]);
    const rsa = await makeKey(keyDir, "id_rsa", [
      "-t",
      "rsa",
      "-b",
      "3072",
      "-m",
      "PEM",
    ]);
    const sec1 = await makeKey(keyDir, "id_ecdsa", [
      "-t",
      "ecdsa",
      "-m",
      "PEM",
    ]);
    const pkcs8 = await makeKey(keyDir, "id_rsa_pkcs8", [
      "-t",
      "rsa",
      "-b",
      "2048",
      "-m",
      "PKCS8",
    ]);
    extraKeys = {
      sec1: (await loadPrivateKey(sec1.path)).key,
      pkcs8: (await loadPrivateKey(pkcs8.path)).key,
    };
    extraPublicKeys = `${sec1.publicKey}
${pkcs8.publicKey}
`;
    clientKey = (await loadPrivateKey(main.path)).key;
    strangerKey = (await loadPrivateKey(stranger.path)).key;
    rsaKey = (await loadPrivateKey(rsa.path)).key;
    userData = await readFile(fixture);

    sandbox = await createSandbox({
      vms: vmCount,
      firstIp,
      stateDir: join(stateRoot, `delivery-${randomBytes(6).toString("hex")}`),
      authorizedKeys: `${main.publicKey}\n${rsa.publicKey}\n${extraPublicKeys}`,
    });
    ips = sandbox.status().map((vm) => vm.ip);
  });

  after(async () => {
    await Promise.allSettled(deliveries.map((created) => created.close()));
    await sandbox?.close();
    if (keyDir !== undefined) {
      await rm(keyDir, { recursive: true, force: true });
    }
  });

  it("delivers 300 KiB of user-data byte for byte, atomically, and names the host key", async () => {
    const ip = vmIp(0);
    const { logger, lines } = recordingLogger();

    const result = await delivery({ logger }).deliver(ip, userData, {
      deadline: later(20_000),
    });

    const written = await readFile(join(sandbox.vm(ip).cidataDir, "user-data"));
    assert.equal(sha256(written), sha256(userData));
    assert.equal(result.sha256, sha256(userData));
    assert.equal(result.bytes, userData.length);
    assert.equal(
      result.hostKey.fingerprint,
      hostFingerprint(ip, result.hostKey),
    );
    assert.deepEqual(await readdir(sandbox.vm(ip).cidataDir), ["user-data"]);
    const logged = lines.join("");
    assert.match(logged, /delivered user-data/);
    assert.ok(!logged.includes(userData.subarray(0, 200).toString()));
  });

  it("replaces earlier user-data and accepts the pinned key", async () => {
    const ip = vmIp(1);
    const client = delivery();
    const first = await client.deliver(
      ip,
      Buffer.from("#cloud-config\nwrite_files: []\n"),
      {
        deadline: later(20_000),
      },
    );

    const second = await client.deliver(ip, userData, {
      deadline: later(20_000),
      pinnedFingerprint: first.hostKey.fingerprint,
    });

    assert.deepEqual(second.hostKey, first.hostKey);
    const written = await readFile(join(sandbox.vm(ip).cidataDir, "user-data"));
    assert.equal(sha256(written), sha256(userData));
    assert.deepEqual(await readdir(sandbox.vm(ip).cidataDir), ["user-data"]);
  });

  it("refuses a VM whose host key is not the pinned one and writes nothing", async () => {
    const ip = vmIp(2);
    const started = Date.now();

    const error = await delivery()
      .deliver(ip, userData, {
        deadline: later(20_000),
        pinnedFingerprint: "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
      })
      .catch((caught: unknown) => caught);

    assert.ok(error instanceof HostKeyRejectedError, String(error));
    assert.ok(error.message.includes(ip));
    const presented = sandbox.vm(ip).hostKeys.map((key) => key.fingerprint);
    assert.ok(
      presented.some((fingerprint) => error.message.includes(fingerprint)),
      error.message,
    );
    assert.ok(Date.now() - started < 5000);
    assert.deepEqual(await readdir(sandbox.vm(ip).cidataDir), []);
  });

  it("refuses a VM whose key the policy refuses, with the policy's reason", async () => {
    const ip = vmIp(2);
    const policy: HostKeyPolicy = {
      ...createTofuPolicy(),
      mode: "allowlist",
      check: () => ({ ok: false, reason: "not in the allowlist" }),
    };
    const client = createDelivery({
      privateKey: clientKey,
      connectTimeoutMs: 3000,
      policy,
    });
    deliveries.push(client);

    const error = await client
      .deliver(ip, userData, { deadline: later(20_000) })
      .catch((caught: unknown) => caught);

    assert.ok(error instanceof HostKeyRejectedError, String(error));
    assert.match(
      error.message,
      /refused: ssh-ed25519 SHA256:\S+: not in the allowlist$/,
    );
    assert.deepEqual(await readdir(sandbox.vm(ip).cidataDir), []);
  });

  it("offers only the policy's host key algorithms", async () => {
    const ip = vmIp(2);
    const restricted = (algorithms: string[]): Delivery => {
      const client = createDelivery({
        privateKey: clientKey,
        connectTimeoutMs: 3000,
        policy: { ...createTofuPolicy(), algorithms: () => algorithms },
      });
      deliveries.push(client);
      return client;
    };

    const ecdsa = await restricted(["ecdsa-sha2-nistp256"]).inspect(ip);
    const error = await restricted(["ssh-rsa"])
      .inspect(ip)
      .catch((caught: unknown) => caught);

    assert.equal(ecdsa.hostKey.type, "ecdsa-sha2-nistp256");
    assert.equal(ecdsa.hostKey.fingerprint, hostFingerprint(ip, ecdsa.hostKey));
    assert.ok(error instanceof HostKeyRejectedError, String(error));
    assert.match(error.message, /no host key of the allowed types \(ssh-rsa\)/);
  });

  it("fails fast with AUTH_FAILED when the VM does not accept the client key", async () => {
    const ip = vmIp(3);
    const { logger, lines } = recordingLogger();
    const started = Date.now();

    const error = await delivery({ privateKey: strangerKey, logger })
      .deliver(ip, userData, { deadline: later(30_000) })
      .catch((caught: unknown) => caught);

    assert.ok(error instanceof AuthFailedError, String(error));
    assert.match(error.message, /as peerpod/);
    assert.ok(Date.now() - started < 5000, "auth failure was retried");
    assert.equal(lines.filter((line) => line.includes("retrying")).length, 0);
    assert.deepEqual(await readdir(sandbox.vm(ip).cidataDir), []);
  });

  it("retries a stopped VM until the deadline, then reports it unreachable", async () => {
    const ip = vmIp(4);
    await sandbox.stopVm(ip);
    const { logger, lines } = recordingLogger();
    const started = Date.now();

    const error = await delivery({ logger })
      .deliver(ip, userData, { deadline: later(2000) })
      .catch((caught: unknown) => caught);

    const elapsedMs = Date.now() - started;
    assert.ok(error instanceof VmUnreachableError, String(error));
    assert.match(error.message, /gave up at the deadline after \d+ attempts/);
    assert.ok(elapsedMs >= 1500 && elapsedMs < 4000, `took ${elapsedMs} ms`);
    assert.ok(lines.filter((line) => line.includes("retrying")).length >= 2);
    await sandbox.startVm(ip);
  });

  it("delivers to a VM that comes up during the retry window", async () => {
    const ip = vmIp(5);
    await sandbox.stopVm(ip);
    const { logger, lines } = recordingLogger();

    const delivered = delivery({ logger }).deliver(ip, userData, {
      deadline: later(20_000),
    });
    await waitFor(() => lines.some((line) => line.includes("retrying")), {
      what: "a failed attempt",
    });
    await sandbox.startVm(ip);
    const result = await delivered;

    const written = await readFile(join(sandbox.vm(ip).cidataDir, "user-data"));
    assert.equal(sha256(written), result.sha256);
    assert.equal(
      result.hostKey.fingerprint,
      hostFingerprint(ip, result.hostKey),
    );
  });

  it("probes the port and lists cidata/ with the host key", async () => {
    const ip = vmIp(6);
    const client = delivery();
    await client.probe(ip);
    const before = await client.inspect(ip);
    assert.deepEqual(before.cidataEntries, []);

    await client.deliver(ip, userData, { deadline: later(20_000) });
    const afterDelivery = await client.inspect(ip, {
      pinnedFingerprint: before.hostKey.fingerprint,
    });

    assert.deepEqual(afterDelivery.cidataEntries, ["user-data"]);
    assert.equal(
      afterDelivery.hostKey.fingerprint,
      hostFingerprint(ip, before.hostKey),
    );
  });

  it("reports a refused port as unreachable when probing", async () => {
    const ip = vmIp(4);
    await sandbox.stopVm(ip);
    const error = await delivery()
      .probe(ip, { timeoutMs: 1000 })
      .catch((caught: unknown) => caught);
    await sandbox.startVm(ip);
    assert.ok(error instanceof VmUnreachableError, String(error));
    assert.match(error.message, /ECONNREFUSED/);
  });

  it("triggers a reboot and waits for the reset VM with a new host key and empty cidata", async () => {
    const ip = vmIp(7);
    const client = delivery();
    const delivered = await client.deliver(ip, userData, {
      deadline: later(20_000),
    });
    const bootsBefore = sandbox.vm(ip).boots;

    const triggered = await client.triggerReboot(ip, {
      deadline: later(20_000),
      pinnedFingerprint: delivered.hostKey.fingerprint,
    });
    const reset = await client.waitForReset(ip, {
      deadline: later(30_000),
      previousFingerprint: triggered.hostKey.fingerprint,
    });

    assert.deepEqual(triggered.hostKey, delivered.hostKey);
    assert.notEqual(reset.hostKey.fingerprint, delivered.hostKey.fingerprint);
    assert.equal(reset.hostKey.fingerprint, hostFingerprint(ip, reset.hostKey));
    // The sandbox counts the boot just after its sshd answers, so a fast
    // client can see the reset VM before the count moves.
    await waitFor(() => sandbox.vm(ip).boots === bootsBefore + 1, {
      what: "the sandbox to count the reboot",
    });
    assert.deepEqual(await readdir(sandbox.vm(ip).cidataDir), []);
    assert.deepEqual((await client.inspect(ip)).cidataEntries, []);
  });

  it("logs in with an RSA client key using rsa-sha2 signatures", async () => {
    // OpenSSH 9.2 refuses ssh-rsa (SHA-1) signatures by default, so a
    // successful login proves rsa-sha2-256/512 was used.
    const ip = vmIp(8);
    const result = await delivery({ privateKey: rsaKey }).deliver(
      ip,
      userData,
      {
        deadline: later(20_000),
      },
    );
    const written = await readFile(join(sandbox.vm(ip).cidataDir, "user-data"));
    assert.equal(sha256(written), result.sha256);
  });

  it("logs in with a SEC1 EC key and with a converted PKCS#8 RSA key", async () => {
    for (const [format, key] of Object.entries(extraKeys)) {
      const ip = vmIp(8);
      const result = await delivery({ privateKey: key }).deliver(ip, userData, {
        deadline: later(20_000),
      });
      const written = await readFile(
        join(sandbox.vm(ip).cidataDir, "user-data"),
      );
      assert.equal(sha256(written), result.sha256, format);
    }
  });

  it("stops retrying when closed", async () => {
    const ip = vmIp(4);
    await sandbox.stopVm(ip);
    const client = delivery();
    const pending = client
      .deliver(ip, userData, { deadline: later(30_000) })
      .catch((caught: unknown) => caught);
    const started = Date.now();
    await client.close();
    await client.close();
    const error = await pending;
    await sandbox.startVm(ip);
    assert.ok(error instanceof Error);
    assert.match(error.message, /delivery closed/);
    assert.ok(Date.now() - started < 2000);
  });
});
