import { spawn, type ChildProcess } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { once } from "node:events";
import { setTimeout as delay } from "node:timers/promises";

import { UnavailableError } from "../errors/index.js";

/** A nats-server child process with JetStream and its own store dir. */
export interface EmbeddedNats {
  readonly url: string;
  readonly port: number;
  readonly storeDir: string;
  /**
   * Stops the server and keeps its store (for restarts). SIGTERM by
   * default; SIGKILL to simulate a crash.
   */
  stop(signal?: "SIGTERM" | "SIGKILL"): Promise<void>;
  /** Starts it again on the same port and store. */
  restart(): Promise<void>;
  /** Stops the server and removes its store; safe to call twice. */
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

export interface EmbeddedNatsOptions {
  /** Path of the nats-server binary; default "nats-server" on PATH or /usr/sbin. */
  binary?: string;
  /** Extra arguments, e.g. auth or TLS settings. */
  args?: readonly string[];
  /** Port; default a free one. */
  port?: number;
  /** How long to wait for the server to accept connections; default 10 s. */
  startTimeoutMs?: number;
}

/** Servers still running; killed if this process exits without closing them. */
const running = new Set<ChildProcess>();
let exitHookInstalled = false;

function track(child: ChildProcess): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.once("exit", () => {
      for (const server of running) {
        server.kill("SIGKILL");
      }
    });
  }
  running.add(child);
  child.once("exit", () => running.delete(child));
}

/** Finds a free TCP port on 127.0.0.1. */
export async function freePort(): Promise<number> {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const address = server.address();
  server.close();
  await once(server, "close");
  if (address === null || typeof address === "string") {
    throw new Error("could not read the bound port");
  }
  return address.port;
}

async function accepts(port: number): Promise<boolean> {
  const socket = new Socket();
  try {
    socket.connect(port, "127.0.0.1");
    await once(socket, "connect");
    return true;
  } catch {
    return false;
  } finally {
    socket.destroy();
  }
}

function binaryPath(options: EmbeddedNatsOptions): string {
  if (options.binary !== undefined) {
    return options.binary;
  }
  return process.env.PATH?.split(":").some((dir) => dir.endsWith("sbin"))
    ? "nats-server"
    : "/usr/sbin/nats-server";
}

/**
 * Starts `nats-server -js` on 127.0.0.1 with a temporary store directory and
 * waits until it accepts connections. Throws UnavailableError with the
 * server's own output when it does not start.
 */
export async function startEmbeddedNats(
  options: EmbeddedNatsOptions = {},
): Promise<EmbeddedNats> {
  const storeDir = await mkdtemp(join(tmpdir(), "byom-nats-"));
  const port = options.port ?? (await freePort());
  const binary = binaryPath(options);
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
  let child: ChildProcess | undefined;
  let closed = false;

  const launch = async (): Promise<void> => {
    let output = "";
    const process_ = spawn(binary, args, { stdio: ["ignore", "pipe", "pipe"] });
    process_.stdout?.on(
      "data",
      (chunk: Buffer) => (output += chunk.toString()),
    );
    process_.stderr?.on(
      "data",
      (chunk: Buffer) => (output += chunk.toString()),
    );
    let exited = false;
    let spawnError: Error | undefined;
    process_.once("exit", () => (exited = true));
    process_.once("error", (error) => {
      spawnError = error;
      exited = true;
    });
    child = process_;
    track(process_);

    const until = Date.now() + (options.startTimeoutMs ?? 10_000);
    while (Date.now() < until) {
      if (exited) {
        const hint =
          spawnError === undefined
            ? output.trim().split("\n").slice(-3).join(" | ")
            : `${spawnError.message} (install it: apt-get install -y nats-server)`;
        throw new UnavailableError(
          `nats-server did not start on port ${port}: ${hint}`,
        );
      }
      if (await accepts(port)) {
        return;
      }
      await delay(50);
    }
    process_.kill("SIGKILL");
    throw new UnavailableError(
      `nats-server did not accept connections on port ${port} in time`,
    );
  };

  const stop = async (
    signal: "SIGTERM" | "SIGKILL" = "SIGTERM",
  ): Promise<void> => {
    const running = child;
    child = undefined;
    if (
      running === undefined ||
      running.exitCode !== null ||
      running.signalCode !== null
    ) {
      return;
    }
    const exited = once(running, "exit");
    running.kill(signal);
    const timer = setTimeout(() => running.kill("SIGKILL"), 5000);
    await exited;
    clearTimeout(timer);
  };

  const close = async (): Promise<void> => {
    if (closed) {
      return;
    }
    closed = true;
    try {
      await stop();
    } finally {
      await rm(storeDir, { recursive: true, force: true });
    }
  };

  try {
    await launch();
  } catch (error) {
    await close();
    throw error;
  }

  return {
    url: `nats://127.0.0.1:${port}`,
    port,
    storeDir,
    stop,
    restart: async () => {
      await stop();
      await launch();
    },
    close,
    [Symbol.asyncDispose]: close,
  };
}
