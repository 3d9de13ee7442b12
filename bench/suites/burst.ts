/**
 * Suite 3: 50 creates at once on 50 sandbox VMs served by 2 agent
 * processes (concurrency 4 each, so 8 deliveries at a time), against 50
 * OpenSSH `sftp -b` uploads run 8 at a time.
 */
import { setTimeout as delay } from "node:timers/promises";

import { createPublisher } from "../../src/publisher/index.js";
import { resourceNames } from "../../src/protocol/index.js";
import { startAgentProcess, type AgentProcess } from "../lib/agent-process.js";
import { SftpBatches, runSftp } from "../lib/openssh.js";
import { ms, num, ratio, summarize, table } from "../lib/stats.js";
import { progress, type Suite, type SuiteOptions } from "../lib/suite.js";
import {
  clearCidata,
  fixtures,
  startNatsSide,
  vmEnvironment,
} from "../lib/vm-env.js";

const agentsCount = 2;
const perAgentConcurrency = 4;
const sshParallelism = agentsCount * perAgentConcurrency;

interface Round {
  wallMs: number;
  latencies: number[];
}

export const burstSuite: Suite = {
  id: "burst",
  title: "3. Burst: 50 creates at once",
  async run(options: SuiteOptions) {
    const rounds = options.quick ? 1 : 3;
    const environment = await vmEnvironment();
    const fixture = (await fixtures())[1]!;
    const side = await startNatsSide("burst");
    const agents: AgentProcess[] = [];
    try {
      for (let index = 0; index < agentsCount; index += 1) {
        agents.push(
          await startAgentProcess({
            natsUrl: side.server.url,
            pool: environment.poolSpec,
            privateKeyPath: environment.key.privateKeyPath,
            node: `bench-burst-${index}`,
            concurrency: perAgentConcurrency,
          }),
        );
      }
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

      const ours: Round[] = [];
      const openssh: Round[] = [];
      const batches = new SftpBatches();
      for (let round = 0; round < rounds; round += 1) {
        progress(`burst: round ${round + 1}/${rounds}: byom`);
        const started = performance.now();
        const latencies = await Promise.all(
          environment.vms.map(async (_, index) => {
            const begun = performance.now();
            await publisher.createInstance({
              podName: `burst-${round}-${index}`,
              sandboxId: "bench",
              userData: fixture.data,
            });
            return performance.now() - begun;
          }),
        );
        ours.push({ wallMs: performance.now() - started, latencies });
        await resetAll();

        progress(
          `burst: round ${round + 1}/${rounds}: sftp -b, ${sshParallelism} at a time`,
        );
        const prepared = await Promise.all(
          environment.vms.map(async (vm) => ({
            vm,
            batch: await batches.upload(fixture.path),
          })),
        );
        const queue = [...prepared];
        const sshLatencies: number[] = [];
        const sshStarted = performance.now();
        await Promise.all(
          Array.from({ length: sshParallelism }, async () => {
            for (
              let item = queue.shift();
              item !== undefined;
              item = queue.shift()
            ) {
              sshLatencies.push(
                await runSftp(
                  item.vm.ip,
                  item.vm.port,
                  environment.key.privateKeyPath,
                  item.batch,
                ),
              );
            }
          }),
        );
        openssh.push({
          wallMs: performance.now() - sshStarted,
          latencies: sshLatencies,
        });
        await resetAll();
      }
      await publisher.close();

      const row = (name: string, data: Round[]): string[] => {
        const wall = summarize(data.map((item) => item.wallMs));
        const all = summarize(data.flatMap((item) => item.latencies));
        return [
          name,
          data.map((item) => ms(item.wallMs)).join(", "),
          ms(wall.p50),
          num(environment.vms.length / (wall.p50 / 1000), 1),
          ms(all.p50),
          ms(all.p99),
        ];
      };
      const oursWall = summarize(ours.map((item) => item.wallMs)).p50;
      const sshWall = summarize(openssh.map((item) => item.wallMs)).p50;
      const markdown = [
        `${environment.vms.length} creates of the ${fixture.label} fixture published at once; ${agentsCount} agent processes (concurrency ${perAgentConcurrency} each) share the ${environment.vms.length} VMs. ` +
          `Baseline: ${environment.vms.length} \`sftp -b\` uploads (temp name, then rename), one per VM, ${sshParallelism} at a time (the agents' combined concurrency). ` +
          `${rounds} round(s) each, alternating; VMs reset between rounds (leases force-released, cidata/ emptied). Wall time from the first publish (or spawn) to the last result (or exit).`,
        "",
        table(
          [
            "",
            "wall time per round",
            "wall p50",
            "provisions/s",
            "per-create p50",
            "per-create p99",
          ],
          [
            row("byom (2 agents)", ours),
            row(`sftp -b, ${sshParallelism} at a time`, openssh),
          ],
        ),
        "",
        `byom wall time is ${ratio(oursWall / sshWall)} the OpenSSH figure.`,
      ].join("\n");
      return {
        markdown,
        targets: [
          `Burst (no target): ${num(environment.vms.length / (oursWall / 1000), 1)} provisions/s vs ${num(environment.vms.length / (sshWall / 1000), 1)} uploads/s with sftp -b (wall ${ratio(oursWall / sshWall)})`,
        ],
      };
    } finally {
      for (const agent of agents.reverse()) {
        await agent.stop();
      }
      await side.close();
    }
  },
};
