import type { JetStreamManager } from "@nats-io/jetstream";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";

import { ErrorCode } from "../errors/index.js";
import { errorFields } from "../logging/index.js";
import {
  Header,
  LeaseState,
  RequestKind,
  allocationIdOf,
  canonicalIp,
  decodeRequest,
  requestIdHint,
  type FailureResult,
  type Request,
  type ResourceNames,
  type Result,
} from "../protocol/index.js";
import type { AgentContext } from "./context.js";
import { retryFor } from "./retry.js";

/** JetStream's advisory when a message used up its deliveries. */
function maxDeliveriesSubject(names: ResourceNames): string {
  return `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.${names.stream}.${names.consumer}`;
}

/** How long settling an abandoned request is retried. */
const settleRetryMs = 60_000;

/** Agents share the advisory through one queue group: one handles each. */
const queueGroup = "byom-abandoned";

interface MaxDeliveriesAdvisory {
  stream_seq?: number;
  deliveries?: number;
}

export interface AbandonedOptions {
  nc: NatsConnection;
  jsm: JetStreamManager;
  names: ResourceNames;
  context: AgentContext;
  publish: (result: Result, replyTo: string) => Promise<void>;
  /** True when the request already has a result. */
  answered: (requestId: string) => Promise<boolean>;
}

/**
 * Answers requests that used up their deliveries (agents died serving
 * them): a final UNAVAILABLE result, the lease taken out of service until
 * the quarantine prober finds the VM clean, and the message removed from
 * the stream (nats-server 2.9 keeps it otherwise).
 */
export function watchAbandonedRequests(
  options: AbandonedOptions,
): Subscription {
  const { nc, names, context } = options;
  const log = context.logger.child({ task: "abandoned" });
  return nc.subscribe(maxDeliveriesSubject(names), {
    queue: queueGroup,
    callback: (error, message) => {
      if (error !== null) {
        log.warn({ err: errorFields(error) }, "advisory subscription failed");
        return;
      }
      const advisory = message.json<MaxDeliveriesAdvisory>();
      if (typeof advisory.stream_seq !== "number") {
        return;
      }
      const seq = advisory.stream_seq;
      // The advisory comes once: NATS trouble (a stream electing a leader)
      // is waited out here, or the request would stay unanswered.
      void retryFor(() => settle(options, seq, advisory.deliveries ?? 0), {
        forMs: settleRetryMs,
        onRetry: (failure, pauseMs) =>
          log.warn(
            { err: errorFields(failure), seq, pauseMs },
            "could not settle an abandoned request yet; retrying",
          ),
      }).catch((failure: unknown) =>
        log.error(
          { err: errorFields(failure), seq },
          "could not settle an abandoned request",
        ),
      );
    },
  });
}

async function settle(
  options: AbandonedOptions,
  seq: number,
  deliveries: number,
): Promise<void> {
  const { jsm, names, context } = options;
  // Null when the message is gone (settled by another agent, or acked).
  const stored = await jsm.streams.getMessage(names.stream, { seq });
  if (stored === null) {
    return;
  }
  const requestId =
    stored.header?.get(Header.MsgId) || requestIdHint(stored.data) || "unknown";
  const log = context.logger.child({ requestId, seq });
  if (requestId !== "unknown" && (await options.answered(requestId))) {
    // Served and answered; only its ack was lost (NATS trouble).
    log.info(
      { deliveries },
      "request used up its deliveries after it was answered; removing it",
    );
    await jsm.streams.deleteMessage(names.stream, seq);
    return;
  }
  log.error(
    { deliveries },
    "request used up its deliveries; answering it and removing it",
  );

  let request: Request | undefined;
  try {
    request = decodeRequest(stored.data);
  } catch {
    request = undefined;
  }
  if (request !== undefined) {
    await takeOutOfService(context, request);
  }

  const result: FailureResult = {
    v: 1,
    requestId,
    ok: false,
    ...(request ? { kind: request.kind } : {}),
    error: {
      code: ErrorCode.Unavailable,
      message: `request was delivered ${deliveries} times and no agent finished it; giving up`,
      retryable: true,
    },
    agent: context.agentId,
    finishedAt: new Date().toISOString(),
  };
  await options.publish(result, stored.header?.get(Header.ReplyTo) ?? "");
  await jsm.streams.deleteMessage(names.stream, seq);
}

/**
 * A VM the abandoned request may have touched goes to quarantine; the
 * prober frees it once it answers with an empty cidata/.
 */
export async function takeOutOfService(
  context: AgentContext,
  request: Request,
): Promise<void> {
  const lease =
    request.kind === RequestKind.Create
      ? await context.leases.findByAllocation(
          allocationIdOf(request.podName, request.sandboxId),
        )
      : await context.leases.get(canonicalIp(request.instanceId) ?? "");
  if (lease === undefined || lease.record.state === LeaseState.Free) {
    return;
  }
  if (lease.record.state === LeaseState.Quarantined) {
    return;
  }
  const ip = lease.record.ip;
  const pinned = lease.record.hostKey?.fingerprint;
  if (lease.record.state === LeaseState.Ready) {
    // The VM got user-data: make it reset so the prober can free it.
    await context.delivery
      .triggerReboot(ip, {
        deadline: new Date(Date.now() + 3 * context.connectTimeoutMs),
        ...(pinned ? { pinnedFingerprint: pinned } : {}),
      })
      .catch((error: unknown) =>
        context.logger.warn(
          { ip, err: errorFields(error) },
          "reboot of an abandoned VM failed",
        ),
      );
  }
  const reason = `abandoned: ${request.kind} request ${request.requestId} used up its deliveries`;
  await context.leases.quarantine(ip, reason);
  context.emitter.emit("lease:quarantined", { ip, reason });
}
