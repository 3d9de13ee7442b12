import { createHash } from "node:crypto";
import { setTimeout as delay } from "node:timers/promises";

import type { ByomError } from "../errors/index.js";
import {
  ExpiredError,
  HostKeyRejectedError,
  InvalidRequestError,
  NotOwnerError,
  UnavailableError,
  VmUnreachableError,
  toByomError,
} from "../errors/index.js";
import { VmNotCleanError, type DeliveryResult } from "../delivery/index.js";
import type { Lease } from "../lease/index.js";
import { errorFields, type Logger } from "../logging/index.js";
import {
  LeaseState,
  allocationIdOf,
  instanceOf,
  parseUserData,
  type CreateRequest,
  type SuccessResult,
} from "../protocol/index.js";
import type { AgentContext } from "./context.js";

/**
 * Serves a create request: lease (idempotent by allocation id), check the
 * VM, deliver user-data, mark the lease ready. A VM that fails its checks
 * is quarantined and the next free one is tried.
 */
export async function handleCreate(
  context: AgentContext,
  request: CreateRequest,
): Promise<{
  result: SuccessResult;
  timingsMs: { lease: number; probe: number };
}> {
  const data = Buffer.from(userDataOf(context, request), "utf8");
  const sha256 = createHash("sha256").update(data).digest("hex");
  const allocationId = allocationIdOf(request.podName, request.sandboxId);
  const deadline = new Date(request.deadline);
  const log = context.logger.child({ allocationId });
  const tried = new Set<string>();
  const timingsMs = { lease: 0, probe: 0 };

  for (;;) {
    if (Date.now() > deadline.getTime()) {
      throw new ExpiredError(
        `request ${request.requestId} reached its deadline ${request.deadline} before a VM was ready`,
      );
    }
    const leaseStarted = performance.now();
    const { lease, existing } = await context.leases.acquire(
      {
        allocationId,
        requestId: request.requestId,
        podName: request.podName,
        podNamespace: request.podNamespace,
        requestingNode: request.requestingNode,
      },
      { exclude: tried },
    );
    timingsMs.lease += performance.now() - leaseStarted;
    const ip = lease.record.ip;
    context.emitter.emit("lease:acquired", { ip, allocationId, existing });
    log.info({ ip, existing, state: lease.record.state }, "lease acquired");

    const other = lease.record.requestId;
    if (
      existing &&
      lease.record.state === LeaseState.Claimed &&
      other !== undefined &&
      other !== request.requestId &&
      !(await context.answered(other))
    ) {
      // Another request of this allocation (a retry sent while the first
      // still runs) is delivering to this VM: two writers would remove
      // each other's temp files. Wait for it, then decide again.
      if (await waitForOtherRequest(context, lease, other, deadline, log)) {
        continue;
      }
    }

    if (lease.record.state === LeaseState.Ready && lease.record.hostKey) {
      const held = lease.record.userDataSha256;
      if (held !== undefined && held !== sha256) {
        throw new InvalidRequestError(
          `allocation ${allocationId} already holds VM ${ip} with other user-data (sha256 ${held.slice(0, 12)}…, this request ${sha256.slice(0, 12)}…); delete it before creating it again`,
        );
      }
      return {
        result: success(context, request, allocationId, lease),
        timingsMs,
      };
    }

    const probeStarted = performance.now();
    const unreachable = await probe(context, ip);
    timingsMs.probe += performance.now() - probeStarted;
    if (unreachable !== undefined) {
      await quarantine(context, ip, allocationId, unreachable);
      tried.add(ip);
      continue;
    }

    let delivered: DeliveryResult;
    try {
      // A fresh claim must find cidata/ empty; a lease this allocation
      // already held may hold our own earlier write of the same bytes,
      // nothing else (a VM found dirty whose quarantine failed, say).
      delivered = await context.delivery.deliver(ip, data, {
        deadline,
        requireClean: true,
        ownEarlierWrite: existing,
        // A retry can reach the VM seconds later: after a delete of this
        // pod reset it, say. Write only while the claim is still ours.
        beforeWrite: () => stillClaimed(context, ip, allocationId),
      });
    } catch (error) {
      const failure = toByomError(error);
      context.emitter.emit("delivery:failed", { ip, error: failure });
      const reason = quarantineReason(failure);
      if (reason !== undefined) {
        await quarantine(context, ip, allocationId, reason);
        tried.add(ip);
        continue;
      }
      await giveBack(context, ip, allocationId, failure);
      throw failure;
    }
    context.emitter.emit("delivery:done", { ip, ...delivered });

    // A failure here (NATS trouble) leaves the claim in place: the request
    // is handed back and its next delivery finds and finishes this lease.
    const ready = await context.leases.markReady(
      ip,
      allocationId,
      delivered.hostKey,
      { userDataSha256: delivered.sha256 },
    );
    return {
      result: success(context, request, allocationId, ready),
      timingsMs,
    };
  }
}

/**
 * The request's user-data in clear, checked as the pod VM will parse it:
 * opened when sealed, refused in clear when the agent requires sealing.
 */
function userDataOf(context: AgentContext, request: CreateRequest): string {
  let text: string;
  if (request.userDataSealed !== undefined) {
    if (context.unseal === undefined) {
      throw new InvalidRequestError(
        'field "userDataSealed" cannot be opened: this agent has no sealing seed (BYOM_SEALING_SEED_FILE)',
      );
    }
    text = context.unseal(request.userDataSealed);
  } else if (context.requireSealed) {
    throw new InvalidRequestError(
      'field "userData" must be sealed: this agent requires sealed user-data (BYOM_REQUIRE_SEALED)',
    );
  } else {
    text = request.userData ?? "";
  }
  parseUserData(text, { requireHeader: true });
  return text;
}

