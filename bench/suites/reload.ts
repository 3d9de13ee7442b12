/**
 * Suite 4: allowlist reload. 100 trusted keys in a directory laid out as a
 * Kubernetes Secret volume (`vms.pub` → `..data/vms.pub`, `..data` → a
 * timestamped dir); each update swaps `..data` atomically as the kubelet
 * does, moving one of two sandbox VMs' host keys in and the other's out
 * (plus 99 fresh other keys). Timed from the swap until the policy accepts
 * the newly listed VM's key and refuses the removed one; then (untimed)
 * checked with real SSH connections to both VMs.
 */
import { execFile } from "node:child_process";
import { generateKeyPairSync } from "node:crypto";
import {
  mkdir,
  mkdtemp,
  rename,
  rm,
  symlink,
  writeFile,
} from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { setTimeout as delay } from "node:timers/promises";
import { promisify } from "node:util";

import { createDelivery } from "../../src/delivery/index.js";
import { ByomError } from "../../src/errors/index.js";
import * as hostkeys from "../../src/hostkeys/index.js";
import type { HostKey, HostKeyPolicy } from "../../src/hostkeys/index.js";
import { onCleanup } from "../lib/cleanup.js";
import { makeClientKey, startHostedSandbox } from "../lib/sandbox.js";
import { ms, num, summarize, table, verdict } from "../lib/stats.js";
import { progress, type Suite, type SuiteOptions } from "../lib/suite.js";

const run = promisify(execFile);
const keysPerUpdate = 100;
const pollMs = 1;
const targetP99Ms = 1000;

type AllowlistFactory = (options: { dir: string }) => Promise<HostKeyPolicy>;

/** The allowlist policy if src/hostkeys has it (it is being built). */
function allowlistFactory(): AllowlistFactory | undefined {
  const candidate = (hostkeys as Record<string, unknown>).createAllowlistPolicy;
  return typeof candidate === "function"
    ? (candidate as AllowlistFactory)
    : undefined;
}

export const reloadSuite: Suite = {
  id: "reload",
  title: "4. Allowlist reload",
  async run(options: SuiteOptions) {
    const createAllowlistPolicy = allowlistFactory();
    if (createAllowlistPolicy === undefined) {
      return {
        markdown:
          "Not run: allowlist policy not yet available (`createAllowlistPolicy` is not exported by src/hostkeys).",
        targets: [
          "Allowlist reload p99 < 1 s: not run (allowlist policy not yet available)",
        ],
      };
    }
    const updates = options.quick ? 5 : 50;
    const key = await makeClientKey();
    const sandbox = await startHostedSandbox({
      name: "reload",
      vms: 2,
      firstIp: "127.52.0.2",
      authorizedKeys: key.publicKey,
    });
    const dir = await mkdtemp(path.join(tmpdir(), "byom-bench-allowlist-"));
    const removeDir = onCleanup(`allowlist dir ${dir}`, () =>
      rm(dir, { recursive: true, force: true }),
    );
    try {
      const vms = await Promise.all(
        sandbox.vms.map(async (vm) => ({
          ip: vm.ip,
          port: vm.port,
          line: await scanEd25519(vm.ip, vm.port),
        })),
      );
      const hostKeyOf = (line: string): HostKey =>
        hostkeys.hostKeyFromBlob(Buffer.from(line.split(" ")[1]!, "base64"));

      let generation = 0;
      const contentFor = (listed: string): string =>
        `${[listed, ...Array.from({ length: keysPerUpdate - 1 }, randomKeyLine)].join("\n")}\n`;
      const publish = async (content: string): Promise<void> => {
        generation += 1;
        await swapSecret(dir, generation, content);
      };

      await publish(contentFor(vms[0]!.line));
      const policy = await createAllowlistPolicy({ dir });
      const closePolicy = onCleanup("allowlist policy", () => policy.close());
      const delivery = createDelivery({
        privateKey: await import("node:fs/promises").then((fs) =>
          fs.readFile(key.privateKeyPath),
        ),
        connectTimeoutMs: 5000,
        policy,
      });
      const closeDelivery = onCleanup("reload delivery", () =>
        delivery.close(),
      );

      progress(
        `reload: ${updates} Secret-style updates of ${keysPerUpdate} keys`,
      );
      const times: number[] = [];
      let confirmed = 0;
      const failures: string[] = [];
      for (let update = 0; update < updates; update += 1) {
        const [listed, removed] =
          update % 2 === 0 ? [vms[1]!, vms[0]!] : [vms[0]!, vms[1]!];
        const listedKey = hostKeyOf(listed.line);
        const removedKey = hostKeyOf(removed.line);
        const content = contentFor(listed.line);
        const started = performance.now();
        await publish(content);
        for (;;) {
          if (
            policy.check(listed.ip, listedKey).ok &&
            !policy.check(removed.ip, removedKey).ok
          ) {
            break;
          }
          if (performance.now() - started > 30_000) {
            throw new Error(`update ${update} not enforced within 30 s`);
          }
          await delay(pollMs);
        }
        times.push(performance.now() - started);

        const accepted = await delivery
          .inspect(listed.ip, { timeoutMs: 5000 })
          .then(
            () => true,
            () => false,
          );
        const refused = await delivery
          .inspect(removed.ip, { timeoutMs: 5000 })
          .then(
            () => false,
            (error: unknown) =>
              error instanceof ByomError && error.code === "HOST_KEY_REJECTED",
          );
        if (accepted && refused) {
          confirmed += 1;
        } else {
          failures.push(
            `update ${update}: ${listed.ip} ${accepted ? "accepted" : "NOT accepted"}, ${removed.ip} ${refused ? "refused" : "NOT refused"}`,
          );
        }
        await delay(20);
      }
      await closeDelivery();
      await closePolicy();

      const summary = summarize(times);
      const markdown = [
        `${updates} updates; each writes ${keysPerUpdate} ed25519 keys (one of them the ed25519 host key of one of 2 sandbox VMs, alternating, and 99 fresh ones) into a new timestamped dir, ` +
          "points `..data_tmp` at it and renames it onto `..data` (the kubelet's atomic Secret update; `vms.pub` → `..data/vms.pub`), then removes the old dir. " +
          `Timed from the start of the write (new dir, file, symlink, rename) until \`policy.check()\` (what the SSH handshake calls) accepts the newly listed VM's key and refuses the removed VM's key, polled every ${pollMs} ms. ` +
          "After each update (untimed), an SSH connection (`delivery.inspect`) to each VM confirms it: " +
          `${confirmed}/${updates} updates confirmed on real connections.`,
        "",
        table(
          ["updates", "p50", "p99", "min", "max"],
          [
            [
              String(times.length),
              ms(summary.p50),
              ms(summary.p99),
              ms(summary.min),
              ms(summary.max),
            ],
          ],
        ),
        ...(failures.length > 0
          ? ["", `Not confirmed: ${failures.join("; ")}`]
          : []),
      ].join("\n");
      return {
        markdown,
        targets: [
          `Allowlist reload p99 < 1 s: ${verdict(summary.p99 < targetP99Ms && failures.length === 0)} (p50 ${ms(summary.p50)}, p99 ${ms(summary.p99)}, ${num(confirmed)}/${updates} confirmed over SSH)`,
        ],
      };
    } finally {
      await removeDir();
      await sandbox.close();
    }
  },
};

