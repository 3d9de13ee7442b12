/**
 * Suite 2: end-to-end create, publisher to result, against OpenSSH's own
 * `sftp -b` doing the same upload to the same VM with the same key.
 */
import { mkdir, readdir } from "node:fs/promises";
import path from "node:path";
import { setTimeout as delay } from "node:timers/promises";

import { createPublisher, type Publisher } from "../../src/publisher/index.js";
import { resourceNames } from "../../src/protocol/index.js";
import type { SandboxVmStatus } from "../../src/sandbox/index.js";
import {
  startAgentProcess,
  type AgentProcess,
  type LogLine,
} from "../lib/agent-process.js";
import { summarizeProfile } from "../lib/cpuprofile.js";
import { SftpBatches, renameMethod, runSftp } from "../lib/openssh.js";
import { ms, num, ratio, summarize, table, verdict } from "../lib/stats.js";
import { progress, type Suite, type SuiteOptions } from "../lib/suite.js";
import {
  clearCidata,
  fixtures,
  startNatsSide,
  vmEnvironment,
  type NatsSide,
} from "../lib/vm-env.js";

/** Pause after resetting a VM, so its watcher is done before the next run. */
const settleMs = 50;

interface Phases {
  queueAndLease: number;
  readiness: number;
  delivery: number;
  readyAndResult: number;
  reply: number;
}

export const e2eSuite: Suite = {
  id: "e2e",
  title: "2. End-to-end create",
  async run(options: SuiteOptions) {
    const runs = options.quick ? 5 : 50;
    const warmups = options.quick ? 1 : 3;
    const environment = await vmEnvironment();
    const byIp = new Map(environment.vms.map((vm) => [vm.ip, vm]));
    await Promise.all(environment.vms.map(clearCidata));
    const side = await startNatsSide("e2e");
    let agent: AgentProcess | undefined;
    try {
      agent = await startAgentProcess({
        natsUrl: side.server.url,
        pool: environment.poolSpec,
        privateKeyPath: environment.key.privateKeyPath,
        node: "bench-e2e",
      });
      await side.openLeases(environment.ips);
      const publisher = createPublisher({
        nc: side.nc,
        names: resourceNames(),
        requestingNode: "bench-node",
        requestTimeoutMs: 30_000,
      });
      const batches = new SftpBatches();
      const rows: string[][] = [];
      const phaseRows: string[][] = [];
      const targets: string[] = [];
      let renameNote = "";

      for (const fixture of await fixtures()) {
        progress(`e2e: ${fixture.label} × ${runs} (each: ours, then sftp -b)`);
        const ours: number[] = [];
        const openssh: number[] = [];
        const phases: Phases[] = [];
        for (let index = -warmups; index < runs; index += 1) {
          const { elapsed, ip, phase } = await createOnce(
            publisher,
            agent,
            `e2e-${fixture.name.replace(/\W/g, "")}-${index + warmups}`,
            fixture.data,
          );
          const vm = byIp.get(ip)!;
          await reset(side, vm, ip);

          const batch = await batches.upload(fixture.path);
          if (renameNote === "") {
            renameNote = await renameMethod(
              vm.ip,
              vm.port,
              environment.key.privateKeyPath,
              batch,
            );
            await clearCidata(vm);
          }
          const baseline = await runSftp(
            vm.ip,
            vm.port,
            environment.key.privateKeyPath,
            await batches.upload(fixture.path),
          );
          await expectUserData(vm);
          await clearCidata(vm);
          await delay(settleMs);
          if (index >= 0) {
            ours.push(elapsed);
            openssh.push(baseline);
            if (phase !== undefined) {
              phases.push(phase);
            }
          }
        }

        const oursSummary = summarize(ours);
        const sshSummary = summarize(openssh);
        const p50Ratio = oursSummary.p50 / sshSummary.p50;
        rows.push([
          fixture.label,
          String(ours.length),
          ms(oursSummary.p50),
          ms(oursSummary.p99),
          ms(sshSummary.p50),
          ms(sshSummary.p99),
          ratio(p50Ratio),
          ratio(oursSummary.p99 / sshSummary.p99),
        ]);
        const median = (field: keyof Phases): string =>
          ms(summarize(phases.map((item) => item[field])).p50);
        phaseRows.push([
          fixture.label,
          median("queueAndLease"),
          median("readiness"),
          median("delivery"),
          median("readyAndResult"),
          median("reply"),
          ms(oursSummary.p50),
        ]);
        targets.push(
          `E2E ${fixture.label}: p50 ≤ 1.2× OpenSSH: ${verdict(p50Ratio <= 1.2)} (${ratio(p50Ratio)}: ${ms(oursSummary.p50)} vs ${ms(sshSummary.p50)})`,
        );
      }

      await agent.stop();
      let profileSection = "";
      if (options.profile) {
        profileSection = await profileAgent(
          options,
          side,
          environment.poolSpec,
          environment.key.privateKeyPath,
          publisher,
          byIp,
        );
      }
      await publisher.close();

      const markdown = [
        `${runs} runs per fixture after ${warmups} warm-up runs; one agent process (\`byom agent\` compiled by tsc, concurrency 4, pool of ${environment.ips.length} sandbox VMs, info logs), the publisher in the bench process. ` +
          "Each run: `createInstance()` from call to result, then (untimed) the lease is freed with `forceRelease` and cidata/ emptied on the host, " +
          "then OpenSSH's `sftp -b` uploads the same file to the same VM with the same ed25519 key (`put -f` to cidata/.tmp-bench-N, then `rename` onto cidata/user-data), " +
          `timed from spawn to exit, and cidata/ is emptied again; ${settleMs} ms pause after each reset.`,
        "",
        `OpenSSH's rename: ${renameNote}.`,
        "",
        table(
          [
            "user-data",
            "runs",
            "byom p50",
            "byom p99",
            "sftp -b p50",
            "sftp -b p99",
            "p50 ratio",
            "p99 ratio",
          ],
          rows,
        ),
        "",
        "Where the time goes (medians, from the agent's log timestamps, ms resolution): " +
          "queue + lease = publish until `lease acquired`; readiness = TCP probe + SSH inspect connection (cidata listing); " +
          "delivery = the SFTP delivery connection (connect, handshake, auth, temp write, fsync, posix-rename, stat; the delivery's own `durationMs`); " +
          "ready + result = `markReady` CAS and result put; reply = result published until the publisher has it.",
        "",
        table(
          [
            "user-data",
            "queue + lease",
            "readiness",
            "delivery",
            "ready + result",
            "reply",
            "total p50",
          ],
          phaseRows,
        ),
        ...(profileSection === "" ? [] : ["", profileSection]),
      ].join("\n");
      return { markdown, targets };
    } finally {
      await agent?.stop();
      await side.close();
    }
  },
};

