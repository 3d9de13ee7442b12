/** Sandbox VMs in a child process (bench/sandbox-host.ts), and client keys. */
import { fork } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";

import {
  generateClientKey,
  type SandboxVmStatus,
} from "../../src/sandbox/index.js";
import type { HostReply, HostRequest } from "../sandbox-host.js";
import { onCleanup } from "./cleanup.js";

const hostScript = new URL("../sandbox-host.ts", import.meta.url).pathname;

/** A key pair for the agent and the OpenSSH baseline (same key). */
export interface ClientKey {
  dir: string;
  privateKeyPath: string;
  publicKey: string;
}

export async function makeClientKey(): Promise<ClientKey> {
  const dir = await mkdtemp(path.join(tmpdir(), "byom-bench-key-"));
  onCleanup(`key dir ${dir}`, () => rm(dir, { recursive: true, force: true }));
  const { privateKeyPath } = await generateClientKey(
    path.join(dir, "id_ed25519"),
    "byom-bench",
  );
  return {
    dir,
    privateKeyPath,
    publicKey: (await readFile(`${privateKeyPath}.pub`, "utf8")).trim(),
  };
}

export interface HostedSandbox {
  vms: SandboxVmStatus[];
  status(): Promise<SandboxVmStatus[]>;
  close(): Promise<void>;
}

/**
 * Starts `vms` VMs from `firstIp` in a child process; the state dir is
 * /var/lib/byom-bench-<pid>/<name>. Closed by the returned handle or by
 * the bench's cleanup.
 */
export async function startHostedSandbox(options: {
  name: string;
  vms: number;
  firstIp: string;
  authorizedKeys: string;
}): Promise<HostedSandbox> {
  const child = fork(hostScript, [], {
    execArgv: ["--import", "tsx"],
    stdio: ["ignore", "inherit", "inherit", "ipc"],
  });
  const replies: HostReply[] = [];
  const waiters: Array<() => void> = [];
  child.on("message", (message: HostReply) => {
    replies.push(message);
    waiters.splice(0).forEach((wake) => wake());
  });
  const exited = once(child, "exit");
  const next = async (types: HostReply["type"][]): Promise<HostReply> => {
    for (;;) {
      const index = replies.findIndex(
        (reply) => types.includes(reply.type) || reply.type === "error",
      );
      if (index >= 0) {
        return replies.splice(index, 1)[0]!;
      }
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error("sandbox host exited");
      }
      await Promise.race([
        new Promise<void>((resolve) => waiters.push(resolve)),
        exited,
      ]);
    }
  };
  const send = (request: HostRequest): void => {
    child.send(request);
  };

  let closed: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closed ??= (async () => {
      if (child.exitCode === null && child.signalCode === null) {
        if (child.connected) {
          send({ type: "close" });
        } else {
          child.kill("SIGTERM");
        }
        const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
        await exited;
        clearTimeout(timer);
      }
    })();
    return closed;
  };
  const unregister = onCleanup(`sandbox ${options.name}`, close);

  send({
    type: "start",
    vms: options.vms,
    firstIp: options.firstIp,
    stateDir: `/var/lib/byom-bench-${process.pid}/${options.name}`,
    authorizedKeys: options.authorizedKeys,
  });
  const ready = await next(["ready"]).catch(async (error: unknown) => {
    await unregister();
    throw error;
  });
  if (ready.type !== "ready") {
    await unregister();
    throw new Error(
      `sandbox ${options.name} did not start: ${ready.type === "error" ? ready.message : ready.type}`,
    );
  }
  return {
    vms: ready.vms,
    status: async () => {
      send({ type: "status" });
      const reply = await next(["status"]);
      return reply.type === "status" ? reply.vms : [];
    },
    close: unregister,
  };
}
