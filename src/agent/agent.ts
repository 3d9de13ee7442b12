import { setTimeout as delay } from "node:timers/promises";

import { jetstream, type Consumer, type JsMsg } from "@nats-io/jetstream";
import type { KV } from "@nats-io/kv";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";

import { createDelivery, type Delivery } from "../delivery/index.js";
import {
  ByomError,
  ErrorCode,
  ExpiredError,
  InvalidRequestError,
  UnavailableError,
  toByomError,
} from "../errors/index.js";
import { createTofuPolicy, type HostKeyPolicy } from "../hostkeys/index.js";
import {
  createLeaseStore,
  isLostRace,
  type LeaseStore,
} from "../lease/index.js";
import { errorFields, silentLogger, type Logger } from "../logging/index.js";
import {
  Header,
  LeaseState,
  RequestKind,
  canonicalIp,
  decodeRequest,
  decodeResult,
  requestDigest,
  requestIdHint,
  type FailureResult,
  type Request,
  type ResourceNames,
  type Result,
  type SealedUserData,
} from "../protocol/index.js";
import {
  defaultQueueSettings,
  ensureQueue,
  openResultBucket,
  type QueueSettings,
} from "../transport/index.js";
import { handleCreate } from "./create.js";
import { handBackDelayMs, retryFor } from "./retry.js";
import { handleDelete, type Outcome } from "./delete.js";
import type { AgentContext } from "./context.js";
import { SafeEmitter, type AgentEvents } from "./events.js";
import { startQuarantineProber, type Prober } from "./prober.js";
import { takeOutOfService, watchAbandonedRequests } from "./abandoned.js";

/** Tries to get an ack confirmed before relying on redelivery. */
const ackAttempts = 4;
/**
 * How long a step only NATS trouble can fail (a finished request's answer,
 * freeing a reset VM's lease) is retried before handing the request back.
 */
const natsRetryMs = 20_000;

/** Plain options of an agent; the CLI builds them from the config. */
export interface AgentOptions {
  /** A connected NATS client; the agent does not close it. */
  nc: NatsConnection;
  names: ResourceNames;
  /** Canonical pool IPs in pool order. */
  pool: readonly string[];
  /** This agent's identity (the node name), recorded in leases and results. */
  agentId: string;
  ssh: {
    username: string;
    privateKey: Buffer;
    passphrase?: string;
    port: number;
    /** Per attempt: connect, handshake and auth. */
    connectTimeoutMs: number;
  };
  /** Host-key policy; default TOFU. The agent closes it on close(). */
  policy?: HostKeyPolicy;
  queue?: Partial<QueueSettings>;
  /** Requests served at once by this agent; default 4. */
  concurrency?: number;
  /** Wait for a VM to reset after the reboot trigger; default 300 000 ms. */
  releaseTimeoutMs?: number;
  /** Period of the quarantine prober; default 30 000 ms; 0 = off. */
  quarantineProbeIntervalMs?: number;
  /** Readiness probe budget per VM at claim time; default 3000 ms. */
  readinessTimeoutMs?: number;
  /**
   * close() lets in-flight requests finish this long, then aborts them and
   * hands them back to the stream; default 15 000 ms.
   */
  shutdownTimeoutMs?: number;
  /** Opens sealed user-data (`userDataSealed`); without it such a create fails INVALID_REQUEST. */
  unseal?: (sealed: SealedUserData) => string;
  /** Refuse user-data in clear (`userData`) with INVALID_REQUEST; default false. */
  requireSealed?: boolean;
  logger?: Logger;
}

