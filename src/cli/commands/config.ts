import type { Command } from "commander";

import { loadAgentKey, loadAgentSealing } from "../runtime.js";

import {
  ConfigFileEnv,
  describeConfigSchema,
  loadConfig,
  redactConfig,
  requirePool,
  type ByomConfig,
} from "../../config/index.js";
import { ConfigError } from "../../errors/index.js";
import { readAllowlistDir } from "../../hostkeys/index.js";

/** Pools longer than this are shortened in the human output. */
const fullPoolLimit = 20;
/** Addresses shown at each end of a shortened pool. */
const poolEdge = 5;

interface CheckOptions {
  config?: string;
  json?: boolean;
  requirePool?: boolean;
}

/**
 * Adds `byom config check`: loads the configuration from the environment
 * and an optional file, and prints it with secrets hidden, the expanded
 * pool, the node name and pool warnings. Never connects to NATS. An invalid
 * value throws the ConfigError, which the CLI prints and exits 2 for.
 */
export function registerConfigCommands(program: Command): void {
  const config = program
    .command("config")
    .description("inspect the configuration");

  config
    .command("check")
    .description(
      "validate the configuration (environment and file) and print the effective values, secrets hidden",
    )
    .option(
      "--config <file>",
      "config file, JSON or YAML (default: $BYOM_CONFIG)",
    )
    .option("--json", "print JSON instead of a table")
    .option("--require-pool", "fail when VM_POOL_IPS is empty")
    .option(
      "--agent",
      "also check what the agent needs: a pool, a readable SSH private key, the sealing seeds and a usable host-key allowlist",
    )
    .action(async (options: CheckOptions & { agent?: boolean }) => {
      const loaded = loadConfig(
        options.config === undefined ? {} : { file: options.config },
      );
      if (options.requirePool === true || options.agent === true) {
        requirePool(loaded);
      }
      const notes: string[] = [];
      let agent: AgentReport | undefined;
      if (options.agent === true) {
        const key = await loadAgentKey(loaded);
        const sealing = await loadAgentSealing(loaded);
        const allowlist = await checkAllowlist(loaded);
        notes.push(...allowlist.warnings);
        agent = {
          sshKey: {
            path: loaded.sshPrivKeyPath,
            type: key.type,
            fingerprint: key.publicFingerprint,
          },
          sealingPublicKeys: sealing.publicKeys,
          hostKeys:
            allowlist.keys === undefined
              ? "trust on first use (SSH_HOST_KEY_ALLOWLIST_DIR not set)"
              : `allowlist: ${allowlist.keys} keys in ${loaded.sshHostKeyAllowlistDir}`,
        };
      }

      const file = options.config ?? configFileFromEnv();
      if (options.json === true) {
        console.log(
          JSON.stringify(
            {
              ...checkReport(loaded, file),
              ...(agent ? { agent, agentWarnings: notes } : {}),
            },
            null,
            2,
          ),
        );
      } else {
        console.log(formatTable(loaded, file));
        if (agent !== undefined) {
          console.log(formatAgent(agent));
        }
        for (const note of notes) {
          console.log(`agent warning: ${note}`);
        }
      }
    });
}

/**
 * Reads the allowlist directory as the agent would. No usable key stops
 * the check (the agent would refuse every VM); skipped lines and mount
 * warnings are returned, `byom allowlist check` lists them in full.
 */
async function checkAllowlist(
  config: ByomConfig,
): Promise<{ keys?: number; warnings: string[] }> {
  const dir = config.sshHostKeyAllowlistDir;
  if (dir === "") {
    return { warnings: [] };
  }
  const read = await readAllowlistDir(dir);
  if (read.keys.length === 0 || read.problems.length > 0) {
    throw new ConfigError(
      `SSH_HOST_KEY_ALLOWLIST_DIR (sshHostKeyAllowlistDir) "${dir}": ${read.problems.join("; ") || "no trusted keys"}; the agent would refuse every VM (byom allowlist check ${dir} shows the details)`,
    );
  }
  return {
    keys: read.keys.length,
    warnings: [
      ...(read.skipped.length > 0
        ? [
            `SSH_HOST_KEY_ALLOWLIST_DIR "${dir}": ${read.skipped.length} line(s) skipped (byom allowlist check ${dir} shows them)`,
          ]
        : []),
      ...read.warnings,
    ],
  };
}

/** What `config check --agent` found, for people and for `--json`. */
interface AgentReport {
  sshKey: { path: string; type: string; fingerprint: string };
  /** Public keys of the sealing seeds (empty: sealing off). */
  sealingPublicKeys: string[];
  hostKeys: string;
}

function formatAgent(agent: AgentReport): string {
  return [
    "agent checks passed:",
    `  ssh key: ${agent.sshKey.path} (${agent.sshKey.type} ${agent.sshKey.fingerprint})`,
    `  sealed user-data: ${agent.sealingPublicKeys.length === 0 ? "off" : agent.sealingPublicKeys.join(", ")}`,
    `  host keys: ${agent.hostKeys}`,
  ].join("\n");
}

function configFileFromEnv(): string | undefined {
  const file = process.env[ConfigFileEnv]?.trim() ?? "";
  return file === "" ? undefined : file;
}

function checkReport(
  config: ByomConfig,
  file: string | undefined,
): Record<string, unknown> {
  return {
    ok: true,
    file: file ?? null,
    poolSize: config.pool.length,
    config: redactConfig(config),
  };
}

function formatTable(config: ByomConfig, file: string | undefined): string {
  const shown = redactConfig(config);
  const rows = describeConfigSchema().map((row) => [
    row.key,
    row.env,
    JSON.stringify(shown[row.key]),
  ]);
  const keyWidth = Math.max(...rows.map((row) => row[0]?.length ?? 0));
  const envWidth = Math.max(...rows.map((row) => row[1]?.length ?? 0));
  const lines = rows.map(
    ([key = "", env = "", value = ""]) =>
      `  ${key.padEnd(keyWidth)}  ${env.padEnd(envWidth)}  ${value}`,
  );

  return [
    `config file: ${file ?? "none"}`,
    "configuration (secrets hidden):",
    ...lines,
    "",
    `node: ${config.node}`,
    ...formatPool(config.pool),
    ...formatWarnings(config.poolWarnings),
  ].join("\n");
}

function formatPool(pool: readonly string[]): string[] {
  if (pool.length === 0) {
    return ["pool: empty (the agent needs at least one VM IP)"];
  }
  const heading = `pool: ${pool.length} IP${pool.length === 1 ? "" : "s"}`;
  if (pool.length <= fullPoolLimit) {
    return [heading, ...pool.map((ip) => `  ${ip}`)];
  }
  const hidden = pool.length - 2 * poolEdge;
  return [
    heading,
    ...pool.slice(0, poolEdge).map((ip) => `  ${ip}`),
    `  ... ${hidden} more ...`,
    ...pool.slice(-poolEdge).map((ip) => `  ${ip}`),
  ];
}

function formatWarnings(warnings: readonly string[]): string[] {
  if (warnings.length === 0) {
    return [];
  }
  return ["warnings:", ...warnings.map((warning) => `  - ${warning}`)];
}
