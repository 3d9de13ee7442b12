import type { NatsConnection } from "@nats-io/transport-node";
import {
  Counter,
  Gauge,
  Histogram,
  Registry,
  collectDefaultMetrics,
} from "prom-client";

import type { Agent, AgentEventMap } from "../agent/index.js";
import { ErrorCode } from "../errors/index.js";
import { errorFields, silentLogger, type Logger } from "../logging/index.js";
import { LeaseState } from "../protocol/index.js";

/** Every metric name starts with this. */
export const metricPrefix = "byom_";

/** The timed phases of a request, each a histogram in seconds. */
export const Phase = {
  Lease: "lease",
  Probe: "probe",
  SshConnect: "sshConnect",
  Upload: "upload",
} as const;
export type Phase = (typeof Phase)[keyof typeof Phase];

/** Phase durations in milliseconds, as an event may carry them. */
export type PhaseTimingsMs = Partial<Record<Phase, number>>;

/** Result label of a successful request; failures use their error code. */
export const okCode = "OK";

export interface CreateMetricsOptions {
  /** Also export Node's process metrics (`byom_process_*`, ...); default true. */
  processMetrics?: boolean;
  logger?: Logger;
}

/** What {@link Metrics.attachNats} returns. */
export interface NatsWatch {
  /** True while the client holds a connection to a server. */
  connected(): boolean;
  /** Stops watching; idempotent. */
  close(): void;
}

/**
 * The agent's Prometheus metrics in a registry of their own. Feed them by
 * attaching an agent and a NATS connection, or through the record methods.
 */
export interface Metrics {
  readonly registry: Registry;
  /**
   * Subscribes to the agent's events and reads its pool and status at each
   * scrape. Returns a function that detaches.
   */
  attachAgent(agent: Agent): () => void;
  /** Follows the connection's status into `byom_nats_connected`. */
  attachNats(nc: NatsConnection): NatsWatch;
  /** Records one phase duration in milliseconds. */
  observePhase(phase: Phase, durationMs: number): void;
  /** Records an allowlist (re)load: its result and the keys now in force. */
  recordAllowlistReload(reload: { ok: boolean; keys: number }): void;
  /** The exposition text (Prometheus text format 0.0.4). */
  render(): Promise<string>;
  readonly contentType: string;
  /** Detaches everything attached; idempotent. */
  close(): void;
  [Symbol.dispose](): void;
}

const secondsBuckets = {
  short: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
  long: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
};

const phaseMetric: Record<Phase, { name: string; help: string }> = {
  lease: {
    name: "lease_duration_seconds",
    help: "Time to lease an IP in the KV bucket (compare-and-swap included)",
  },
  probe: {
    name: "probe_duration_seconds",
    help: "Time of the readiness probe of a VM at claim time",
  },
  sshConnect: {
    name: "ssh_connect_duration_seconds",
    help: "Time to connect, handshake and authenticate over SSH",
  },
  upload: {
    name: "upload_duration_seconds",
    help: "Time to write user-data over SFTP (temp file, fsync, rename, stat)",
  },
};

/** Creates the metrics; nothing is attached yet. */
export function createMetrics(options: CreateMetricsOptions = {}): Metrics {
  return new MetricsImpl(options);
}

class MetricsImpl implements Metrics {
  readonly registry = new Registry();
  readonly #logger: Logger;
  readonly #detachers = new Set<() => void>();
  readonly #requests: Counter<"operation" | "code">;
  readonly #endToEnd: Histogram<"operation" | "code">;
  readonly #phases: Record<Phase, Histogram>;
  readonly #leaseEvents: Counter<"event">;
  readonly #deliveries: Counter<"result">;
  readonly #hostKeyRejections: Counter;
  readonly #allowlistKeys: Gauge;
  readonly #allowlistReloads: Counter<"result">;
  readonly #natsConnected: Gauge;
  readonly #natsEvents: Counter<"type">;
  readonly #pool: Gauge<"state">;
  readonly #consumerBound: Gauge;
  readonly #inFlight: Gauge;
  readonly #hostKeyPolicyOk: Gauge<"mode">;
  #agent: Agent | undefined;

