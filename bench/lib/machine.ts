/** The machine's details for the results file. */
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import os from "node:os";
import { promisify } from "node:util";

const run = promisify(execFile);

export interface Machine {
  cpuModel: string;
  cores: number;
  memoryGiB: number;
  kernel: string;
  node: string;
  natsServer: string;
  openssh: string;
  loadAtStart: string;
}

export async function describeMachine(): Promise<Machine> {
  const cpuinfo = await readFile("/proc/cpuinfo", "utf8").catch(() => "");
  const model =
    /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1]?.trim() ??
    os.cpus()[0]?.model ??
    "unknown";
  const natsServer = await run("nats-server", ["--version"]).then(
    (out) => out.stdout.trim(),
    () => "not found",
  );
  // ssh -V prints on stderr.
  const openssh = await run("ssh", ["-V"]).then(
    (out) => (out.stderr || out.stdout).trim(),
    () => "not found",
  );
  return {
    cpuModel: model,
    cores: os.cpus().length,
    memoryGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    natsServer,
    openssh,
    loadAtStart: os
      .loadavg()
      .map((value) => value.toFixed(2))
      .join(" "),
  };
}
