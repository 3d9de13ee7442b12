import { connect, type NatsConnection } from "@nats-io/transport-node";

import {
  createAgent,
  type Agent,
  type AgentOptions,
} from "../../src/agent/index.js";
import {
  createPublisher,
  type Publisher,
  type PublisherOptions,
} from "../../src/publisher/index.js";
import { resourceNames, type ResourceNames } from "../../src/protocol/index.js";
import {
  startNatsServer,
  type NatsServer,
  type StartNatsServerOptions,
} from "./nats.js";
import { startSandbox, type TestSandbox } from "./sandbox.js";

/** A whole byom-nats on one machine: NATS, sandbox VMs, an agent, a publisher. */
export interface TestStack {
  server: NatsServer;
  vms: TestSandbox;
  names: ResourceNames;
  /** Sandbox IPs, which are the pool. */
  pool: string[];
  agentConnection: NatsConnection;
  clientConnection: NatsConnection;
  agent: Agent;
  publisher: Publisher;
  /** Closes everything in reverse order, even when a step fails. */
  close(): Promise<void>;
}

export interface StartStackOptions {
  vms: number;
  /** First sandbox address; give each test file its own 127.x range. */
  firstIp: string;
  /** Prefix of stream, bucket and subject names, unique per test file. */
  prefix: string;
  /** Agent settings over the test defaults. */
  agent?: Partial<Omit<AgentOptions, "nc" | "names" | "pool">>;
  /** Publisher settings over the test defaults (a logger, a sealing key). */
  publisher?: Partial<Omit<PublisherOptions, "nc" | "names">>;
  /** nats-server options, e.g. `args: ["-c", file]`. */
  nats?: StartNatsServerOptions;
}

/**
 * Starts the stack with test defaults: short timeouts, no quarantine
 * prober unless asked for, a publisher waiting 20 s.
 */
export async function startStack(
  options: StartStackOptions,
): Promise<TestStack> {
  const cleanups: Array<() => Promise<unknown>> = [];
  const close = async (): Promise<void> => {
    const errors: unknown[] = [];
    for (const cleanup of cleanups.reverse()) {
      await cleanup().catch((error: unknown) => errors.push(error));
    }
    cleanups.length = 0;
    if (errors.length > 0) {
      throw new AggregateError(errors, "stack cleanup failed");
    }
  };

  try {
    const server = await startNatsServer(options.nats);
    cleanups.push(() => server.stop());
    const vms = await startSandbox({
      vms: options.vms,
      firstIp: options.firstIp,
    });
    cleanups.push(() => vms.stop());
    const pool = vms.sandbox.status().map((vm) => vm.ip);
    const names = resourceNames({
      subjectPrefix: `${options.prefix}.v1.requests`,
      stream: `${options.prefix.toUpperCase()}_REQUESTS`,
      consumer: `${options.prefix}-agents`,
      leaseBucket: `${options.prefix}-leases`,
      resultBucket: `${options.prefix}-results`,
    });

    const agentConnection = await connect({ servers: server.url });
    cleanups.push(() => agentConnection.close());
    const clientConnection = await connect({ servers: server.url });
    cleanups.push(() => clientConnection.close());

    const agent = await createAgent({
      nc: agentConnection,
      names,
      pool,
      agentId: "node-a",
      ssh: {
        username: "peerpod",
        privateKey: Buffer.from(vms.privateKey),
        port: 22,
        connectTimeoutMs: 5000,
      },
      releaseTimeoutMs: 20_000,
      quarantineProbeIntervalMs: 0,
      ...options.agent,
    });
    cleanups.push(() => agent.close());
    const publisher = createPublisher({
      nc: clientConnection,
      names,
      requestingNode: "node-a",
      requestTimeoutMs: 20_000,
      ...options.publisher,
    });
    cleanups.push(() => publisher.close());

    return {
      server,
      vms,
      names,
      pool,
      agentConnection,
      clientConnection,
      agent,
      publisher,
      close,
    };
  } catch (error) {
    await close().catch(() => undefined);
    throw error;
  }
}