/** A running agent. */
export interface Agent {
  readonly events: AgentEvents;
  /** The lease store the agent uses (read it for status). */
  readonly leases: LeaseStore;
  status(): AgentStatus;
  /** Stops pulling, hands back unfinished work, closes; safe to call twice. */
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

export interface AgentStatus {
  agentId: string;
  running: boolean;
  consumerBound: boolean;
  inFlight: number;
  releasesWaiting: number;
  served: number;
  hostKeyPolicy: { mode: string; ok: boolean; reason?: string };
}

/**
 * Starts an agent: makes sure the stream, consumer and buckets exist,
 * reconciles the pool, and serves requests until closed.
 */
export async function createAgent(options: AgentOptions): Promise<Agent> {
  const agent = new AgentImpl(options);
  try {
    await agent.start();
  } catch (error) {
    await agent.close();
    throw error;
  }
  return agent;
}

class AgentImpl implements Agent {
  readonly events: SafeEmitter;
  readonly leases: LeaseStore;
  readonly #options: AgentOptions;
  readonly #logger: Logger;
  readonly #policy: HostKeyPolicy;
  readonly #delivery: Delivery;
  readonly #settings: QueueSettings;
  readonly #background = new Set<Promise<void>>();
  readonly #workers: Promise<void>[] = [];
  #results: KV | undefined;
  #consumer: Consumer | undefined;
  #prober: Prober | undefined;
  #abandoned: Subscription | undefined;
  #stopReloadEvents: (() => void) | undefined;
  /** Set when close() gave up waiting and aborted in-flight work. */
  #aborted = false;
  #running = false;
  #closing: Promise<void> | undefined;
  #inFlight = 0;
  #served = 0;

