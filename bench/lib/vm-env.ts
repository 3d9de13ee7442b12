/**
 * What the VM suites share: one sandbox of 50 VMs (127.50.0.2-51, in a
 * process of its own), the client key the agent and OpenSSH both use, and
 * helpers to reset a VM between runs.
 */
import { readFile, readdir, rm } from "node:fs/promises";
import path from "node:path";

import { connect, type NatsConnection } from "@nats-io/transport-node";

import { createLeaseStore, type LeaseStore } from "../../src/lease/index.js";
import { DefaultNames } from "../../src/protocol/index.js";
import type { SandboxVmStatus } from "../../src/sandbox/index.js";
import {
  startEmbeddedNats,
  type EmbeddedNats,
} from "../../src/transport/index.js";
import { onCleanup } from "./cleanup.js";
import {
  makeClientKey,
  startHostedSandbox,
  type ClientKey,
  type HostedSandbox,
} from "./sandbox.js";
import { progress } from "./suite.js";

export const vmCount = 50;
export const firstVmIp = "127.50.0.2";

export interface VmEnvironment {
  key: ClientKey;
  sandbox: HostedSandbox;
  vms: SandboxVmStatus[];
  /** VM_POOL_IPS for all of them. */
  poolSpec: string;
  ips: string[];
}

let shared: Promise<VmEnvironment> | undefined;

/** Starts the shared sandbox on first use. */
export function vmEnvironment(): Promise<VmEnvironment> {
  shared ??= (async () => {
    const key = await makeClientKey();
    progress(`starting ${vmCount} sandbox VMs from ${firstVmIp}`);
    const sandbox = await startHostedSandbox({
      name: "vms",
      vms: vmCount,
      firstIp: firstVmIp,
      authorizedKeys: key.publicKey,
    });
    const ips = sandbox.vms.map((vm) => vm.ip);
    return {
      key,
      sandbox,
      vms: sandbox.vms,
      ips,
      poolSpec: `${ips[0]}-${ips[ips.length - 1]}`,
    };
  })();
  return shared;
}

/** Removes what a delivery or an upload left in a VM's cidata/. */
export async function clearCidata(vm: SandboxVmStatus): Promise<void> {
  const entries = await readdir(vm.cidataDir).catch(() => [] as string[]);
  await Promise.all(
    entries.map((entry) =>
      rm(path.join(vm.cidataDir, entry), { force: true, recursive: true }),
    ),
  );
}

/** A nats-server and a bench-side lease store to free leases between runs. */
export interface NatsSide {
  server: EmbeddedNats;
  nc: NatsConnection;
  /** Opened after the agent made the bucket; call `openLeases()` first. */
  leases(): LeaseStore;
  openLeases(pool: string[]): Promise<void>;
  close(): Promise<void>;
}

export async function startNatsSide(name: string): Promise<NatsSide> {
  const server = await startEmbeddedNats();
  const stopServer = onCleanup(`${name} nats-server`, () => server.close());
  const nc = await connect({ servers: server.url, name: `bench-${name}` });
  const closeNc = onCleanup(`${name} connection`, () => nc.close());
  let store: LeaseStore | undefined;
  let closeStore: (() => Promise<void>) | undefined;
  return {
    server,
    nc,
    leases: () => {
      if (store === undefined) {
        throw new Error("openLeases() first");
      }
      return store;
    },
    openLeases: async (pool) => {
      store = createLeaseStore({
        nc,
        bucket: DefaultNames.leaseBucket,
        pool,
        agent: "bench",
      });
      const opened = store;
      closeStore = onCleanup(`${name} lease store`, () => opened.close());
      await store.start();
    },
    close: async () => {
      await closeStore?.();
      await closeNc();
      await stopServer();
    },
  };
}

/** The user-data fixtures, smallest first. */
export async function fixtures(): Promise<
  Array<{ name: string; label: string; path: string; data: Buffer }>
> {
  const dir = new URL("../../test/fixtures/userdata/", import.meta.url)
    .pathname;
  const files = [
    ["pod-basic.yaml", "1 KiB"],
    ["pod-initdata.yaml", "3 KiB"],
    ["pod-large-policy.yaml", "300 KiB"],
  ] as const;
  return Promise.all(
    files.map(async ([name, label]) => {
      const file = path.join(dir, name);
      return { name, label, path: file, data: await readFile(file) };
    }),
  );
}
