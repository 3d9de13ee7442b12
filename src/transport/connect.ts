import {
  AuthorizationError,
  connect,
  credsAuthenticator,
  nkeyAuthenticator,
  type NatsConnection,
  type NodeConnectionOptions,
  UserAuthenticationExpiredError,
} from "@nats-io/transport-node";

import { ConfigError, UnavailableError } from "../errors/index.js";
import { readAtMost } from "../files/index.js";
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
  /** Path of a file holding a user nkey seed (`SU...`) for nkey auth. */
  nkeySeedFile?: string;
  tls?: { caFile?: string; certFile?: string; keyFile?: string };
  /** First connection timeout; default 5000 ms. */
  timeoutMs?: number;
  logger?: Logger;
}

function serverList(servers: string | readonly string[]): string[] {
  const list = typeof servers === "string" ? servers.split(",") : [...servers];
  return list.map((server) => server.trim()).filter((server) => server !== "");
}

/** A `.creds` file (JWT and seed) or an nkey seed is a few KiB. */
const maxSecretFileBytes = 64 * 1024;

/** Reads a credentials file; the error names the file, never its content. */
async function readSecretFile(path: string, setting: string): Promise<Buffer> {
  try {
    const bytes = await readAtMost(path, maxSecretFileBytes + 1);
    if (bytes.length > maxSecretFileBytes) {
      throw new ConfigError(
        `${setting} file "${path}" is larger than ${maxSecretFileBytes} bytes: not a credentials file`,
      );
    }
    return bytes;
  } catch (error) {
    if (error instanceof ConfigError) {
      throw error;
    }
    const reason = (error as NodeJS.ErrnoException).code ?? String(error);
    throw new ConfigError(
      `${setting} file "${path}" cannot be read: ${reason}`,
      { cause: error },
    );
  }
}

/** The seed line of an nkey seed file (comments and blank lines skipped). */
function nkeySeedOf(content: Buffer): Uint8Array {
  const seed = content
    .toString("utf8")
    .split(/\r?\n/)
    .map((line) => line.trim())
    .find((line) => line !== "" && !line.startsWith("#"));
  if (seed === undefined || !seed.startsWith("SU")) {
    throw new ConfigError(
      "NATS_NKEY_SEED_FILE must hold a user nkey seed (a line starting with SU)",
    );
  }
  return new TextEncoder().encode(seed);
}

/**
 * Connects to NATS and keeps reconnecting forever after the first success.
 * Throws UnavailableError when the first connection fails, ConfigError
 * when a credentials or seed file cannot be used.
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
      await readSecretFile(options.credsFile, "NATS_CREDS"),
    );
  }
  if (options.nkeySeedFile) {
    settings.authenticator = nkeyAuthenticator(
      nkeySeedOf(
        await readSecretFile(options.nkeySeedFile, "NATS_NKEY_SEED_FILE"),
      ),
    );
  }
  const tls = options.tls;
  const servers = settings.servers as string[];
  if (servers.some((server) => /^(tls|wss):\/\//i.test(server))) {
    // A tls:// URL must never fall back to a clear connection (which would
    // carry the password in clear): require TLS even without a CA file.
    settings.tls = {};
  }
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
    const where = redactUrls(settings.servers as string[]).join(",");
    if (
      error instanceof AuthorizationError ||
      error instanceof UserAuthenticationExpiredError
    ) {
      // The same credentials will be refused again: not worth a retry.
      throw new ConfigError(
        `NATS at ${where} refused the connection (${reason}): ${credentialAdvice(options)}`,
        { cause: error },
      );
    }
    throw new UnavailableError(
      `cannot connect to NATS at ${where}: ${reason}${connectHint(options, reason)}`,
      { cause: error },
    );
  }
  watchStatus(connection, options.logger);
  return connection;
}

/** Which settings to check when the server refused the credentials. */
function credentialAdvice(options: NatsConnectOptions): string {
  const used = [
    ...(options.user ? ["NATS_USER and NATS_PASSWORD"] : []),
    ...(options.token ? ["NATS_TOKEN"] : []),
    ...(options.credsFile ? ["NATS_CREDS"] : []),
    ...(options.nkeySeedFile ? ["NATS_NKEY_SEED_FILE"] : []),
    ...(serverList(options.servers).some((url) => /\/\/[^/]*@/.test(url))
      ? ["the user in NATS_URL"]
      : []),
  ];
  return used.length === 0
    ? "it requires authentication and none is set (NATS_USER and NATS_PASSWORD, NATS_TOKEN, NATS_NKEY_SEED_FILE or NATS_CREDS)"
    : `check ${used.join(", ")}`;
}

/** What to check, for failures whose own text does not say. */
function connectHint(options: NatsConnectOptions, reason: string): string {
  const usesTls =
    options.tls?.caFile !== undefined ||
    serverList(options.servers).some((url) => url.startsWith("tls://"));
  if (
    usesTls &&
    !options.tls?.certFile &&
    /timeout|closed|reset/i.test(reason)
  ) {
    return " (a server that verifies clients drops a TLS connection without a client certificate: set NATS_TLS_CERT and NATS_TLS_KEY)";
  }
  return "";
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
