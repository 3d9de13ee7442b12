/**
 * Runs sandbox VMs in a process of their own (started by lib/sandbox.ts
 * over an IPC channel), so the VMs' watchers (which parse user-data as a
 * VM would) do not share an event loop with what is being measured. Closes
 * the sandbox when told, on SIGINT/SIGTERM, and when the parent goes away.
 */
import { createSandbox, type Sandbox } from "../src/sandbox/index.js";

export interface HostStart {
  type: "start";
  vms: number;
  firstIp: string;
  stateDir: string;
  authorizedKeys: string;
}

export type HostRequest = HostStart | { type: "status" } | { type: "close" };

export type HostReply =
  | { type: "ready" | "status"; vms: ReturnType<Sandbox["status"]> }
  | { type: "error"; message: string }
  | { type: "closed" };

let sandbox: Sandbox | undefined;
let closing: Promise<void> | undefined;

function reply(message: HostReply): void {
  if (process.connected) {
    process.send?.(message);
  }
}

function close(): Promise<void> {
  closing ??= (async () => {
    try {
      await sandbox?.close();
    } finally {
      reply({ type: "closed" });
      if (process.connected) {
        process.disconnect();
      }
    }
  })();
  return closing;
}

process.on("message", (message: HostRequest) => {
  void (async () => {
    try {
      if (message.type === "start") {
        sandbox = await createSandbox({
          vms: message.vms,
          firstIp: message.firstIp,
          stateDir: message.stateDir,
          authorizedKeys: message.authorizedKeys,
        });
        reply({ type: "ready", vms: sandbox.status() });
      } else if (message.type === "status") {
        reply({ type: "status", vms: sandbox?.status() ?? [] });
      } else {
        await close();
      }
    } catch (error) {
      reply({
        type: "error",
        message: error instanceof Error ? error.message : String(error),
      });
    }
  })();
});
process.on("disconnect", () => void close());
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.on(signal, () => void close().finally(() => process.exit(0)));
}
