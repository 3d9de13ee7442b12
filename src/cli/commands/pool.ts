import type { Command } from "commander";

import { operatorReasonPrefix } from "../../agent/index.js";
import { loadConfig, type ByomConfig } from "../../config/index.js";
import { InvalidRequestError } from "../../errors/index.js";
import {
  createLeaseStore,
  type Lease,
  type LeaseStore,
} from "../../lease/index.js";
import { LeaseState, canonicalIp, showValue } from "../../protocol/index.js";
import { connectNats } from "../../transport/index.js";
import { failWith, natsOptionsFrom } from "../runtime.js";

interface PoolOptions {
  config?: string;
  json?: boolean;
}

/** One row per lease: IP, state, pod, node, since, reason. */
export function formatPoolTable(leases: readonly Lease[]): string {
  const header = ["IP", "STATE", "POD", "NODE", "SINCE", "REASON"];
  const rows = leases.map(({ record }) => [
    record.ip,
    record.state,
    record.podName
      ? `${record.podNamespace ?? "default"}/${record.podName}`
      : "-",
    record.requestingNode ?? "-",
    record.since,
    record.reason ?? "",
  ]);
  const widths = header.map((title, column) =>
    Math.max(title.length, ...rows.map((row) => (row[column] ?? "").length)),
  );
  return [header, ...rows]
    .map((row) =>
      row
        .map((cell, column) => cell.padEnd(widths[column] ?? 0))
        .join("  ")
        .trimEnd(),
    )
    .join("\n");
}

async function withLeases<T>(
  options: PoolOptions,
  run: (leases: LeaseStore, config: ByomConfig) => Promise<T>,
): Promise<T> {
  const config = loadConfig(options.config ? { file: options.config } : {});
  // Without VM_POOL_IPS the CLI works on the leases the bucket holds; the
  // store then adds no keys (reconciling is the agents' job).
  const pool = config.pool;
  const nc = await connectNats(
    natsOptionsFrom(config, `byom-pool-${config.node}`),
  );
  const leases = createLeaseStore({
    nc,
    bucket: config.names.leaseBucket,
    pool,
    agent: `cli@${config.node}`,
    reconcile: false,
    replicas: config.replicas,
  });
  try {
    await leases.start();
    return await run(leases, config);
  } finally {
    await leases.close();
    await nc.close();
  }
}

async function poolIp(
  text: string,
  config: ByomConfig,
  leases: LeaseStore,
): Promise<string> {
  const ip = canonicalIp(text);
  if (ip === undefined) {
    throw new InvalidRequestError(
      `argument <ip> must be an IPv4 or IPv6 address (got ${showValue(text)})`,
    );
  }
  const known =
    ip !== undefined &&
    (config.pool.length > 0
      ? config.pool.includes(ip)
      : (await leases.get(ip)) !== undefined);
  // A pool IP the agents have not added yet has no lease to act on.
  if (!known) {
    throw new InvalidRequestError(
      config.pool.length > 0
        ? `IP ${showValue(text)} is not in the pool (VM_POOL_IPS has ${config.pool.length} IPs; see byom config check)`
        : `IP ${showValue(text)} is not in the pool (the lease bucket has no key for it)`,
    );
  }
  return ip;
}

function printLease(lease: Lease, json: boolean, verb: string): void {
  if (json) {
    console.log(
      JSON.stringify({
        ok: true,
        lease: lease.record,
        revision: lease.revision,
      }),
    );
  } else {
    console.log(`${verb} ${lease.record.ip}: now ${lease.record.state}`);
  }
}

/** `byom pool ...`: read the pool and act on single leases. */
export function registerPoolCommands(program: Command): void {
  const pool = program
    .command("pool")
    .description("read the VM pool and act on leases");
  const common = (command: Command): Command =>
    command
      .option("-c, --config <file>", "config file (JSON or YAML)")
      .option("--json", "print JSON");

  common(
    pool.command("status").description("counts of leases by state"),
  ).action(async (options: PoolOptions) => {
    try {
      const counts = await withLeases(options, (leases) => leases.counts());
      if (options.json) {
        console.log(JSON.stringify({ ok: true, counts }));
        return;
      }
      for (const [state, count] of Object.entries(counts)) {
        console.log(`${state.padEnd(12)} ${count}`);
      }
    } catch (error) {
      failWith(error, options.json === true);
    }
  });

  common(
    pool
      .command("list")
      .description("every lease: IP, state, pod, node, since, reason"),
  ).action(async (options: PoolOptions) => {
    try {
      const leases = await withLeases(options, (store) => store.list());
      console.log(
        options.json
          ? JSON.stringify({
              ok: true,
              leases: leases.map((lease) => lease.record),
            })
          : formatPoolTable(leases),
      );
    } catch (error) {
      failWith(error, options.json === true);
    }
  });

  common(
    pool
      .command("release")
      .description("force a lease back to free (the VM must already be clean)"),
  )
    .argument("<ip>", "pool IP")
    .option("--force", "required: you confirm the VM holds no pod's data")
    .action(async (ip: string, options: PoolOptions & { force?: boolean }) => {
      try {
        if (options.force !== true) {
          throw new InvalidRequestError(
            "pool release frees a VM without a reboot; add --force to confirm",
          );
        }
        const lease = await withLeases(options, async (leases, config) =>
          leases.forceRelease(await poolIp(ip, config, leases)),
        );
        printLease(lease, options.json === true, "released");
      } catch (error) {
        failWith(error, options.json === true);
      }
    });

  common(
    pool
      .command("quarantine")
      .description("take a VM out of service until unquarantined"),
  )
    .argument("<ip>", "pool IP")
    .requiredOption("--reason <text>", "why (kept in the lease)")
    .action(async (ip: string, options: PoolOptions & { reason: string }) => {
      try {
        const lease = await withLeases(options, async (leases, config) =>
          leases.quarantine(
            await poolIp(ip, config, leases),
            `${operatorReasonPrefix} ${options.reason}`,
            // An automatic quarantine would be ended by the prober.
            { replaceReason: true },
          ),
        );
        printLease(lease, options.json === true, "quarantined");
      } catch (error) {
        failWith(error, options.json === true);
      }
    });

  common(
    pool
      .command("unquarantine")
      .description("return a quarantined VM to the pool"),
  )
    .argument("<ip>", "pool IP")
    .action(async (ip: string, options: PoolOptions) => {
      try {
        const lease = await withLeases(options, async (leases, config) => {
          const target = await poolIp(ip, config, leases);
          const state = (await leases.get(target))?.record.state;
          if (state !== LeaseState.Quarantined) {
            throw new InvalidRequestError(
              `IP ${target} is ${state ?? "not leased yet"}, not quarantined; nothing done`,
            );
          }
          return leases.unquarantine(target);
        });
        printLease(lease, options.json === true, "unquarantined");
      } catch (error) {
        failWith(error, options.json === true);
      }
    });
}