async function scanEd25519(ip: string, port: number): Promise<string> {
  const { stdout } = await run(
    "ssh-keyscan",
    ["-t", "ed25519", "-p", String(port), ip],
    {
      encoding: "utf8",
    },
  );
  const line = stdout.split("\n").find((text) => text.includes("ssh-ed25519"));
  if (line === undefined) {
    throw new Error(`ssh-keyscan found no ed25519 key on ${ip}`);
  }
  // "<host> ssh-ed25519 <base64>" → "ssh-ed25519 <base64> vm"
  const [, type, blob] = line.trim().split(/\s+/);
  return `${type} ${blob} ${ip}`;
}

function randomKeyLine(): string {
  const der = generateKeyPairSync("ed25519").publicKey.export({
    format: "der",
    type: "spki",
  });
  const raw = der.subarray(der.length - 32);
  const type = Buffer.from("ssh-ed25519");
  const blob = Buffer.concat([lengthPrefixed(type), lengthPrefixed(raw)]);
  return `ssh-ed25519 ${blob.toString("base64")} bench`;
}

function lengthPrefixed(bytes: Buffer): Buffer {
  const length = Buffer.alloc(4);
  length.writeUInt32BE(bytes.length);
  return Buffer.concat([length, bytes]);
}

/** The kubelet's atomic writer: new dir, `..data_tmp` symlink, rename. */
async function swapSecret(
  dir: string,
  generation: number,
  content: string,
): Promise<void> {
  const stamp = `..bench_${String(generation).padStart(4, "0")}`;
  const target = path.join(dir, stamp);
  await mkdir(target);
  await writeFile(path.join(target, "vms.pub"), content);
  const temp = path.join(dir, "..data_tmp");
  await rm(temp, { force: true });
  await symlink(stamp, temp);
  const previous =
    generation > 1
      ? `..bench_${String(generation - 1).padStart(4, "0")}`
      : undefined;
  await rename(temp, path.join(dir, "..data"));
  if (generation === 1) {
    await symlink(path.join("..data", "vms.pub"), path.join(dir, "vms.pub"));
  }
  if (previous !== undefined) {
    await rm(path.join(dir, previous), { recursive: true, force: true });
  }
}
