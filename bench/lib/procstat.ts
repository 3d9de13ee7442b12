/** CPU and memory of processes, read from /proc. */
import { readFile, readdir } from "node:fs/promises";
import os from "node:os";

/** Clock ticks per second of /proc/<pid>/stat times (USER_HZ, 100 on Linux). */
const ticksPerSecond = 100;

/** User + system CPU seconds a process has used so far. */
export async function cpuSeconds(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, "utf8");
  // Fields after the command name (which may hold spaces) in parentheses.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const user = Number(fields[11]);
  const system = Number(fields[12]);
  return (user + system) / ticksPerSecond;
}

/** VmRSS and VmHWM of a process, in MiB. */
export async function memoryMiB(
  pid: number,
): Promise<{ rss: number; peak: number }> {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  const field = (name: string): number =>
    Number(new RegExp(`^${name}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? NaN) /
    1024;
  return { rss: field("VmRSS"), peak: field("VmHWM") };
}

/** Pids whose command line contains `needle`. */
export async function pidsMatching(needle: string): Promise<number[]> {
  const pids: number[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) {
      continue;
    }
    const cmdline = await readFile(`/proc/${entry}/cmdline`, "utf8").catch(
      () => "",
    );
    if (cmdline.split("\0").join(" ").includes(needle)) {
      pids.push(Number(entry));
    }
  }
  return pids;
}

/** Measures CPU use of some processes over an interval, as % of one core. */
export class CpuMeter {
  readonly #pids: Record<string, number>;
  #start: Record<string, number> = {};
  #startedAt = 0;
  #machineStart = 0;

  constructor(pids: Record<string, number>) {
    this.#pids = pids;
  }

  async start(): Promise<void> {
    this.#startedAt = performance.now();
    this.#machineStart = machineBusySeconds();
    for (const [name, pid] of Object.entries(this.#pids)) {
      this.#start[name] = await cpuSeconds(pid).catch(() => NaN);
    }
  }

  /** % of one core per process since start(), plus `machine` (all cores busy %). */
  async stop(): Promise<Record<string, number>> {
    const elapsed = (performance.now() - this.#startedAt) / 1000;
    const usage: Record<string, number> = {};
    for (const [name, pid] of Object.entries(this.#pids)) {
      const used =
        (await cpuSeconds(pid).catch(() => NaN)) - this.#start[name]!;
      usage[name] = (used / elapsed) * 100;
    }
    usage.machine =
      ((machineBusySeconds() - this.#machineStart) /
        (elapsed * os.cpus().length)) *
      100;
    return usage;
  }
}

function machineBusySeconds(): number {
  let busy = 0;
  for (const cpu of os.cpus()) {
    busy += cpu.times.user + cpu.times.nice + cpu.times.sys + cpu.times.irq;
  }
  return busy / 1000;
}