  constructor(options: CreateMetricsOptions) {
    this.#logger = (options.logger ?? silentLogger()).child({
      component: "metrics",
    });
    const registers = [this.registry];
    const name = (suffix: string): string => `${metricPrefix}${suffix}`;

    this.#requests = new Counter({
      name: name("requests_total"),
      help: "Requests served, by operation (create, delete) and result code (OK or the error code)",
      labelNames: ["operation", "code"],
      registers,
    });
    this.#endToEnd = new Histogram({
      name: name("request_duration_seconds"),
      help: "End-to-end time of a request in the agent, from pull to published result",
      labelNames: ["operation", "code"],
      buckets: secondsBuckets.long,
      registers,
    });
    this.#phases = Object.fromEntries(
      Object.entries(phaseMetric).map(([phase, metric]) => [
        phase,
        new Histogram({
          name: name(metric.name),
          help: metric.help,
          buckets: secondsBuckets.short,
          registers,
        }),
      ]),
    ) as Record<Phase, Histogram>;
    this.#leaseEvents = new Counter({
      name: name("lease_transitions_total"),
      help: "Lease transitions seen by this agent: acquired, quarantined, released, unquarantined",
      labelNames: ["event"],
      registers,
    });
    this.#deliveries = new Counter({
      name: name("deliveries_total"),
      help: "User-data deliveries by result (ok, or the error code)",
      labelNames: ["result"],
      registers,
    });
    this.#hostKeyRejections = new Counter({
      name: name("host_key_rejections_total"),
      help: "Connections refused because the VM's host key was not acceptable",
      registers,
    });
    this.#allowlistKeys = new Gauge({
      name: name("allowlist_keys"),
      help: "Host keys in the allowlist in force (0 in TOFU mode or when none is usable)",
      registers,
    });
    this.#allowlistReloads = new Counter({
      name: name("allowlist_reloads_total"),
      help: "Allowlist reloads by result (ok, error: the last good set stays)",
      labelNames: ["result"],
      registers,
    });
    this.#natsConnected = new Gauge({
      name: name("nats_connected"),
      help: "1 while the agent holds a connection to a NATS server, else 0",
      registers,
    });
    this.#natsEvents = new Counter({
      name: name("nats_connection_events_total"),
      help: "NATS client status events: disconnect, reconnect, error, close, ...",
      labelNames: ["type"],
      registers,
    });
    this.#pool = new Gauge({
      name: name("pool_leases"),
      help: "Pool IPs by lease state (free, claimed, ready, releasing, quarantined)",
      labelNames: ["state"],
      registers,
      collect: () => this.#collectPool(),
    });
    this.#consumerBound = new Gauge({
      name: name("consumer_bound"),
      help: "1 while the agent pulls from the shared durable consumer",
      registers,
      collect: () => {
        this.#consumerBound.set(this.#agent?.status().consumerBound ? 1 : 0);
      },
    });
    this.#inFlight = new Gauge({
      name: name("requests_in_flight"),
      help: "Requests this agent is serving now",
      registers,
      collect: () => {
        this.#inFlight.set(this.#agent?.status().inFlight ?? 0);
      },
    });
    this.#hostKeyPolicyOk = new Gauge({
      name: name("host_key_policy_ok"),
      help: "1 when the host-key policy can accept a VM (an allowlist with keys, or TOFU)",
      labelNames: ["mode"],
      registers,
      collect: () => {
        const policy = this.#agent?.status().hostKeyPolicy;
        this.#hostKeyPolicyOk.reset();
        if (policy !== undefined) {
          this.#hostKeyPolicyOk.set({ mode: policy.mode }, policy.ok ? 1 : 0);
        }
      },
    });

    for (const state of Object.values(LeaseState)) {
      this.#pool.set({ state }, 0);
    }
    if (options.processMetrics ?? true) {
      collectDefaultMetrics({ register: this.registry, prefix: metricPrefix });
    }
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  attachAgent(agent: Agent): () => void {
    this.#agent = agent;
    const unsubscribe = [
      agent.events.on("request:done", (event) => this.#onRequestDone(event)),
      agent.events.on("lease:acquired", () =>
        this.#leaseEvents.inc({ event: "acquired" }),
      ),
      agent.events.on("lease:quarantined", () =>
        this.#leaseEvents.inc({ event: "quarantined" }),
      ),
      agent.events.on("lease:released", () =>
        this.#leaseEvents.inc({ event: "released" }),
      ),
      agent.events.on("lease:unquarantined", () =>
        this.#leaseEvents.inc({ event: "unquarantined" }),
      ),
      agent.events.on("delivery:done", (event) => {
        this.#deliveries.inc({ result: "ok" });
        this.#observeTimings(event);
      }),
      agent.events.on("delivery:failed", (event) => {
        this.#deliveries.inc({ result: event.error.code });
        if (event.error.code === ErrorCode.HostKeyRejected) {
          this.#hostKeyRejections.inc();
        }
      }),
    ];
    const detach = (): void => {
      unsubscribe.forEach((off) => off());
      if (this.#agent === agent) {
        this.#agent = undefined;
      }
      this.#detachers.delete(detach);
    };
    this.#detachers.add(detach);
    return detach;
  }

  attachNats(nc: NatsConnection): NatsWatch {
    let connected = !nc.isClosed();
    let watching = true;
    const set = (value: boolean): void => {
      connected = value;
      if (watching) {
        this.#natsConnected.set(value ? 1 : 0);
      }
    };
    set(connected);

    const statuses = nc.status();
    void (async () => {
      for await (const status of statuses) {
        if (!watching) {
          break;
        }
        this.#natsEvents.inc({ type: status.type });
        if (status.type === "disconnect" || status.type === "close") {
          set(false);
        } else if (status.type === "reconnect") {
          set(true);
        }
      }
    })().catch((error: unknown) =>
      this.#logger.warn({ err: errorFields(error) }, "NATS status watch ended"),
    );
    void nc.closed().then(() => set(false));

    const close = (): void => {
      watching = false;
      this.#detachers.delete(close);
    };
    this.#detachers.add(close);
    return { connected: () => connected && !nc.isClosed(), close };
  }

  observePhase(phase: Phase, durationMs: number): void {
    if (Number.isFinite(durationMs) && durationMs >= 0) {
      this.#phases[phase].observe(durationMs / 1000);
    }
  }

  recordAllowlistReload(reload: { ok: boolean; keys: number }): void {
    this.#allowlistReloads.inc({ result: reload.ok ? "ok" : "error" });
    this.#allowlistKeys.set(reload.keys);
  }

  render(): Promise<string> {
    return this.registry.metrics();
  }

  close(): void {
    for (const detach of [...this.#detachers]) {
      detach();
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #onRequestDone(event: AgentEventMap["request:done"]): void {
    const { result } = event;
    const labels = {
      operation: result.kind ?? "unknown",
      code: result.ok ? okCode : result.error.code,
    };
    this.#requests.inc(labels);
    this.#endToEnd.observe(labels, event.durationMs / 1000);
    this.#observeTimings(event);
  }

  /** Reads phase timings from an event that carries them (`timingsMs`). */
  #observeTimings(event: object): void {
    if (!("timingsMs" in event)) {
      return;
    }
    const timings = event.timingsMs as PhaseTimingsMs | undefined;
    for (const phase of Object.values(Phase)) {
      const value = timings?.[phase];
      if (typeof value === "number") {
        this.observePhase(phase, value);
      }
    }
  }

  async #collectPool(): Promise<void> {
    const agent = this.#agent;
    if (agent === undefined) {
      return;
    }
    try {
      const counts = await agent.leases.counts();
      for (const state of Object.values(LeaseState)) {
        this.#pool.set({ state }, counts[state] ?? 0);
      }
    } catch (error) {
      // Keep the last values: a scrape must not fail because KV is slow.
      this.#logger.debug({ err: errorFields(error) }, "pool counts failed");
    }
  }
}
