import type { Command } from "commander";

import { createAgent, type Agent } from "../../agent/index.js";
import {
  loadConfig,
  requirePool,
  type ByomConfig,
} from "../../config/index.js";
import { ConfigError } from "../../errors/index.js";
import {
  createHostKeyPolicy,
  type HostKeyPolicy,
} from "../../hostkeys/index.js";
import type { Logger } from "../../logging/index.js";
import {
  createMetrics,
  startHealthServer,
  type HealthServer,
} from "../../observability/index.js";
import { connectNats } from "../../transport/index.js";
import {
  createRootLogger,
  loadAgentKey,
  loadAgentSealing,
  natsOptionsFrom,
  untilSignal,
} from "../runtime.js";

/** `byom agent`: serve create/delete requests until SIGTERM. */
export function registerAgentCommand(program: Command): void {
  program
    .command("agent")
    .description(
      "serve create/delete requests: lease VMs from VM_POOL_IPS and deliver user-data over SFTP",
    )
    .option(
      "-c, --config <file>",
      "config file (JSON or YAML); env wins over it",
    )
    .action(async (options: { config?: string }) => {
      const config = loadConfig(options.config ? { file: options.config } : {});
      const logger = createRootLogger(config);
      await runAgent(config, logger);
    });
}

/** Runs an agent from a loaded config until a signal arrives. */
export async function runAgent(
  config: ByomConfig,
  logger: Logger,
): Promise<void> {
  const pool = requirePool(config);
  for (const warning of config.poolWarnings) {
    logger.warn({ warning }, "VM_POOL_IPS");
  }
  const key = await loadAgentKey(config);
  logger.info(
    {
      keyType: key.type,
      fingerprint: key.publicFingerprint,
      path: config.sshPrivKeyPath,
    },
    "loaded SSH private key",
  );

  const nc = await connectNats(
    natsOptionsFrom(config, `byom-agent-${config.node}`, logger),
  );
  const metrics = createMetrics({ logger });
  const natsWatch = metrics.attachNats(nc);
  let agent: Agent | undefined;
  let http: HealthServer | undefined;
  let policy: HostKeyPolicy | undefined;
  try {
    // Listen first: liveness answers during start-up, readiness says why not.
    if (config.httpPort > 0) {
      http = await startHealthServer({
        port: config.httpPort,
        metrics,
        logger,
        checks: () => {
          const status = agent?.status();
          return {
            nats: natsWatch.connected(),
            consumer: status?.consumerBound ?? false,
            allowlist: status?.hostKeyPolicy ?? {
              ok: false,
              reason: "agent not started",
            },
          };
        },
      }).catch((error: unknown) => {
        const code = (error as NodeJS.ErrnoException).code ?? String(error);
        throw new ConfigError(
          `BYOM_HTTP_PORT=${config.httpPort}: cannot listen for metrics and health (${code}); choose a free port, or 0 to turn the HTTP server off`,
          { cause: error },
        );
      });
    }
    policy = await createHostKeyPolicy({
      allowlistDir: config.sshHostKeyAllowlistDir,
      reloadIntervalMs: config.allowlistReloadIntervalMs,
      logger: logger.child({ component: "hostkeys" }),
      // The first read happens before the agent exists to report it.
      onReload: (reload) => metrics.recordAllowlistReload(reload),
    });
    agent = await createAgent({
      policy,
      nc,
      names: config.names,
      pool,
      agentId: config.node,
      ssh: {
        username: config.sshUsername,
        privateKey: key.key,
        ...(config.sshPrivKeyPassphrase
          ? { passphrase: config.sshPrivKeyPassphrase }
          : {}),
        port: config.sshPort,
        connectTimeoutMs: config.sshTimeoutSeconds * 1000,
      },
      queue: {
        ackWaitMs: config.ackWaitMs,
        maxDeliver: config.maxDeliver,
        requestMaxAgeMs: config.requestMaxAgeMs,
        replicas: config.replicas,
      },
      concurrency: config.concurrency,
      releaseTimeoutMs: config.releaseTimeoutMs,
      shutdownTimeoutMs: config.shutdownTimeoutMs,
      quarantineProbeIntervalMs: config.quarantineProbeIntervalMs,
      ...(await loadAgentSealing(config, logger)).options,
      logger,
    });
    metrics.attachAgent(agent);
    await untilSignal(logger);
    await agent.close();
  } finally {
    // The agent closes the policy; this covers a failed start.
    await policy?.close();
    await http?.close();
    metrics.close();
    await nc.drain().catch(() => nc.close());
  }
}