/** Why a VM that failed this way should leave service, if it should. */
function quarantineReason(failure: ByomError): string | undefined {
  if (failure instanceof HostKeyRejectedError) {
    return `host key not allowed: ${failure.message}`;
  }
  if (failure instanceof VmNotCleanError) {
    return "cidata/user-data present at claim time: the VM never reset";
  }
  return undefined;
}

/**
 * Readiness at claim time: the SSH port answers within a short backoff.
 * Returns the reason to quarantine, or undefined when the VM answers.
 */
async function probe(
  context: AgentContext,
  ip: string,
): Promise<string | undefined> {
  try {
    await probeWithBackoff(context, ip);
    return undefined;
  } catch (error) {
    const failure = toByomError(error);
    if (failure instanceof VmUnreachableError) {
      return `unreachable: ${failure.message}`;
    }
    throw failure;
  }
}

async function probeWithBackoff(
  context: AgentContext,
  ip: string,
): Promise<void> {
  const until = Date.now() + context.readinessTimeoutMs;
  let pauseMs = 100;
  for (;;) {
    const left = until - Date.now();
    try {
      await context.delivery.probe(ip, {
        timeoutMs: Math.max(200, Math.min(left, 2000)),
      });
      return;
    } catch (error) {
      if (Date.now() + pauseMs >= until) {
        throw error;
      }
      await new Promise((resolve) => setTimeout(resolve, pauseMs));
      pauseMs = Math.min(pauseMs * 2, 1000);
    }
  }
}

async function quarantine(
  context: AgentContext,
  ip: string,
  allocationId: string,
  reason: string,
): Promise<void> {
  context.logger.warn(
    { ip, allocationId, reason },
    "quarantining VM; trying the next one",
  );
  await context.leases.quarantine(ip, reason, {
    expectAllocationId: allocationId,
  });
  context.emitter.emit("lease:quarantined", { ip, reason });
}

/** Frees a claim whose delivery failed for a reason that is not the VM's. */
async function giveBack(
  context: AgentContext,
  ip: string,
  allocationId: string,
  failure: ByomError,
): Promise<void> {
  try {
    if (failure instanceof VmUnreachableError) {
      await quarantine(
        context,
        ip,
        allocationId,
        `unreachable during delivery: ${failure.message}`,
      );
      return;
    }
    await context.leases.free(ip, {
      from: [LeaseState.Claimed],
      allocationId,
      reason: `delivery failed: ${failure.code}`,
    });
  } catch (error) {
    context.logger.error(
      { ip, allocationId, err: errorFields(error) },
      "could not give back the claim after a failed delivery",
    );
  }
}

function success(
  context: AgentContext,
  request: CreateRequest,
  allocationId: string,
  lease: Lease,
): SuccessResult {
  const hostKey = lease.record.hostKey;
  return {
    v: 1,
    requestId: request.requestId,
    ok: true,
    kind: "create",
    instance: instanceOf(lease.record.ip),
    allocationId,
    ...(hostKey
      ? { hostKey: { type: hostKey.type, fingerprint: hostKey.fingerprint } }
      : {}),
    agent: context.agentId,
    finishedAt: new Date().toISOString(),
  };
}

/** NotOwnerError unless `ip` is still claimed by `allocationId`. */
async function stillClaimed(
  context: AgentContext,
  ip: string,
  allocationId: string,
): Promise<void> {
  const lease = await context.leases.get(ip);
  if (
    lease?.record.state !== LeaseState.Claimed ||
    lease.record.allocationId !== allocationId
  ) {
    throw new NotOwnerError(
      `lease on ${ip} is ${lease?.record.state ?? "missing"}${lease?.record.allocationId === allocationId ? "" : ` for allocation ${lease?.record.allocationId ?? "none"}`}, no longer claimed by allocation ${allocationId} (deleted meanwhile?); nothing written`,
    );
  }
}

/** Polling of a lease that another request of the allocation holds. */
const otherRequestPollMs = { first: 100, max: 1000 };

/**
 * Waits while `lease` stays claimed by request `other` and `other` has no
 * answer. Resolves true when the lease changed (decide again), false when
 * `other` was answered without finishing (this request takes the claim
 * over). ExpiredError at `deadline`.
 */
async function waitForOtherRequest(
  context: AgentContext,
  lease: Lease,
  other: string,
  deadline: Date,
  log: Logger,
): Promise<boolean> {
  const ip = lease.record.ip;
  log.info(
    { ip, otherRequestId: other },
    "another request of this allocation is delivering; waiting for it",
  );
  let pause = otherRequestPollMs.first;
  for (;;) {
    if (Date.now() + pause > deadline.getTime()) {
      throw new ExpiredError(
        `reached the deadline ${deadline.toISOString()} while request ${other} of the same allocation was still delivering to VM ${ip}`,
      );
    }
    await delay(pause);
    pause = Math.min(pause * 2, otherRequestPollMs.max);
    if (context.closing()) {
      throw new UnavailableError("agent shutting down");
    }
    const now = await context.leases.get(ip);
    if (now?.revision !== lease.revision) {
      return true;
    }
    if (await context.answered(other)) {
      return false;
    }
  }
}
