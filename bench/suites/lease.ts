/**
 * Suite 1: leasing under contention. Allocators (each its own NATS
 * connection and its own LeaseStore, like separate agents) run
 * allocate+release cycles for a fixed time on pools of 100, 1,000 and
 * 10,000 IPs; the single-document baseline runs the same cycles on the
 * same server in the same run.
 */
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { pino, type Logger } from "pino";

import {
  createLeaseStore,
  type ClaimRequest,
  type LeaseStore,
} from "../../src/lease/index.js";
import { startEmbeddedNats } from "../../src/transport/index.js";
import {
  openDocumentPool,
  seedDocumentPool,
  type DocumentPool,
} from "../baseline-single-document.js";
import { onCleanup } from "../lib/cleanup.js";
import { profileWhile, type ProfileSummary } from "../lib/cpuprofile.js";
import { CpuMeter, pidsMatching } from "../lib/procstat.js";
import { ms, num, ratio, summarize, table, verdict } from "../lib/stats.js";
import { progress, type Suite, type SuiteOptions } from "../lib/suite.js";

const poolSizes = [100, 1000, 10_000] as const;
const allocatorCounts = [1, 4, 16] as const;
/** Cells profiled (in-process V8 profiler) after the matrix of their pool. */
const profiledCells = [
  { poolSize: 100, allocators: 16 },
  { poolSize: 10_000, allocators: 1 },
];

/** What one allocator does per cycle; returns [acquireMs, cycleMs]. */
type Cycle = (allocationId: string) => Promise<void>;

interface Cell {
  design: "kv-per-ip" | "single-document";
  poolSize: number;
  allocators: number;
  cycles: number;
  seconds: number;
  cyclesPerSecond: number;
  cycleP50: number;
  cycleP99: number;
  acquireP50: number;
  acquireP99: number;
  conflicts: number;
  retries: number;
  errors: number;
  firstError?: string;
  /** Client CPU per cycle (all allocators share this process), µs. */
  clientCpuUsPerCycle: number;
  cpu: Record<string, number>;
}

/** `count` IPv4 addresses from 127.51.0.1 on. */
function poolOf(count: number): string[] {
  const base = (127 << 24) | (51 << 16) | 1;
  return Array.from({ length: count }, (_, offset) => {
    const value = base + offset;
    return [24, 16, 8, 0].map((shift) => (value >>> shift) & 255).join(".");
  });
}

/**
 * A logger that counts the store's own messages instead of writing them:
 * "lost a CAS race for an IP" is a refused compare-and-swap on an IP key,
 * "IP taken meanwhile" a move to the next candidate after one.
 */
function countingLogger(counts: Map<string, number>): Logger {
  return pino({
    level: "debug",
    hooks: {
      logMethod(args) {
        const message = typeof args[0] === "string" ? args[0] : args[1];
        if (typeof message === "string") {
          counts.set(message, (counts.get(message) ?? 0) + 1);
        }
      },
    },
  });
}

const lostRaceMessage = "lost a CAS race for an IP";
const movedOnMessage = "IP taken meanwhile";

function claimFor(allocationId: string): ClaimRequest {
  return {
    allocationId,
    requestId: `req-${allocationId}`,
    podName: allocationId,
    podNamespace: "bench",
    requestingNode: "bench-node",
  };
}

export const leaseSuite: Suite = {
  id: "lease",
  title: "1. Leasing under contention",
  async run(options: SuiteOptions) {
    const warmupMs = options.quick ? 300 : 1000;
    const measureMs = options.quick ? 1000 : 5000;
    const server = await startEmbeddedNats();
    const stopServer = onCleanup("lease nats-server", () => server.close());
    const [natsPid] = await pidsMatching(server.storeDir);
    const cells: Cell[] = [];
    const profiles: Array<{
      poolSize: number;
      allocators: number;
      summary: ProfileSummary;
    }> = [];

    try {
      for (const poolSize of poolSizes) {
        const pool = poolOf(poolSize);
        const bucket = `bench-leases-${poolSize}`;
        const documentBucket = `bench-document-${poolSize}`;
        progress(`lease: seeding pools of ${num(poolSize)} IPs`);
        await seedPools(server.url, bucket, documentBucket, pool);

        for (const allocators of allocatorCounts) {
          const timing = { warmupMs, measureMs, natsPid };
          progress(
            `lease: kv-per-ip, ${num(poolSize)} IPs, ${allocators} allocator(s)`,
          );
          cells.push(
            await runOurs(server.url, bucket, pool, allocators, timing),
          );
          progress(
            `lease: single-document, ${num(poolSize)} IPs, ${allocators} allocator(s)`,
          );
          cells.push(
            await runBaseline(
              server.url,
              documentBucket,
              pool,
              allocators,
              timing,
            ),
          );
        }
        const profiled = profiledCells.find(
          (cell) => cell.poolSize === poolSize,
        );
        if (options.profile && profiled !== undefined) {
          progress(
            `lease: profiling kv-per-ip, ${num(poolSize)} IPs, ${profiled.allocators} allocator(s)`,
          );
          const timing = {
            warmupMs: 0,
            measureMs: options.quick ? 500 : 3000,
            natsPid,
          };
          const summary = await profileWhile(async () => {
            await runOurs(
              server.url,
              bucket,
              pool,
              profiled.allocators,
              timing,
            );
          });
          profiles.push({ ...profiled, summary });
        }
      }
    } finally {
      await stopServer();
    }
    const result = report(cells, { warmupMs, measureMs });
    return {
      targets: result.targets,
      markdown: [result.markdown, ...profiles.map(profileSection)].join("\n\n"),
    };
  },
};