  constructor(options: AgentOptions) {
    this.#options = options;
    // Each part binds its own `component` once on this base.
    const base = (options.logger ?? silentLogger()).child({
      agent: options.agentId,
    });
    this.#logger = base.child({ component: "agent" });
    this.events = new SafeEmitter(this.#logger);
    this.#settings = { ...defaultQueueSettings, ...options.queue };
    this.#policy =
      options.policy ??
      createTofuPolicy({
        logger: base.child({ component: "hostkeys" }),
      });
    this.#stopReloadEvents = this.#policy.onReload?.((reload) =>
      this.events.emit("allowlist:reloaded", {
        ok: reload.ok,
        keys: reload.keys,
        added: reload.added,
        removed: reload.removed,
      }),
    );
    this.#delivery = createDelivery({
      username: options.ssh.username,
      privateKey: options.ssh.privateKey,
      ...(options.ssh.passphrase ? { passphrase: options.ssh.passphrase } : {}),
      port: options.ssh.port,
      connectTimeoutMs: options.ssh.connectTimeoutMs,
      policy: this.#policy,
      logger: base.child({ component: "delivery" }),
    });
    this.leases = createLeaseStore({
      nc: options.nc,
      bucket: options.names.leaseBucket,
      pool: options.pool,
      agent: options.agentId,
      replicas: this.#settings.replicas,
      logger: base,
    });
  }

  async start(): Promise<void> {
    const { nc, names } = this.#options;
    const jsm = await ensureQueue(nc, names, this.#settings, this.#logger);
    this.#results = await openResultBucket(nc, names, this.#settings);

    const report = await this.leases.start();
    this.#logger.info(
      {
        pool: this.#options.pool.length,
        created: report.created.length,
        orphans: report.orphans.map((lease) => lease.record.ip),
      },
      "pool reconciled",
    );
    for (const orphan of report.orphans) {
      this.#logger.warn(
        { ip: orphan.record.ip, state: orphan.record.state },
        "lease for an IP no longer in VM_POOL_IPS; left untouched",
      );
    }

    this.#consumer = await jetstream(nc).consumers.get(
      names.stream,
      names.consumer,
    );
    this.#abandoned = watchAbandonedRequests({
      nc,
      jsm,
      names,
      context: this.#context(),
      publish: async (result, replyTo) => {
        await this.#publish(result, replyTo);
      },
      answered: (requestId) => this.#answered(requestId),
    });
    this.#running = true;
    const concurrency = this.#options.concurrency ?? 4;
    for (let index = 0; index < concurrency; index += 1) {
      this.#workers.push(this.#work(this.#consumer));
    }

    const interval = this.#options.quarantineProbeIntervalMs ?? 30_000;
    if (interval > 0) {
      this.#prober = startQuarantineProber({
        context: this.#context(),
        intervalMs: interval,
      });
    }
    this.#logger.info({ concurrency }, "agent serving requests");
  }

  status(): AgentStatus {
    const readiness = this.#policy.readiness();
    return {
      agentId: this.#options.agentId,
      running: this.#running,
      consumerBound: this.#consumer !== undefined && this.#running,
      inFlight: this.#inFlight,
      releasesWaiting: this.#background.size,
      served: this.#served,
      hostKeyPolicy: {
        mode: this.#policy.mode,
        ok: readiness.ok,
        ...(readiness.reason ? { reason: readiness.reason } : {}),
      },
    };
  }

  #context(): AgentContext {
    return {
      agentId: this.#options.agentId,
      leases: this.leases,
      delivery: this.#delivery,
      emitter: this.events,
      logger: this.#logger,
      releaseTimeoutMs: this.#options.releaseTimeoutMs ?? 300_000,
      closing: () => !this.#running,
      readinessTimeoutMs: this.#options.readinessTimeoutMs ?? 3000,
      connectTimeoutMs: this.#options.ssh.connectTimeoutMs,
      ...(this.#options.unseal ? { unseal: this.#options.unseal } : {}),
      requireSealed: this.#options.requireSealed ?? false,
      answered: (requestId) => this.#answered(requestId),
      natsRetryMs,
    };
  }

  /**
   * True for an answered delete whose release is still its own to finish:
   * the lease is `releasing` for this request (its follow-up was handed
   * back, or its agent died before the VM reset).
   */
  async #releaseUnfinished(request: Request): Promise<boolean> {
    if (request.kind !== RequestKind.Delete) {
      return false;
    }
    const ip = canonicalIp(request.instanceId);
    const lease = ip === undefined ? undefined : await this.leases.get(ip);
    return (
      lease?.record.state === LeaseState.Releasing &&
      lease.record.releaseRequestId === request.requestId
    );
  }

  /** Whether the result bucket holds a result for `requestId`. */
  async #answered(requestId: string): Promise<boolean> {
    return (await this.#results?.get(requestId))?.operation === "PUT";
  }

  async #work(consumer: Consumer): Promise<void> {
    while (this.#running) {
      let message: JsMsg | null;
      try {
        message = await consumer.next({ expires: 2000 });
      } catch (error) {
        if (!this.#running) {
          return;
        }
        this.#logger.warn({ err: errorFields(error) }, "pull failed; retrying");
        await delay(500);
        continue;
      }
      if (message === null) {
        continue;
      }
      this.#inFlight += 1;
      try {
        await this.#handle(message);
      } finally {
        this.#inFlight -= 1;
      }
    }
  }

  async #handle(message: JsMsg): Promise<void> {
    const started = Date.now();
    const heartbeat = setInterval(
      () => message.working(),
      Math.max(1000, Math.floor(this.#settings.ackWaitMs / 3)),
    );
    const replyTo = message.headers?.get(Header.ReplyTo) ?? "";
    const requestId =
      message.headers?.get(Header.MsgId) ||
      requestIdHint(message.data) ||
      "unknown";
    const log = this.#logger.child({ requestId, subject: message.subject });
    let outcome: Outcome;
    const seen: { digest?: string } = {};

    try {
      outcome = await this.#process(message, requestId, log, seen);
    } catch (error) {
      if (this.#aborted || this.#shouldHandBack(error, message)) {
        // Shutting down, or NATS trouble with deliveries left: hand the
        // request back rather than fail it; its next delivery resumes it.
        clearInterval(heartbeat);
        log.warn(
          { err: errorFields(error) },
          "handing the request back for redelivery",
        );
        message.nak(
          this.#aborted ? 0 : handBackDelayMs(message.info.deliveryCount),
        );
        return;
      }
      outcome = {
        result: failure(requestId, toByomError(error), this.#options.agentId),
      };
    }
    if (
      seen.digest !== undefined &&
      outcome.result.requestDigest === undefined
    ) {
      outcome = {
        ...outcome,
        result: { ...outcome.result, requestDigest: seen.digest },
      };
    }

    let answered: boolean;
    try {
      // The work is done: keep trying to answer through a NATS outage (a
      // result bucket without a leader while a cluster elects one) rather
      // than hand the request back and do the work again.
      answered = await retryFor(() => this.#publish(outcome.result, replyTo), {
        forMs: natsRetryMs,
        stopped: () => this.#aborted,
        onRetry: (error, pauseMs) =>
          log.warn(
            { err: errorFields(error), pauseMs },
            "could not publish result; retrying",
          ),
      });
    } catch (error) {
      // Unanswered: let the server redeliver (the handlers are idempotent).
      clearInterval(heartbeat);
      log.warn(
        { err: errorFields(error) },
        "could not publish result; will be redelivered",
      );
      message.nak(handBackDelayMs(message.info.deliveryCount));
      return;
    }
    if (answered) {
      this.#served += 1;
      this.events.emit("request:done", {
        result: outcome.result,
        durationMs: Date.now() - started,
        ...(outcome.timingsMs ? { timingsMs: outcome.timingsMs } : {}),
      });
      logResult(log, outcome.result, Date.now() - started);
    } else {
      log.info(
        { deliveries: message.info.deliveryCount },
        "request was answered before; not answering again",
      );
    }

    if (outcome.after === undefined) {
      clearInterval(heartbeat);
      await this.#ack(message, log);
      return;
    }
    // The rest (waiting for the VM to reset) runs beside the workers; the
    // message stays in progress until it ends, so a crash hands it over.
    const task = outcome
      .after()
      .then(
        () => this.#ack(message, log),
        (error: unknown) => {
          if (!this.#running) {
            message.nak();
            return;
          }
          const failure = toByomError(error);
          if (failure.retryable) {
            // NATS trouble (the lease could not be freed or quarantined):
            // hand it back, or the lease would stay releasing for good.
            log.warn(
              { err: errorFields(error) },
              "release follow-up failed; handing the request back",
            );
            message.nak(handBackDelayMs(message.info.deliveryCount));
            return;
          }
          log.error({ err: errorFields(error) }, "release follow-up failed");
          return this.#ack(message, log);
        },
      )
      .finally(() => {
        clearInterval(heartbeat);
        this.#background.delete(task);
      });
    this.#background.add(task);
  }

  async #process(
    message: JsMsg,
    requestId: string,
    log: Logger,
    seen: { digest?: string },
  ): Promise<Outcome> {
    const kind = kindOf(message.subject, this.#options.names);
    this.events.emit("request:received", {
      requestId,
      kind: kind ?? "unknown",
    });

    let request: Request;
    try {
      if (kind === undefined) {
        throw new InvalidRequestError(
          `subject "${message.subject}" names no request kind`,
        );
      }
      request = decodeRequest(message.data, kind);
    } catch (error) {
      log.warn({ err: errorFields(error) }, "invalid request");
      throw error;
    }

    seen.digest = requestDigest(request);
    const earlier = await this.#earlierResult(request.requestId);
    if (
      earlier?.requestDigest !== undefined &&
      earlier.requestDigest !== seen.digest
    ) {
      // The id answered another request (reused after JetStream's
      // duplicate window): serving this one could not be answered, and a
      // delete would run unasked. Its publisher finds the other digest.
      log.warn(
        { answeredKind: earlier.kind },
        "request id was used before for another request; not serving it",
      );
      return { result: earlier };
    }
    if (earlier !== undefined && !(await this.#releaseUnfinished(request))) {
      // Served and answered, but the ack was lost (NATS trouble), or sent
      // again: serving a create again could lease a VM for a pod deleted
      // meanwhile, a delete could reboot the VM of the pod leased since.
      log.info(
        { deliveries: message.info.deliveryCount },
        "request was answered before; not serving it again",
      );
      return { result: earlier };
    }

    const context = { ...this.#context(), logger: log };
    if (Date.parse(request.deadline) < Date.now()) {
      const redelivered = message.info.deliveryCount > 1;
      // An agent died serving it: a delete is finished whatever its
      // deadline (the VM must not stay half released); the VM an expired
      // create may have touched leaves service until found clean.
      if (!(redelivered && request.kind === RequestKind.Delete)) {
        if (redelivered) {
          await takeOutOfService(context, request);
        }
        throw new ExpiredError(
          redelivered
            ? `request ${request.requestId} expired at ${request.deadline} while being served again after its agent stopped`
            : `request ${request.requestId} expired at ${request.deadline} before an agent started it`,
        );
      }
    }

    return request.kind === RequestKind.Create
      ? await handleCreate(context, request)
      : handleDelete(context, request);
  }

  /** The stored result of `requestId`, if it was answered. */
  async #earlierResult(requestId: string): Promise<Result | undefined> {
    let entry;
    try {
      entry = await this.#results?.get(requestId);
    } catch (error) {
      throw new UnavailableError(
        `read the result of ${requestId} failed: ${error instanceof Error ? error.message : String(error)}`,
        { cause: error },
      );
    }
    if (entry === undefined || entry === null || entry.operation !== "PUT") {
      return undefined;
    }
    return decodeResult(entry.value);
  }

  /**
   * Answers a request once: the result is created in the result bucket
   * (compare-and-swap on absence), and only the write that creates it is
   * sent to the reply subject. Resolves false when the request was
   * answered before (a redelivery after the ack was lost); the publisher
   * finds that earlier result in the bucket if its answer was lost too.
   */
  async #publish(result: Result, replyTo: string): Promise<boolean> {
    const data = new TextEncoder().encode(JSON.stringify(result));
    if (result.requestId !== "unknown" && this.#results !== undefined) {
      try {
        await this.#results.create(result.requestId, data);
      } catch (error) {
        if (isLostRace(error)) {
          return false;
        }
        throw error;
      }
    }
    if (replyTo !== "") {
      this.#options.nc.publish(replyTo, data);
    }
    return true;
  }

  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    this.#running = false;
    const steps: Array<[string, () => Promise<unknown>]> = [
      ["advisories", async () => this.#abandoned?.unsubscribe()],
      ["prober", async () => this.#prober?.close()],
      ["workers", () => this.#drainWorkers()],
      // Releases still waiting are handed back: the unacked messages are
      // redelivered to another agent, which resumes the wait.
      ["delivery", () => this.#delivery.close()],
      ["releases", () => Promise.allSettled([...this.#background])],
      ["leases", () => this.leases.close()],
      ["reload events", async () => this.#stopReloadEvents?.()],
      ["policy", () => this.#policy.close()],
    ];
    for (const [name, step] of steps) {
      try {
        await step();
      } catch (error) {
        this.#logger.warn(
          { err: errorFields(error), step: name },
          "close step failed",
        );
      }
    }
    this.#logger.info({ served: this.#served }, "agent closed");
  }

  /**
   * Acks and waits for the server to confirm, a few times: an ack lost to a
   * reconnect would redeliver a request already answered.
   */
  async #ack(message: JsMsg, log: Logger): Promise<void> {
    for (let attempt = 1; attempt <= ackAttempts; attempt += 1) {
      try {
        if (await message.ackAck({ timeout: 2000 })) {
          return;
        }
      } catch (error) {
        log.debug({ err: errorFields(error), attempt }, "ack not confirmed");
      }
      await delay(500 * attempt);
    }
    log.warn(
      "ack never confirmed; the request may be served again (idempotent)",
    );
  }

  /** UNAVAILABLE (NATS trouble) is retried by redelivery, but for the last one. */
  #shouldHandBack(error: unknown, message: JsMsg): boolean {
    return (
      error instanceof ByomError &&
      error.code === ErrorCode.Unavailable &&
      message.info.deliveryCount < this.#settings.maxDeliver
    );
  }

  /** Waits for in-flight requests, up to the shutdown bound; then aborts them. */
  async #drainWorkers(): Promise<void> {
    const boundMs = this.#options.shutdownTimeoutMs ?? 15_000;
    let timer: NodeJS.Timeout | undefined;
    const expired = new Promise<"expired">((resolve) => {
      timer = setTimeout(() => resolve("expired"), boundMs);
    });
    const finished = Promise.allSettled(this.#workers);
    const outcome = await Promise.race([finished, expired]);
    clearTimeout(timer);
    if (outcome === "expired") {
      this.#logger.warn(
        { inFlight: this.#inFlight, boundMs },
        "in-flight requests did not finish in time; handing them back",
      );
      this.#aborted = true;
      await this.#delivery.close();
      await finished;
    }
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

function kindOf(
  subject: string,
  names: ResourceNames,
): RequestKind | undefined {
  const suffix = subject.slice(names.subjectPrefix.length + 1);
  return Object.values(RequestKind).find((kind) => kind === suffix);
}

function failure(
  requestId: string,
  error: ByomError,
  agent: string,
): FailureResult {
  return {
    v: 1,
    requestId,
    ok: false,
    error: {
      code: error.code,
      message: error.message,
      retryable: error.retryable,
    },
    agent,
    finishedAt: new Date().toISOString(),
  };
}

function logResult(log: Logger, result: Result, durationMs: number): void {
  if (result.ok) {
    log.info(
      { kind: result.kind, ip: result.instance?.id, durationMs },
      "request served",
    );
  } else {
    log.warn(
      { code: result.error.code, reason: result.error.message, durationMs },
      "request failed",
    );
  }
}
