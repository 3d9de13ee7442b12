import { readFile } from "node:fs/promises";

import {
  connect,
  credsAuthenticator,
  type NatsConnection,
  type NodeConnectionOptions,
} from "@nats-io/transport-node";

import { UnavailableError } from "../errors/index.js";
import type { Logger } from "../logging/index.js";

/** How to reach NATS; plain values, usually taken from the config. */
export interface NatsConnectOptions {
  /** Comma-separated or list of server URLs. */
  servers: string | readonly string[];
  /** Client name shown in server monitoring. */
  name: string;
  user?: string;
  password?: string;
  token?: string;
  /** Path of a `.creds` file (JWT + nkey seed). */
  credsFile?: string;
  tls?: { caFile?: string; certFile?: string; keyFile?: string };
  /** First connection timeout; default 5000 ms. */
  timeoutMs?: number;
  logger?: Logger;
}

function serverList(servers: string | readonly string[]): string[] {
  const list = typeof servers === "string" ? servers.split(",") : [...servers];
  return list.map((server) => server.trim()).filter((server) => server !== "");
}

/**
 * Connects to NATS and keeps reconnecting forever after the first success.
 * Throws UnavailableError when the first connection fails.
 */
export async function connectNats(
  options: NatsConnectOptions,
): Promise<NatsConnection> {
  const settings: NodeConnectionOptions = {
    servers: serverList(options.servers),
    name: options.name,
    timeout: options.timeoutMs ?? 5000,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 500,
  };
  if (options.user) {
    settings.user = options.user;
    settings.pass = options.password ?? "";
  }
  if (options.token) {
    settings.token = options.token;
  }
  if (options.credsFile) {
    settings.authenticator = credsAuthenticator(
      await readFile(options.credsFile),
    );
  }
  const tls = options.tls;
  if (tls?.caFile || tls?.certFile) {
    settings.tls = {
      ...(tls.caFile ? { caFile: tls.caFile } : {}),
      ...(tls.certFile ? { certFile: tls.certFile } : {}),
      ...(tls.keyFile ? { keyFile: tls.keyFile } : {}),
    };
  }

  let connection: NatsConnection;
  try {
    connection = await connect(settings);
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    throw new UnavailableError(
      `cannot connect to NATS at ${redactUrls(settings.servers as string[]).join(",")}: ${reason}`,
      { cause: error },
    );
  }
  watchStatus(connection, options.logger);
  return connection;
}

function watchStatus(connection: NatsConnection, logger?: Logger): void {
  if (logger === undefined) {
    return;
  }
  void (async () => {
    for await (const status of connection.status()) {
      logger.info({ natsStatus: status.type }, "nats connection status");
    }
  })().catch(() => undefined);
}

/** URLs with any password replaced, for messages and logs. */
export function redactUrls(urls: readonly string[]): string[] {
  return urls.map((url) =>
    url.replace(/\/\/([^:@/]+):[^@/]*@/, "//$1:[redacted]@"),
  );
}