async function seedPools(
  url: string,
  bucket: string,
  documentBucket: string,
  pool: string[],
): Promise<void> {
  const nc = await connect({ servers: url, name: "bench-seed" });
  try {
    const store = createLeaseStore({ nc, bucket, pool, agent: "bench-seed" });
    await store.start();
    await store.close();
    await seedDocumentPool(nc, documentBucket, pool);
  } finally {
    await nc.close();
  }
}

interface Timing {
  warmupMs: number;
  measureMs: number;
  natsPid: number | undefined;
}

async function connections(
  url: string,
  count: number,
): Promise<NatsConnection[]> {
  return Promise.all(
    Array.from({ length: count }, (_, index) =>
      connect({ servers: url, name: `bench-allocator-${index}` }),
    ),
  );
}

async function runOurs(
  url: string,
  bucket: string,
  pool: string[],
  allocators: number,
  timing: Timing,
): Promise<Cell> {
  const counts = new Map<string, number>();
  const logger = countingLogger(counts);
  const ncs = await connections(url, allocators);
  const stores: LeaseStore[] = [];
  try {
    for (const [index, nc] of ncs.entries()) {
      stores.push(
        createLeaseStore({ nc, bucket, pool, agent: `bench-${index}`, logger }),
      );
    }
    await Promise.all(stores.map((store) => store.start()));

    // A real cycle without VMs: acquire (claimed), then release the way a
    // delete does: beginRelease (releasing), free (free).
    const cycles = stores.map((store): Cycle => async (allocationId) => {
      const { lease } = await store.acquire(claimFor(allocationId));
      acquired.set(allocationId, performance.now());
      await store.beginRelease(lease.record.ip, allocationId);
      await store.free(lease.record.ip);
    });
    const acquired = new Map<string, number>();
    const before = snapshot(counts);
    const measured = await measure(cycles, acquired, timing);
    const after = snapshot(counts);
    return {
      design: "kv-per-ip",
      poolSize: pool.length,
      allocators,
      ...measured,
      conflicts: after.lost - before.lost,
      retries: after.movedOn - before.movedOn,
    };
  } finally {
    await Promise.all(stores.map((store) => store.close()));
    await Promise.all(ncs.map((nc) => nc.close()));
  }
}

function snapshot(counts: Map<string, number>): {
  lost: number;
  movedOn: number;
} {
  return {
    lost: counts.get(lostRaceMessage) ?? 0,
    movedOn: counts.get(movedOnMessage) ?? 0,
  };
}

async function runBaseline(
  url: string,
  bucket: string,
  pool: string[],
  allocators: number,
  timing: Timing,
): Promise<Cell> {
  const ncs = await connections(url, allocators);
  try {
    await seedDocumentPool(ncs[0]!, bucket, pool);
    const pools: DocumentPool[] = await Promise.all(
      ncs.map((nc) => openDocumentPool(nc, bucket)),
    );
    const acquired = new Map<string, number>();
    const cycles = pools.map((documentPool): Cycle => async (allocationId) => {
      await documentPool.allocate(allocationId);
      acquired.set(allocationId, performance.now());
      await documentPool.release(allocationId);
    });
    const before = pools.map((item) => ({ ...item.stats }));
    const measured = await measure(cycles, acquired, timing);
    const sum = (field: "conflicts" | "retries"): number =>
      pools.reduce(
        (total, item, index) =>
          total + item.stats[field] - before[index]![field],
        0,
      );
    return {
      design: "single-document",
      poolSize: pool.length,
      allocators,
      ...measured,
      conflicts: sum("conflicts"),
      retries: sum("retries"),
    };
  } finally {
    await Promise.all(ncs.map((nc) => nc.close()));
  }
}

