/**
 * Suite 5: the agent's resident memory (VmRSS from /proc) when idle and
 * during 50 concurrent deliveries (one agent, concurrency 50, 50 VMs).
 */
import { setTimeout as delay } from "node:timers/promises";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";

import { createPublisher } from "../../src/publisher/index.js";
import { parseUserData, resourceNames } from "../../src/protocol/index.js";
import { startAgentProcess } from "../lib/agent-process.js";
import { memoryMiB } from "../lib/procstat.js";
import { ms, num, summarize, table, verdict } from "../lib/stats.js";
import { progress, type Suite, type SuiteOptions } from "../lib/suite.js";
import {
  clearCidata,
  fixtures,
  startNatsSide,
  vmEnvironment,
} from "../lib/vm-env.js";

const targetMiB = 150;

/**
 * Heap per in-flight create, measured here with the agent's own code:
 * what the decoded request and the user-data Buffer hold, and what the
 * YAML validation (parseUserData) allocates, retained and at its peak.
 */
async function perRequestHeap(): Promise<
  Array<{
    label: string;
    requestMiB: number;
    parsedMiB: number;
    parsePeakMiB: number;
  }>
> {
  setFlagsFromString("--expose-gc");
  const gc = runInNewContext("gc") as () => void;
  const heap = (): number => {
    gc();
    return process.memoryUsage().heapUsed / 2 ** 20;
  };
  const results = [];
  for (const fixture of await fixtures()) {
    const message = new TextEncoder().encode(
      JSON.stringify({
        v: 1,
        kind: "create",
        userData: fixture.data.toString("utf8"),
      }),
    );
    const before = heap();
    const request = JSON.parse(new TextDecoder().decode(message)) as {
      userData: string;
    };
    const bytes = Buffer.from(request.userData, "utf8");
    const withRequest = heap();
    // Peak: sample the heap right after parsing, before a GC can run.
    const parseStart = process.memoryUsage().heapUsed / 2 ** 20;
    const parsed = parseUserData(request.userData, { requireHeader: true });
    const parsePeak = process.memoryUsage().heapUsed / 2 ** 20 - parseStart;
    const withParsed = heap();
    results.push({
      label: fixture.label,
      requestMiB: withRequest - before + bytes.length / 2 ** 20,
      parsedMiB: withParsed - withRequest,
      parsePeakMiB: parsePeak,
    });
    void parsed;
  }
  return results;
}
const sampleEveryMs = 20;

export const memorySuite: Suite = {
  id: "memory",
  title: "5. Agent memory",
  async run(options: SuiteOptions) {
    const environment = await vmEnvironment();
    const side = await startNatsSide("memory");
    const concurrency = environment.vms.length;
    const agent = await startAgentProcess({
      natsUrl: side.server.url,
      pool: environment.poolSpec,
      privateKeyPath: environment.key.privateKeyPath,
      node: "bench-memory",
      concurrency,
    });
    try {
      await side.openLeases(environment.ips);
      const publisher = createPublisher({
        nc: side.nc,
        names: resourceNames(),
        requestingNode: "bench-node",
        requestTimeoutMs: 120_000,
      });
      const resetAll = async (): Promise<void> => {
        await Promise.all(
          environment.ips.map((ip) => side.leases().forceRelease(ip)),
        );
        await Promise.all(environment.vms.map(clearCidata));
        await delay(500);
      };
      await resetAll();

      progress("memory: idle");
      await delay(options.quick ? 1000 : 5000);
      const idle: number[] = [];
      for (let sample = 0; sample < 20; sample += 1) {
        idle.push((await memoryMiB(agent.pid)).rss);
        await delay(100);
      }
      const idleRss = summarize(idle).p50;

      const rows: string[][] = [
        ["idle (after start-up)", num(idleRss, 1), "", "", ""],
      ];
      let worst = idleRss;
      for (const fixture of await fixtures()) {
        if (fixture.label === "1 KiB") {
          continue;
        }
        progress(
          `memory: ${concurrency} concurrent deliveries of ${fixture.label}`,
        );
        const samples: number[] = [];
        let sampling = true;
        const sampler = (async () => {
          while (sampling) {
            const sample = await memoryMiB(agent.pid).catch(() => undefined);
            if (sample === undefined) {
              return;
            }
            samples.push(sample.rss);
            await delay(sampleEveryMs);
          }
        })();
        const started = performance.now();
        await Promise.all(
          environment.vms.map((_, index) =>
            publisher.createInstance({
              podName: `memory-${fixture.label.replace(/\W/g, "").toLowerCase()}-${index}`,
              sandboxId: "bench",
              userData: fixture.data,
            }),
          ),
        );
        const wall = performance.now() - started;
        sampling = false;
        await sampler;
        const peak = Math.max(...samples);
        const hwm = (await memoryMiB(agent.pid)).peak;
        worst = Math.max(worst, peak, hwm);
        rows.push([
          `${concurrency} concurrent deliveries of ${fixture.label}`,
          num(summarize(samples).p50, 1),
          num(peak, 1),
          num(hwm, 1),
          ms(wall),
        ]);
        await resetAll();
      }
      await publisher.close();
      const perRequest = await perRequestHeap();

      const markdown = [
        `One agent process (\`byom agent\` compiled by tsc, \`BYOM_CONCURRENCY=${concurrency}\`, info logs) with ${environment.vms.length} VMs. ` +
          `Idle: median of 20 samples after ${options.quick ? 1 : 5} s of rest. Deliveries: ${concurrency} creates published at once, VmRSS sampled every ${sampleEveryMs} ms until the last result; ` +
          "VmHWM is the kernel's peak RSS of the process since it started.",
        "",
        table(
          [
            "state",
            "VmRSS median (MiB)",
            "VmRSS peak (MiB)",
            "VmHWM (MiB)",
            "wall",
          ],
          rows,
        ),
        "",
        "Where the growth comes from (measured in the bench process with the same code, `gc()` before each step): the heap a request holds while " +
          "`handleCreate` has it — the decoded request (JSON.parse of the message), the user-data Buffer, and `parseUserData` (the YAML validation of the whole document) — per fixture:",
        "",
        table(
          [
            "user-data",
            "request JSON + Buffer (MiB)",
            "parseUserData result (MiB)",
            "parse peak, transient (MiB)",
            `× ${concurrency} (MiB)`,
          ],
          perRequest.map((item) => [
            item.label,
            num(item.requestMiB, 2),
            num(item.parsedMiB, 2),
            num(item.parsePeakMiB, 2),
            num((item.requestMiB + item.parsePeakMiB) * concurrency, 0),
          ]),
        ),
      ].join("\n");
      return {
        markdown,
        targets: [
          `Memory < ${targetMiB} MB: ${verdict(worst < targetMiB)} (idle ${num(idleRss, 1)} MiB, peak ${num(worst, 1)} MiB)`,
        ],
      };
    } finally {
      await agent.stop();
      await side.close();
    }
  },
};
