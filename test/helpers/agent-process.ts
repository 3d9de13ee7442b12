import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";

import { waitFor } from "./wait.js";

const cli = new URL("../../bin/byom.js", import.meta.url).pathname;

/** `byom agent` as a child process, with its stderr log kept. */
export interface AgentProcess {
  readonly child: ChildProcess;
  /** Everything the agent logged so far (JSON lines). */
  log(): string;
  /** Waits for a log line matching `pattern`; returns the line. */
  waitForLog(pattern: RegExp, timeoutMs?: number): Promise<string>;
  /** Sends a signal and waits for the exit; returns the exit code or signal. */
  stop(signal?: NodeJS.Signals): Promise<number | NodeJS.Signals>;
}

const running = new Set<ChildProcess>();
process.once("exit", () => {
  for (const child of running) {
    child.kill("SIGKILL");
  }
});

/** Starts `byom agent` with `env` and waits until it serves requests. */
export async function startAgentProcess(
  env: NodeJS.ProcessEnv,
): Promise<AgentProcess> {
  const child = spawn(process.execPath, [cli, "agent"], {
    env: {
      ...process.env,
      BYOM_HTTP_PORT: "0",
      BYOM_LOG_LEVEL: "debug",
      ...env,
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  running.add(child);
  const exited = once(child, "exit");
  child.once("exit", () => running.delete(child));
  let output = "";
  child.stderr?.on("data", (chunk: Buffer) => (output += chunk.toString()));

  const handle: AgentProcess = {
    child,
    log: () => output,
    waitForLog: (pattern, timeoutMs = 20_000) =>
      waitFor(
        () => {
          if (child.exitCode !== null) {
            throw new Error(
              `agent exited with ${child.exitCode}: ${output.slice(-500)}`,
            );
          }
          return output.split("\n").find((line) => pattern.test(line));
        },
        { timeoutMs, what: `agent log line ${pattern}` },
      ),
    stop: async (signal = "SIGTERM") => {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill(signal);
        await exited;
      }
      return child.exitCode ?? child.signalCode ?? 0;
    },
  };
  await handle.waitForLog(/agent serving requests/);
  return handle;
}