/**
 * Runs every allocator's cycles back to back for warm-up + measurement;
 * counts the cycles that both start and end inside the measurement window.
 */
async function measure(
  cycles: Cycle[],
  acquired: Map<string, number>,
  timing: Timing,
): Promise<
  Omit<Cell, "design" | "poolSize" | "allocators" | "conflicts" | "retries">
> {
  const startedAt = performance.now();
  const windowStart = startedAt + timing.warmupMs;
  const windowEnd = windowStart + timing.measureMs;
  const cycleTimes: number[] = [];
  const acquireTimes: number[] = [];
  let errors = 0;
  let firstError: string | undefined;
  const meter = new CpuMeter({
    bench: process.pid,
    ...(timing.natsPid === undefined ? {} : { nats: timing.natsPid }),
  });
  let meterStarted: Promise<void> | undefined;
  let clientCpuStart: NodeJS.CpuUsage | undefined;

  const loop = async (cycle: Cycle, index: number): Promise<void> => {
    for (let sequence = 0; ; sequence += 1) {
      const now = performance.now();
      if (now >= windowEnd) {
        return;
      }
      if (now >= windowStart && meterStarted === undefined) {
        meterStarted = meter.start();
        clientCpuStart = process.cpuUsage();
      }
      const allocationId = `a${index}-${sequence}`;
      try {
        await cycle(allocationId);
      } catch (error) {
        errors += 1;
        firstError ??= error instanceof Error ? error.message : String(error);
        continue;
      }
      const ended = performance.now();
      const acquiredAt = acquired.get(allocationId);
      acquired.delete(allocationId);
      if (
        now >= windowStart &&
        ended <= windowEnd &&
        acquiredAt !== undefined
      ) {
        cycleTimes.push(ended - now);
        acquireTimes.push(acquiredAt - now);
      }
    }
  };
  await Promise.all(cycles.map(loop));
  await meterStarted;
  const cpu = await meter.stop();
  const clientCpu = process.cpuUsage(clientCpuStart);

  const cycleSummary = summarize(cycleTimes);
  const acquireSummary = summarize(acquireTimes);
  const seconds = timing.measureMs / 1000;
  return {
    cycles: cycleTimes.length,
    seconds,
    cyclesPerSecond: cycleTimes.length / seconds,
    cycleP50: cycleSummary.p50,
    cycleP99: cycleSummary.p99,
    acquireP50: acquireSummary.p50,
    acquireP99: acquireSummary.p99,
    errors,
    ...(firstError === undefined ? {} : { firstError }),
    clientCpuUsPerCycle:
      (clientCpu.user + clientCpu.system) / Math.max(1, cycleTimes.length),
    cpu,
  };
}

