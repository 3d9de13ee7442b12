/**
 * `npm run bench [-- --only lease,e2e] [--quick] [--no-profile] [--out FILE]`
 *
 * Runs the benchmark suites on real components (nats-server, sandbox VMs
 * with OpenSSH sshd, the agent as its own process) and writes the figures
 * to bench/results.md. A run of some suites replaces only their sections
 * of an existing results file. Needs root (sshd chroots) and loopback
 * addresses 127.50.x.x-127.59.x.x.
 */
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";

import { cleanupAll, installSignalHandlers } from "./lib/cleanup.js";
import { describeMachine, type Machine } from "./lib/machine.js";
import { progress, type Suite, type SuiteOptions } from "./lib/suite.js";
import { burstSuite } from "./suites/burst.js";
import { e2eSuite } from "./suites/e2e.js";
import { leaseSuite } from "./suites/lease.js";
import { memorySuite } from "./suites/memory.js";
import { reloadSuite } from "./suites/reload.js";

const suites: Suite[] = [
  leaseSuite,
  e2eSuite,
  burstSuite,
  reloadSuite,
  memorySuite,
];

const benchDir = new URL(".", import.meta.url).pathname;

interface Section {
  id: string;
  title: string;
  body: string;
  targets: string[];
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      only: { type: "string" },
      quick: { type: "boolean", default: false },
      "no-profile": { type: "boolean", default: false },
      out: { type: "string" },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    console.log(
      `usage: npm run bench -- [--only ${suites.map((suite) => suite.id).join(",")}] [--quick] [--no-profile] [--out FILE]`,
    );
    return 0;
  }
  const wanted = values.only?.split(",").map((id) => id.trim()) ?? [];
  const unknown = wanted.filter(
    (id) => !suites.some((suite) => suite.id === id),
  );
  if (unknown.length > 0) {
    console.error(
      `unknown suite(s) ${unknown.join(", ")}; choose from ${suites.map((suite) => suite.id).join(", ")}`,
    );
    return 2;
  }
  if (process.getuid?.() !== 0) {
    console.error("the bench needs root (sandbox VMs run sshd with a chroot)");
    return 2;
  }
  const selected =
    wanted.length === 0
      ? suites
      : suites.filter((suite) => wanted.includes(suite.id));
  const out = path.resolve(values.out ?? path.join(benchDir, "results.md"));
  const options: SuiteOptions = {
    quick: values.quick,
    profile: !values["no-profile"],
    profileDir: new URL(
      "../node_modules/.cache/byom-bench/profiles/",
      import.meta.url,
    ).pathname,
  };

  installSignalHandlers();
  const machine = await describeMachine();
  const startedAt = new Date();
  const started = performance.now();
  const sections: Section[] = [];
  let failed = false;
  try {
    for (const suite of selected) {
      const suiteStarted = performance.now();
      progress(`suite ${suite.id}: ${suite.title}`);
      try {
        const result = await suite.run(options);
        const seconds = (performance.now() - suiteStarted) / 1000;
        sections.push({
          id: suite.id,
          title: suite.title,
          body: `${result.markdown}\n\nSuite time: ${seconds.toFixed(0)} s.`,
          targets: result.targets,
        });
        result.targets.forEach((line) => progress(`  ${line}`));
      } catch (error) {
        failed = true;
        const reason =
          error instanceof Error
            ? (error.stack ?? error.message)
            : String(error);
        console.error(reason);
        sections.push({
          id: suite.id,
          title: suite.title,
          body: `Not completed: the suite failed with\n\n\`\`\`\n${reason}\n\`\`\``,
          targets: [`${suite.title}: not completed (failed)`],
        });
      }
    }
  } finally {
    await cleanupAll();
  }
  const totalSeconds = (performance.now() - started) / 1000;
  const command = `npm run bench${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(" ")}` : ""}`;
  await writeResults(out, machine, startedAt, totalSeconds, command, sections);
  progress(
    `wrote ${path.relative(process.cwd(), out)} in ${totalSeconds.toFixed(0)} s`,
  );
  return failed ? 1 : 0;
}

/** The hand-written analysis, kept across runs. */
const notesPattern = /<!-- notes -->[\s\S]*?<!-- \/notes -->/;

const sectionPattern = /<!-- suite:(\w+) -->\n([\s\S]*?)<!-- \/suite:\1 -->/g;

/** Keeps sections of suites not run this time from the existing file. */
async function writeResults(
  file: string,
  machine: Machine,
  startedAt: Date,
  totalSeconds: number,
  command: string,
  sections: Section[],
): Promise<void> {
  const previous = await readFile(file, "utf8").catch(() => "");
  const kept = new Map<string, string>();
  for (const match of previous.matchAll(sectionPattern)) {
    kept.set(match[1]!, match[2]!);
  }
  const notes =
    notesPattern.exec(previous)?.[0] ??
    "<!-- notes -->\n## Analysis\n\n(none yet)\n<!-- /notes -->";
  const stamp = `Measured ${startedAt.toISOString()} with \`${command}\` (run took ${totalSeconds.toFixed(0)} s); machine: ${machine.cpuModel}, ${machine.cores} cores, load average at start ${machine.loadAtStart}.`;
  for (const section of sections) {
    kept.set(
      section.id,
      [
        `## ${section.title}`,
        "",
        `_${stamp}_`,
        "",
        "Targets:",
        "",
        ...section.targets.map((line) => `- ${line}`),
        "",
        section.body,
        "",
      ].join("\n"),
    );
  }

  const body = suites
    .filter((suite) => kept.has(suite.id))
    .map(
      (suite) =>
        `<!-- suite:${suite.id} -->\n${kept.get(suite.id)}<!-- /suite:${suite.id} -->`,
    )
    .join("\n\n");
  const text = [
    "# byom-nats benchmarks",
    "",
    "Generated by `npm run bench` (bench/run.ts); do not edit by hand. " +
      "Run a subset with `npm run bench -- --only lease,e2e` (suites: " +
      suites.map((suite) => `\`${suite.id}\``).join(", ") +
      "); it replaces only those sections. `--quick` is a smoke test of the bench, not a measurement; `--no-profile` skips the profiles. " +
      "The Analysis section is written by hand and kept across runs: check it against the figures after a re-run.",
    "",
    "## Machine (latest run)",
    "",
    `- Date: ${startedAt.toISOString()}`,
    `- Command: \`${command}\`, total ${totalSeconds.toFixed(0)} s`,
    `- CPU: ${machine.cpuModel}, ${machine.cores} cores; memory ${machine.memoryGiB} GiB; ${machine.kernel}`,
    `- Node ${machine.node}; ${machine.natsServer}; ${machine.openssh}`,
    `- Load average at start: ${machine.loadAtStart}`,
    "",
    notes,
    "",
    body,
    "",
  ].join("\n");
  await writeFile(file, text);
}

process.exitCode = await main();
