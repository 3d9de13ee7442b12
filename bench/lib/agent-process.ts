/**
 * The agent as it runs in production: `byom agent` compiled by tsc (as
 * the image builds it, into node_modules/.cache/byom-bench), in a process of its own,
 * configured through the environment.
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { access } from "node:fs/promises";
import { createInterface } from "node:readline";
import { promisify } from "node:util";

import { onCleanup } from "./cleanup.js";
import { progress } from "./suite.js";

const run = promisify(execFile);
const root = new URL("../../", import.meta.url).pathname;
/** Under node_modules/.cache: ignored by git, ESLint and Prettier. */
const buildDir = `${root}node_modules/.cache/byom-bench/build/`;
const mainScript = `${buildDir}cli/main.js`;

let built: Promise<void> | undefined;

/** Compiles src/ once per bench run (emits even when types fail elsewhere). */
export function buildAgent(): Promise<void> {
  built ??= (async () => {
    progress(`compiling src/ with tsc into ${buildDir}`);
    await run(
      "npx",
      [
        "tsc",
        "-p",
        "tsconfig.build.json",
        "--outDir",
        buildDir,
        "--declaration",
        "false",
        "--sourceMap",
        "false",
      ],
      { cwd: root },
    ).catch((error: { stdout?: string }) => {
      // Type errors from work in progress elsewhere still emit JS.
      progress(
        `tsc reported problems (using its output anyway): ${String(error.stdout ?? "").split("\n")[0]}`,
      );
    });
    await access(mainScript);
  })();
  return built;
}

/** One JSON log line of the agent. */
export interface LogLine {
  time: number;
  msg: string;
  [field: string]: unknown;
}

export interface AgentProcess {
  readonly pid: number;
  readonly lines: LogLine[];
  /** Resolves with the first line (from `from` on) that matches. */
  waitForLine(
    match: (line: LogLine) => boolean,
    timeoutMs: number,
    from?: number,
  ): Promise<LogLine>;
  /** SIGTERM, then waits for exit (the CPU profile is written then). */
  stop(): Promise<void>;
}

export interface AgentProcessOptions {
  natsUrl: string;
  /** VM_POOL_IPS value. */
  pool: string;
  privateKeyPath: string;
  node: string;
  concurrency?: number;
  /** Write a V8 CPU profile into this dir when the agent exits. */
  cpuProfileDir?: string;
  env?: Record<string, string>;
}

export async function startAgentProcess(
  options: AgentProcessOptions,
): Promise<AgentProcess> {
  await buildAgent();
  const args = [
    ...(options.cpuProfileDir
      ? ["--cpu-prof", `--cpu-prof-dir=${options.cpuProfileDir}`]
      : []),
    mainScript,
    "agent",
  ];
  const child: ChildProcess = spawn(process.execPath, args, {
    cwd: root,
    env: {
      ...process.env,
      NATS_URL: options.natsUrl,
      VM_POOL_IPS: options.pool,
      SSH_PRIV_KEY_PATH: options.privateKeyPath,
      SSH_TIMEOUT: "5",
      NODE_NAME: options.node,
      BYOM_CONCURRENCY: String(options.concurrency ?? 4),
      BYOM_HTTP_PORT: "0",
      BYOM_LOG_LEVEL: "info",
      BYOM_LOG_FORMAT: "json",
      BYOM_QUARANTINE_PROBE_INTERVAL_MS: "3600000",
      BYOM_RELEASE_TIMEOUT_MS: "30000",
      ...options.env,
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  const exited = once(child, "exit");
  const lines: LogLine[] = [];
  const waiters = new Set<() => void>();
  createInterface({ input: child.stderr! }).on("line", (text) => {
    try {
      const line = JSON.parse(text) as LogLine & { time: unknown };
      // The CLI may log ISO times; keep epoch ms.
      line.time =
        typeof line.time === "number"
          ? line.time
          : Date.parse(String(line.time));
      lines.push(line);
    } catch {
      lines.push({ time: Date.now(), msg: text });
    }
    waiters.forEach((wake) => wake());
  });

  let stopped: Promise<void> | undefined;
  child.once("exit", (code, signal) => {
    if (stopped === undefined) {
      progress(
        `agent ${options.node} exited unexpectedly (code ${code}, signal ${signal}): ${lines
          .slice(-5)
          .map((line) => JSON.stringify(line))
          .join("\n")}`,
      );
    }
  });
  const stop = (): Promise<void> => {
    stopped ??= (async () => {
      if (child.exitCode !== null || child.signalCode !== null) {
        return;
      }
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 15_000);
      await exited;
      clearTimeout(timer);
    })();
    return stopped;
  };
  const unregister = onCleanup(`agent ${options.node}`, stop);

  const waitForLine = async (
    match: (line: LogLine) => boolean,
    timeoutMs: number,
    from = 0,
  ): Promise<LogLine> => {
    const until = Date.now() + timeoutMs;
    for (let index = from; ;) {
      for (; index < lines.length; index += 1) {
        if (match(lines[index]!)) {
          return lines[index]!;
        }
      }
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(
          `agent ${options.node} exited: ${lines
            .slice(-3)
            .map((line) => line.msg)
            .join(" | ")}`,
        );
      }
      const left = until - Date.now();
      if (left <= 0) {
        throw new Error(`agent ${options.node}: no matching log line in time`);
      }
      await new Promise<void>((resolve) => {
        const wake = (): void => {
          clearTimeout(timer);
          waiters.delete(wake);
          resolve();
        };
        const timer = setTimeout(wake, Math.min(left, 200));
        waiters.add(wake);
      });
    }
  };

  try {
    await waitForLine((line) => line.msg === "agent serving requests", 60_000);
  } catch (error) {
    await unregister();
    throw error;
  }
  return { pid: child.pid!, lines, waitForLine, stop: unregister };
}
