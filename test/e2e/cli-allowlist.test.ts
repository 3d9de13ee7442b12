import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { parse } from "yaml";

import { startSandbox, type TestSandbox } from "../helpers/sandbox.js";

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `byom <args>` with only the given variables (plus PATH). */
function byom(args: string[], env: Record<string, string> = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(
      process.execPath,
      ["--import", "tsx", "src/cli/main.ts", ...args],
      { env: { PATH: process.env.PATH ?? "", NODE_NAME: "e2e", ...env } },
    );
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

const firstIp = `127.45.${210 + (process.pid % 40)}.2`;

describe("byom allowlist", () => {
  let sandbox: TestSandbox;
  let root: string;
  let ips: string[];

  before(async () => {
    root = await mkdtemp(join(tmpdir(), "byom-cli-allowlist-"));
    sandbox = await startSandbox({
      vms: 2,
      firstIp,
      hostKeyTypes: ["ed25519", "ecdsa", "rsa"],
      stateDir: `/var/lib/byom-sandbox-test/hostkeys-cli-${process.pid}`,
    });
    ips = sandbox.sandbox.status().map((vm) => vm.ip);
  });

  after(async () => {
    await sandbox?.stop();
    await rm(root, { recursive: true, force: true });
  });

  /** type -> fingerprint of a sandbox VM's current keys. */
  function keysOf(ip: string): Map<string, string> {
    return new Map(
      sandbox.sandbox.vm(ip).hostKeys.map((key) => [key.type, key.fingerprint]),
    );
  }

  it("scan --out writes one <ip>.pub per VM with every key type, and check trusts them", async () => {
    const out = join(root, "scanned");
    const scan = await byom(["allowlist", "scan", ...ips, "--out", out]);
    assert.equal(scan.code, 0, scan.stderr);
    assert.match(scan.stdout, /6 keys from 2 VMs; wrote 2 files/);

    assert.deepEqual(
      (await readdir(out)).sort(),
      ips.map((ip) => `${ip}.pub`).sort(),
    );
    const lines = (await readFile(join(out, `${ips[0]}.pub`), "utf8"))
      .trim()
      .split("\n");
    assert.deepEqual(
      lines.map((line) => line.split(" ")[0]),
      ["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"],
    );
    assert.ok(lines.every((line) => line.endsWith(` ${ips[0]}`)));

    const check = await byom(["allowlist", "check", out, "--json"]);
    assert.equal(check.code, 0, check.stdout);
    const report = JSON.parse(check.stdout) as {
      ok: boolean;
      trusted: Array<{ type: string; fingerprint: string; comment: string }>;
    };
    assert.equal(report.ok, true);
    assert.equal(report.trusted.length, 6);
    for (const key of report.trusted) {
      const expected = keysOf(key.comment).get(key.type);
      assert.equal(key.fingerprint, expected, `${key.comment} ${key.type}`);
    }
  });

  it("scan --pool --json reads VM_POOL_IPS and names each key's fingerprint", async () => {
    const run = await byom(["allowlist", "scan", "--pool", "--json"], {
      VM_POOL_IPS: `${ips[0]}-${ips[1]}`,
    });
    assert.equal(run.code, 0, run.stderr);
    const result = JSON.parse(run.stdout) as {
      vms: Array<{
        ip: string;
        keys: Array<{ type: string; fingerprint: string }>;
      }>;
    };
    assert.deepEqual(
      result.vms.map((vm) => vm.ip),
      ips,
    );
    for (const vm of result.vms) {
      assert.deepEqual(
        new Map(vm.keys.map((key) => [key.type, key.fingerprint])),
        keysOf(vm.ip),
      );
    }
  });

  it("scan --secret prints the ssh-host-key-allowlist Secret", async () => {
    const run = await byom(["allowlist", "scan", ips[0] ?? "", "--secret"]);
    assert.equal(run.code, 0, run.stderr);
    const manifest = parse(run.stdout) as {
      kind: string;
      metadata: { name: string; namespace: string };
      stringData: Record<string, string>;
    };
    assert.equal(manifest.kind, "Secret");
    assert.deepEqual(manifest.metadata, {
      name: "ssh-host-key-allowlist",
      namespace: "confidential-containers-system",
    });
    assert.deepEqual(Object.keys(manifest.stringData), [`${ips[0]}.pub`]);
    assert.equal(
      manifest.stringData[`${ips[0]}.pub`]?.trim().split("\n").length,
      3,
    );
  });

  it("scan reports an unreachable VM and exits 4, keeping the others", async () => {
    const out = join(root, "partial");
    const dead = firstIp.replace(/\.2$/, ".250");
    const run = await byom([
      "allowlist",
      "scan",
      ips[0] ?? "",
      dead,
      "--out",
      out,
      "--timeout-ms",
      "2000",
    ]);
    assert.equal(run.code, 4);
    assert.match(run.stderr, new RegExp(`${dead.replaceAll(".", "\\.")}: `));
    assert.deepEqual(await readdir(out), [`${ips[0]}.pub`]);
  });

  it("check lists what is skipped and why and exits 2", async () => {
    const dir = join(root, "bad");
    const good = join(root, "scanned", `${ips[0]}.pub`);
    const [line] = (await readFile(good, "utf8")).split("\n");
    await rm(dir, { recursive: true, force: true });
    await byom(["allowlist", "scan", ips[0] ?? "", "--out", dir]);
    await writeFile(
      join(dir, "hosts.pub"),
      `# from known_hosts\n10.1.2.3 ${line}\n`,
    );

    const text = await byom(["allowlist", "check", dir]);
    assert.equal(text.code, 2);
    assert.match(text.stdout, /3 trusted keys/);
    assert.match(text.stdout, /hosts\.pub:2: known_hosts form/);

    const json = await byom(["allowlist", "check", dir, "--json"]);
    assert.equal(json.code, 2);
    const report = JSON.parse(json.stdout) as {
      ok: boolean;
      skipped: Array<{ file: string; line: number }>;
    };
    assert.equal(report.ok, false);
    assert.deepEqual(
      report.skipped.map((skip) => `${skip.file}:${skip.line}`),
      ["hosts.pub:2"],
    );

    const missing = await byom(["allowlist", "check", join(root, "nope")]);
    assert.equal(missing.code, 2);
    assert.match(missing.stdout, /does not exist/);
  });

  it("scan without IPs or --pool is a usage error", async () => {
    const run = await byom(["allowlist", "scan"]);
    assert.equal(run.code, 2);
    assert.match(run.stderr, /give at least one VM IP, or --pool/);
  });
});