function report(
  cells: Cell[],
  timing: { warmupMs: number; measureMs: number },
): { markdown: string; targets: string[] } {
  const find = (design: Cell["design"], poolSize: number, allocators: number) =>
    cells.find(
      (cell) =>
        cell.design === design &&
        cell.poolSize === poolSize &&
        cell.allocators === allocators,
    );

  const rows = cells.map((cell) => {
    const baseline = find("single-document", cell.poolSize, cell.allocators);
    const vsBaseline =
      cell.design === "kv-per-ip" && baseline !== undefined
        ? ratio(cell.cyclesPerSecond / baseline.cyclesPerSecond)
        : "";
    return [
      cell.design,
      num(cell.poolSize),
      String(cell.allocators),
      num(cell.cyclesPerSecond, 0),
      vsBaseline,
      ms(cell.cycleP50),
      ms(cell.cycleP99),
      ms(cell.acquireP50),
      ms(cell.acquireP99),
      num(cell.conflicts),
      num(cell.retries),
      num(cell.errors),
      num(cell.clientCpuUsPerCycle, 0),
      `${num(cell.cpu.bench ?? NaN, 0)}% / ${num(cell.cpu.nats ?? NaN, 0)}% / ${num(cell.cpu.machine ?? NaN, 0)}%`,
    ];
  });

  const targets: string[] = [];
  const sixteen = poolSizes.map((poolSize) => {
    const ours = find("kv-per-ip", poolSize, 16);
    const baseline = find("single-document", poolSize, 16);
    return {
      poolSize,
      value:
        ours && baseline
          ? ours.cyclesPerSecond / baseline.cyclesPerSecond
          : NaN,
    };
  });
  const worst16 = Math.min(...sixteen.map((item) => item.value));
  targets.push(
    `Leasing, 16 allocators ≥ 10× the single-document baseline: ${verdict(worst16 >= 10)} (${sixteen
      .map((item) => `${ratio(item.value)} at ${num(item.poolSize)} IPs`)
      .join(", ")})`,
  );

  const growth = allocatorCounts.map((allocators) => {
    const small = find("kv-per-ip", 100, allocators);
    const large = find("kv-per-ip", 10_000, allocators);
    return {
      allocators,
      wall:
        small && large ? small.cyclesPerSecond / large.cyclesPerSecond : NaN,
      cpu:
        small && large
          ? large.clientCpuUsPerCycle / small.clientCpuUsPerCycle
          : NaN,
    };
  });
  const worstGrowth = Math.max(...growth.map((item) => item.wall));
  targets.push(
    `Leasing, cost per allocation 100 → 10,000 IPs ≤ 1.5×: ${verdict(worstGrowth <= 1.5)} (time per cycle ${growth
      .map((item) => `${ratio(item.wall)} at ${item.allocators}`)
      .join(", ")} allocator(s); client CPU per cycle ${growth
      .map((item) => `${ratio(item.cpu)} at ${item.allocators}`)
      .join(", ")})`,
  );

  const errors = cells.filter((cell) => cell.firstError !== undefined);
  const markdown = [
    `Each cell: ${timing.warmupMs / 1000} s warm-up, then ${timing.measureMs / 1000} s measured. ` +
      "Each allocator has its own NATS connection and its own store (its own cache, like a separate agent), " +
      "all in the bench process, against one `nats-server -js` (file storage, history 5). " +
      "A **kv-per-ip** cycle is `acquire()` (index key + CAS free→claimed on the IP key + index pointed) " +
      "then release as a delete does it without the VM: `beginRelease()` (claimed→releasing) and `free()` (releasing→free, index removed). " +
      "A **single-document** cycle (bench/baseline-single-document.ts) is allocate + release, each a read of the whole pool document " +
      "and a `kv.update` at the read revision, re-read on 10071. Both pick by MD5 of the allocation id over the free IPs; allocation ids are unique per cycle.",
    "",
    "Conflicts: kv-per-ip = refused CAS writes on an IP key (the store's debug message `lost a CAS race for an IP`), " +
      "retries = moves to the next free IP after one (`IP taken meanwhile`); single-document = refused document updates, each followed by a re-read and retry. " +
      "Client CPU/cycle is the bench process's CPU time divided by the cycles (every allocator shares it). " +
      "CPU % columns: bench process / nats-server (of one core) / whole machine (of all cores).",
    "",
    table(
      [
        "design",
        "pool IPs",
        "allocators",
        "cycles/s",
        "vs baseline",
        "cycle p50",
        "cycle p99",
        "acquire p50",
        "acquire p99",
        "conflicts",
        "retries",
        "errors",
        "client CPU/cycle (µs)",
        "CPU bench / nats / machine",
      ],
      rows,
    ),
    ...(errors.length > 0
      ? [
          "",
          "Errors seen: " +
            errors
              .map(
                (cell) =>
                  `${cell.design} ${cell.poolSize}×${cell.allocators}: ${cell.firstError}`,
              )
              .join("; "),
        ]
      : []),
  ].join("\n");
  return { markdown, targets };
}

function profileSection(profile: {
  poolSize: number;
  allocators: number;
  summary: ProfileSummary;
}): string {
  const { summary } = profile;
  return [
    `**Profile of the bench process, kv-per-ip, ${num(profile.poolSize)} IPs, ${profile.allocators} allocator(s)** ` +
      `(V8 sampling profiler, ${num(summary.wallMs / 1000, 1)} s): idle ${num(summary.idlePercent, 0)}% of samples, GC ${num(summary.gcPercent, 1)}%. ` +
      "Busy samples by package: " +
      summary.byPackage
        .map((item) => `${item.name} ${num(item.busyPercent, 0)}%`)
        .join(", ") +
      ".",
    "",
    table(
      ["frame (self time)", "% of samples", "% of busy samples"],
      summary.top.map((item) => [
        `\`${item.frame}\``,
        num(item.percent, 1),
        num(item.busyPercent, 1),
      ]),
    ),
  ].join("\n");
}
