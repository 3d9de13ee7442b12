import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as delay } from "node:timers/promises";

import { connect } from "@nats-io/transport-node";

/** A nats-server with JetStream on loopback, owned by one test file. */
export interface NatsServer {
  /** `nats://127.0.0.1:<port>` */
  readonly url: string;
  readonly port: number;
  /** JetStream store directory; removed by `stop()`. */
  readonly storeDir: string;
  /** Kills the server, waits for it to exit and removes the store. Idempotent. */
  stop(): Promise<void>;
  /** Stops the server and starts it again on the same port and store. */
  restart(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

export interface StartNatsServerOptions {
  /** Extra command-line arguments for nats-server. */
  args?: string[];
  /** Binary to run; default `nats-server` from PATH. */
  binary?: string;
  /** How long to wait for the server to accept a client; default 10 000 ms. */
  readyTimeoutMs?: number;
}

const bindAttempts = 5;

/** Servers still running; killed if the test process exits without cleanup. */
const running = new Set<ChildProcess>();
process.once("exit", () => {
  for (const child of running) {
    child.kill("SIGKILL");
  }
});

/**
 * Starts `nats-server -js` on 127.0.0.1 with a free port and its own store
 * directory, and resolves once a client can connect. Retries with another
 * port when the chosen one was taken in between. Call `stop()` in an
 * `after` hook.
 */
export async function startNatsServer(
  options: StartNatsServerOptions = {},
): Promise<NatsServer> {
  const storeDir = await mkdtemp(join(tmpdir(), "byom-nats-test-"));
  let lastError: unknown;
  for (let attempt = 0; attempt < bindAttempts; attempt += 1) {
    const port = await freePort();
    try {
      const child = await launch(port, storeDir, options);
      return handle(child, port, storeDir, options);
    } catch (error) {
      lastError = error;
    }
  }
  await rm(storeDir, { recursive: true, force: true });
  throw new Error(
    `nats-server did not start after ${bindAttempts} attempts: ${describe(lastError)}`,
    { cause: lastError },
  );
}

function handle(
  first: ChildProcess,
  port: number,
  storeDir: string,
  options: StartNatsServerOptions,
): NatsServer {
  let child: ChildProcess | undefined = first;
  let stopped = false;

  const stop = async (): Promise<void> => {
    if (stopped) {
      return;
    }
    stopped = true;
    try {
      await terminate(child);
    } finally {
      child = undefined;
      await rm(storeDir, { recursive: true, force: true });
    }
  };

  const restart = async (): Promise<void> => {
    if (stopped) {
      throw new Error("nats-server was stopped; cannot restart");
    }
    await terminate(child);
    child = undefined;
    child = await launch(port, storeDir, options);
  };

  return {
    url: `nats://127.0.0.1:${port}`,
    port,
    storeDir,
    stop,
    restart,
    [Symbol.asyncDispose]: stop,
  };
}

async function launch(
  port: number,
  storeDir: string,
  options: StartNatsServerOptions,
): Promise<ChildProcess> {
  const args = [
    "-js",
    "-a",
    "127.0.0.1",
    "-p",
    String(port),
    "-sd",
    storeDir,
    ...(options.args ?? []),
  ];
  const child = spawn(options.binary ?? "nats-server", args, {
    stdio: ["ignore", "ignore", "pipe"],
  });
  running.add(child);
  child.once("exit", () => running.delete(child));

  // nats-server logs to stderr; keep the tail for a start-up failure.
  let output = "";
  child.stderr?.on("data", (chunk: Buffer) => {
    output = (output + chunk.toString("utf8")).slice(-4000);
  });

  try {
    await waitUntilReady(child, port, options.readyTimeoutMs ?? 10_000);
    return child;
  } catch (error) {
    await terminate(child);
    throw new Error(`${describe(error)}; server output: ${output.trim()}`, {
      cause: error,
    });
  }
}

async function waitUntilReady(
  child: ChildProcess,
  port: number,
  timeoutMs: number,
): Promise<void> {
  const until = Date.now() + timeoutMs;
  let lastError: unknown;
  while (Date.now() < until) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(
        `nats-server on port ${port} exited (code ${child.exitCode}, signal ${child.signalCode})`,
      );
    }
    try {
      const nc = await connect({
        servers: `127.0.0.1:${port}`,
        reconnect: false,
        timeout: 1000,
      });
      await nc.close();
      return;
    } catch (error) {
      lastError = error;
    }
    await delay(50);
  }
  throw new Error(
    `nats-server on port ${port} did not accept a client in ${timeoutMs} ms: ${describe(lastError)}`,
  );
}

async function terminate(child: ChildProcess | undefined): Promise<void> {
  if (child === undefined || child.exitCode !== null || child.signalCode) {
    return;
  }
  const exited = once(child, "exit");
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
  try {
    await exited;
  } finally {
    clearTimeout(timer);
  }
}

/** A port the kernel just handed out on loopback; may be taken again. */
async function freePort(): Promise<number> {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const address = server.address();
  server.close();
  await once(server, "close");
  if (address === null || typeof address === "string") {
    throw new Error("could not read the address of a loopback listener");
  }
  return address.port;
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
