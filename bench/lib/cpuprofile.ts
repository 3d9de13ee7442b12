/** Reads a V8 .cpuprofile and lists where the samples fell. */
import { readFile } from "node:fs/promises";

interface ProfileNode {
  id: number;
  callFrame: {
    functionName: string;
    url: string;
    lineNumber: number;
  };
  children?: number[];
}

interface Profile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

export interface ProfileSummary {
  /** Profiled wall time, ms. */
  wallMs: number;
  /** Share of samples in (idle). */
  idlePercent: number;
  gcPercent: number;
  /** Heaviest frames by self time: label, % of all samples, % of busy. */
  top: Array<{ frame: string; percent: number; busyPercent: number }>;
  /** Self time grouped by package (node_modules/<name>) or "byom" / "node". */
  byPackage: Array<{ name: string; busyPercent: number }>;
}

export async function summarizeProfile(
  file: string,
  topCount = 12,
): Promise<ProfileSummary> {
  const profile = JSON.parse(await readFile(file, "utf8")) as Profile;
  return summarizeProfileData(profile, topCount);
}

/** Profiles this process (the V8 inspector) while `work` runs. */
export async function profileWhile(
  work: () => Promise<void>,
  topCount = 12,
): Promise<ProfileSummary> {
  const { Session } = await import("node:inspector/promises");
  const session = new Session();
  session.connect();
  try {
    await session.post("Profiler.enable");
    await session.post("Profiler.start");
    let profile: Profile | undefined;
    try {
      await work();
    } finally {
      const stopped = await session.post("Profiler.stop");
      profile = stopped.profile as unknown as Profile;
    }
    return summarizeProfileData(profile, topCount);
  } finally {
    session.disconnect();
  }
}

export function summarizeProfileData(
  profile: Profile,
  topCount = 12,
): ProfileSummary {
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const selfCount = new Map<number, number>();
  for (const id of profile.samples) {
    selfCount.set(id, (selfCount.get(id) ?? 0) + 1);
  }
  const total = profile.samples.length;
  let idle = 0;
  let gc = 0;
  const frames = new Map<string, number>();
  const packages = new Map<string, number>();
  for (const [id, count] of selfCount) {
    const frame = byId.get(id)!.callFrame;
    if (frame.functionName === "(idle)") {
      idle += count;
      continue;
    }
    if (frame.functionName === "(garbage collector)") {
      gc += count;
    }
    const label = `${frame.functionName || "(anonymous)"} ${shortUrl(frame.url)}${frame.url ? `:${frame.lineNumber + 1}` : ""}`;
    frames.set(label, (frames.get(label) ?? 0) + count);
    const owner = packageOf(frame);
    packages.set(owner, (packages.get(owner) ?? 0) + count);
  }
  const busy = Math.max(1, total - idle);
  const percent = (count: number, of: number): number => (count / of) * 100;
  return {
    wallMs: (profile.endTime - profile.startTime) / 1000,
    idlePercent: percent(idle, Math.max(1, total)),
    gcPercent: percent(gc, Math.max(1, total)),
    top: [...frames]
      .sort((left, right) => right[1] - left[1])
      .slice(0, topCount)
      .map(([frame, count]) => ({
        frame,
        percent: percent(count, total),
        busyPercent: percent(count, busy),
      })),
    byPackage: [...packages]
      .sort((left, right) => right[1] - left[1])
      .slice(0, 8)
      .map(([name, count]) => ({ name, busyPercent: percent(count, busy) })),
  };
}

const repoRoot = new URL("../../", import.meta.url).href;

function shortUrl(url: string): string {
  const modules = url.lastIndexOf("node_modules/");
  if (modules >= 0) {
    return url.slice(modules + "node_modules/".length);
  }
  if (url.startsWith(repoRoot) && !url.includes("/byom-bench/build/")) {
    return url.slice(repoRoot.length);
  }
  const build = url.indexOf("/byom-bench/build/");
  if (build >= 0) {
    return `src/${url.slice(build + "/byom-bench/build/".length)}`;
  }
  return url.replace(/^file:\/\//, "");
}

function packageOf(frame: ProfileNode["callFrame"]): string {
  if (
    frame.url.includes("/byom-bench/build/") ||
    frame.url.startsWith(`${repoRoot}src/`)
  ) {
    return "byom (src/)";
  }
  const match = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(frame.url);
  if (match) {
    return match[1]!;
  }
  if (frame.url.includes("/bench/")) {
    return "bench harness";
  }
  if (frame.url.startsWith("node:") || frame.url === "") {
    return frame.functionName.startsWith("(")
      ? frame.functionName
      : "node core / native";
  }
  return "other";
}
