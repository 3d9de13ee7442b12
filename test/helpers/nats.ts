import { startEmbeddedNats } from "../../src/transport/index.js";

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
  /** How long to wait for the server to accept a client; default 10 000 ms. */
  readyTimeoutMs?: number;
}

const bindAttempts = 5;

/**
 * Starts `nats-server -js` on 127.0.0.1 with a free port and its own store
 * directory (the same launcher as the demo), retrying with another port
 * when the chosen one was taken in between. Call `stop()` in an `after`
 * hook; a server left running is killed when the test process exits.
 */
export async function startNatsServer(
  options: StartNatsServerOptions = {},
): Promise<NatsServer> {
  let lastError: unknown;
  for (let attempt = 0; attempt < bindAttempts; attempt += 1) {
    try {
      const server = await startEmbeddedNats({
        ...(options.args ? { args: options.args } : {}),
        ...(options.readyTimeoutMs
          ? { startTimeoutMs: options.readyTimeoutMs }
          : {}),
      });
      return {
        url: server.url,
        port: server.port,
        storeDir: server.storeDir,
        stop: server.close,
        restart: server.restart,
        [Symbol.asyncDispose]: server.close,
      };
    } catch (error) {
      lastError = error;
    }
  }
  throw new Error(`nats-server did not start after ${bindAttempts} attempts`, {
    cause: lastError,
  });
}