async function createOnce(
  publisher: Publisher,
  agent: AgentProcess,
  podName: string,
  data: Buffer,
): Promise<{ elapsed: number; ip: string; phase: Phases | undefined }> {
  const from = agent.lines.length;
  const startedAt = Date.now();
  const started = performance.now();
  const created = await publisher.createInstance({
    podName,
    sandboxId: "bench",
    userData: data,
  });
  const elapsed = performance.now() - started;
  const endedAt = Date.now();
  const phase = await phasesOf(
    agent,
    created.requestId,
    from,
    startedAt,
    endedAt,
  );
  return { elapsed, ip: created.instance.id, phase };
}

async function phasesOf(
  agent: AgentProcess,
  requestId: string,
  from: number,
  startedAt: number,
  endedAt: number,
): Promise<Phases | undefined> {
  const of = (message: string) => (line: LogLine) =>
    line.msg === message && line.requestId === requestId;
  try {
    const served = await agent.waitForLine(of("request served"), 2000, from);
    const leased = await agent.waitForLine(of("lease acquired"), 10, from);
    // The delivery's own line has no request id: match the leased IP.
    const delivery = await agent.waitForLine(
      (line) => line.msg === "delivered user-data" && line.ip === leased.ip,
      10,
      from,
    );
    const deliveryMs = Number(delivery.durationMs);
    return {
      queueAndLease: leased.time - startedAt,
      readiness: delivery.time - deliveryMs - leased.time,
      delivery: deliveryMs,
      readyAndResult: served.time - delivery.time,
      reply: endedAt - served.time,
    };
  } catch {
    return undefined;
  }
}

async function reset(
  side: NatsSide,
  vm: SandboxVmStatus,
  ip: string,
): Promise<void> {
  await side.leases().forceRelease(ip);
  await clearCidata(vm);
  await delay(settleMs);
}

async function expectUserData(vm: SandboxVmStatus): Promise<void> {
  const entries = await readdir(vm.cidataDir);
  if (!entries.includes("user-data")) {
    throw new Error(
      `sftp -b left no user-data on ${vm.ip}: ${entries.join(", ")}`,
    );
  }
}

/**
 * A separate pass with `node --cpu-prof` on the agent: 30 creates of the
 * 3 KiB fixture, then where the agent's CPU time went.
 */
async function profileAgent(
  options: SuiteOptions,
  side: NatsSide,
  poolSpec: string,
  privateKeyPath: string,
  publisher: Publisher,
  byIp: Map<string, SandboxVmStatus>,
): Promise<string> {
  const dir = path.join(options.profileDir, `e2e-${Date.now()}`);
  await mkdir(dir, { recursive: true });
  progress("e2e: profiling the agent (node --cpu-prof), 30 creates of 3 KiB");
  const agent = await startAgentProcess({
    natsUrl: side.server.url,
    pool: poolSpec,
    privateKeyPath,
    node: "bench-e2e-profiled",
    cpuProfileDir: dir,
  });
  const fixture = (await fixtures())[1]!;
  const runs = options.quick ? 5 : 30;
  const started = performance.now();
  let busy = 0;
  for (let index = 0; index < runs; index += 1) {
    const { elapsed, ip } = await createOnce(
      publisher,
      agent,
      `e2e-profile-${index}`,
      fixture.data,
    );
    busy += elapsed;
    await reset(side, byIp.get(ip)!, ip);
  }
  const wall = performance.now() - started;
  await agent.stop();
  const file = (await readdir(dir)).find((name) =>
    name.endsWith(".cpuprofile"),
  );
  if (file === undefined) {
    return "CPU profile: the agent wrote none.";
  }
  const summary = await summarizeProfile(path.join(dir, file));
  return [
    `**Agent CPU profile** (\`node --cpu-prof\`, ${runs} creates of 3 KiB, ${num(wall / 1000, 1)} s wall of which ${num(busy / 1000, 1)} s inside requests; file ${path.relative(process.cwd(), path.join(dir, file))}): ` +
      `the agent process was idle for ${num(summary.idlePercent, 0)}% of the samples (GC ${num(summary.gcPercent, 1)}%). Self time of the busy part by package: ` +
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
