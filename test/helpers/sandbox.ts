import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";

import {
  createSandbox,
  generateClientKey,
  type Sandbox,
  type SandboxOptions,
} from "../../src/sandbox/index.js";

const execFileAsync = promisify(execFile);

/** Parent of every test state dir; root-owned 0755 as sshd's chroot needs. */
export const sandboxTestRoot = "/var/lib/byom-sandbox-test";

/** Sandboxes not yet stopped; their sshd die with the test process. */
const open = new Set<Sandbox>();
process.once("exit", () => {
  for (const sandbox of open) {
    for (const vm of sandbox.status()) {
      if (vm.pid !== undefined) {
        try {
          process.kill(vm.pid, "SIGKILL");
        } catch {
          // Already gone.
        }
      }
    }
  }
});

/** A sandbox and the client key pair its VMs accept. */
export interface TestSandbox {
  sandbox: Sandbox;
  stateDir: string;
  privateKeyPath: string;
  /** OpenSSH private key text. */
  privateKey: string;
  /** The public key line the VMs accept. */
  publicKey: string;
  /** Closes the sandbox and removes the key pair; idempotent. */
  stop(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

export type StartSandboxOptions = Omit<
  SandboxOptions,
  "authorizedKeys" | "stateDir"
> & { stateDir?: string };

/** A state dir of its own per test, under {@link sandboxTestRoot}. */
export function uniqueStateDir(): string {
  return join(sandboxTestRoot, randomBytes(6).toString("hex"));
}

/** Makes an ed25519 key pair in a new temp dir. */
export async function makeClientKey(): Promise<{
  keyDir: string;
  privateKeyPath: string;
  privateKey: string;
  publicKey: string;
}> {
  const keyDir = await mkdtemp(join(tmpdir(), "byom-sandbox-key-"));
  const key = await generateClientKey(join(keyDir, "id_ed25519"), "byom-test");
  return { keyDir, ...key };
}

/**
 * Starts a sandbox with a fresh client key and its own state dir. Call
 * `stop()` in an `after` hook (or `await using`). Use IPs in 127.20.x.x.
 */
export async function startSandbox(
  options: StartSandboxOptions,
): Promise<TestSandbox> {
  const key = await makeClientKey();
  const stateDir = options.stateDir ?? uniqueStateDir();
  let sandbox: Sandbox;
  try {
    sandbox = await createSandbox({
      ...options,
      stateDir,
      authorizedKeys: key.publicKey,
    });
  } catch (error) {
    await rm(key.keyDir, { recursive: true, force: true });
    throw error;
  }

  open.add(sandbox);
  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopped ??= sandbox
      .close()
      .finally(() => open.delete(sandbox))
      .finally(() => rm(key.keyDir, { recursive: true, force: true }));
    return stopped;
  };
  return {
    sandbox,
    stateDir,
    privateKeyPath: key.privateKeyPath,
    privateKey: key.privateKey,
    publicKey: key.publicKey,
    stop,
    [Symbol.asyncDispose]: stop,
  };
}

/** Output of one `sftp -b` run. */
export interface SftpResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs OpenSSH's `sftp -b` as peerpod against a VM with the given key,
 * trusting any host key. Never throws for a failed batch: check `code`.
 */
export async function sftpBatch(
  vm: { ip: string; port: number },
  privateKeyPath: string,
  commands: string[],
  username = "peerpod",
): Promise<SftpResult> {
  const batchDir = await mkdtemp(join(tmpdir(), "byom-sftp-batch-"));
  const batchFile = join(batchDir, "batch");
  await writeFile(batchFile, `${commands.join("\n")}\n`);
  try {
    const { stdout, stderr } = await execFileAsync(
      "sftp",
      [
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=5",
        "-i",
        privateKeyPath,
        "-P",
        String(vm.port),
        "-b",
        batchFile,
        `${username}@${vm.ip}`,
      ],
      { encoding: "utf8", timeout: 15_000 },
    );
    return { code: 0, stdout, stderr };
  } catch (error) {
    const failure = error as {
      code?: unknown;
      stdout?: string;
      stderr?: string;
    };
    return {
      code: typeof failure.code === "number" ? failure.code : -1,
      stdout: failure.stdout ?? "",
      stderr: failure.stderr ?? String(error),
    };
  } finally {
    await rm(batchDir, { recursive: true, force: true });
  }
}
