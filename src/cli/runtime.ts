import { pino, type Logger } from "pino";

import type { AgentOptions } from "../agent/index.js";
import type { ByomConfig } from "../config/index.js";
import { loadPrivateKey, type LoadedPrivateKey } from "../delivery/index.js";
import { ByomError, ConfigError, toByomError } from "../errors/index.js";
import { errorFields } from "../logging/index.js";
import {
  createUnsealer,
  loadSealingSeeds,
  sealingPublicKeyOf,
} from "../sealing/index.js";
import type { NatsConnectOptions } from "../transport/index.js";
import { exitCodeOf, CliExit } from "./exit.js";

/** The settings the CLI needs to reach NATS and to log. */
export interface RuntimeSettings {
  natsUrl: string;
  natsUser: string;
  natsPassword: string;
  natsToken: string;
  natsCredsFile: string;
  natsNkeySeedFile: string;
  natsTlsCa: string;
  natsTlsCert: string;
  natsTlsKey: string;
  logLevel: string;
  logFormat: string;
}

/**
 * The root logger: JSON lines on stderr (stdout stays for command output),
 * or a pretty format for people at a terminal.
 */
export function createRootLogger(
  settings: Pick<RuntimeSettings, "logLevel" | "logFormat">,
): Logger {
  const options = {
    level: settings.logLevel,
    base: { service: "byom" },
    timestamp: pino.stdTimeFunctions.isoTime,
    // Code logs `err: errorFields(error)` (type, message, code, cause):
    // pino's own serializer would turn that plain object into
    // {"type":"Object",...}; an Error logged directly gets the same fields.
    serializers: {
      err: (value: unknown) =>
        value instanceof Error ? errorFields(value) : value,
    },
  };
  if (settings.logFormat === "pretty") {
    return pino({
      ...options,
      transport: {
        target: "pino-pretty",
        // Colours only for a terminal, not for a file or a pipe.
        options: { destination: 2, colorize: process.stderr.isTTY === true },
      },
    });
  }
  return pino(options, pino.destination({ fd: 2, sync: true }));
}

export function natsOptionsFrom(
  settings: RuntimeSettings,
  name: string,
  logger?: Logger,
): NatsConnectOptions {
  return {
    servers: settings.natsUrl,
    name,
    ...(settings.natsUser
      ? { user: settings.natsUser, password: settings.natsPassword }
      : {}),
    ...(settings.natsToken ? { token: settings.natsToken } : {}),
    ...(settings.natsCredsFile ? { credsFile: settings.natsCredsFile } : {}),
    ...(settings.natsNkeySeedFile
      ? { nkeySeedFile: settings.natsNkeySeedFile }
      : {}),
    tls: {
      ...(settings.natsTlsCa ? { caFile: settings.natsTlsCa } : {}),
      ...(settings.natsTlsCert ? { certFile: settings.natsTlsCert } : {}),
      ...(settings.natsTlsKey ? { keyFile: settings.natsTlsKey } : {}),
    },
    ...(logger ? { logger } : {}),
  };
}

/**
 * Resolves when SIGINT or SIGTERM arrives. A second signal ends the
 * process at once.
 */
export function untilSignal(logger: Logger): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    let received = false;
    const onSignal = (signal: NodeJS.Signals): void => {
      if (received) {
        logger.warn({ signal }, "second signal: exiting now");
        process.exit(130);
      }
      received = true;
      logger.info({ signal }, "shutting down (send again to exit at once)");
      resolve(signal);
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
  });
}

/** Prints a failure as text or JSON and ends with its exit code. */
export function failWith(error: unknown, json: boolean): never {
  const failure: ByomError = toByomError(error);
  if (json) {
    console.log(
      JSON.stringify({
        ok: false,
        error: {
          code: failure.code,
          message: failure.message,
          retryable: failure.retryable,
        },
      }),
    );
  } else {
    console.error(
      `byom: ${failure.code}: ${failure.message}${failure.retryable ? " (retryable)" : ""}`,
    );
  }
  throw new CliExit(exitCodeOf(failure.code));
}

/**
 * Loads the agent's SSH private key from the config; a failure is a
 * ConfigError naming SSH_PRIV_KEY_PATH.
 */
export async function loadAgentKey(
  config: Pick<ByomConfig, "sshPrivKeyPath" | "sshPrivKeyPassphrase">,
): Promise<LoadedPrivateKey> {
  try {
    return await loadPrivateKey(
      config.sshPrivKeyPath,
      config.sshPrivKeyPassphrase || undefined,
    );
  } catch (error) {
    // loadPrivateKey's errors keep key bytes out; anything else might not.
    if (error instanceof ByomError) {
      throw new ConfigError(
        `SSH_PRIV_KEY_PATH (sshPrivKeyPath): ${error.message}`,
        { cause: error },
      );
    }
    const kind = error instanceof Error ? error.name : typeof error;
    throw new ConfigError(
      `SSH_PRIV_KEY_PATH (sshPrivKeyPath): ssh private key ${config.sshPrivKeyPath} cannot be loaded: unexpected ${kind} (not shown, it may quote the key)`,
    );
  }
}

/**
 * The agent's sealing options from BYOM_SEALING_SEED_FILE and
 * BYOM_REQUIRE_SEALED. Logs the seed files and public keys, never a seed.
 */
export async function loadAgentSealing(
  config: ByomConfig,
  logger?: Logger,
): Promise<{
  options: Pick<AgentOptions, "unseal" | "requireSealed">;
  /** Public keys of the seeds; empty when sealing is off. */
  publicKeys: string[];
}> {
  if (config.sealingSeedFile === "") {
    if (config.sealedRequired) {
      throw new ConfigError(
        "BYOM_REQUIRE_SEALED=true (requireSealed) needs BYOM_SEALING_SEED_FILE (sealingSeedFile): without a seed the agent could open no user-data",
      );
    }
    return { options: { requireSealed: false }, publicKeys: [] };
  }
  const seeds = await loadSealingSeeds(config.sealingSeedFile);
  const publicKeys = seeds.map((seed) => sealingPublicKeyOf(seed));
  logger?.info(
    {
      seedFiles: config.sealingSeedFile,
      publicKeys,
      requireSealed: config.sealedRequired,
    },
    "sealed user-data enabled",
  );
  return {
    options: {
      unseal: createUnsealer(seeds),
      requireSealed: config.sealedRequired,
    },
    publicKeys,
  };
}
