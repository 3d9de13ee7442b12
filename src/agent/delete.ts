import {
  HostKeyRejectedError,
  InvalidRequestError,
  NotOwnerError,
  UnavailableError,
  toByomError,
} from "../errors/index.js";
import type { LeaseRecord } from "../lease/index.js";
import { errorFields } from "../logging/index.js";
import {
  LeaseState,
  RemotePath,
  canonicalIp,
  showValue,
  type DeleteRequest,
  type Result,
  type SuccessResult,
} from "../protocol/index.js";
import type { AgentContext } from "./context.js";
import { retryFor } from "./retry.js";

const rebootName = RemotePath.reboot.slice(RemotePath.cidataDir.length + 1);

/** A result to publish now, and work that goes on after it. */
export interface Outcome {
  result: Result;
  after?: () => Promise<void>;
  /** Phases of a create, in milliseconds. */
  timingsMs?: { lease: number; probe: number };
}

/**
 * Serves a delete: refuses a caller that does not own the IP, writes the
 * reboot trigger over a connection that must present the key pinned at
 * delivery, marks the lease `releasing` and answers; then waits for the VM
 * to reset before freeing it (or quarantines it after the deadline).
 */
export async function handleDelete(
  context: AgentContext,
  request: DeleteRequest,
): Promise<Outcome> {
  const ip = canonicalIp(request.instanceId);
  if (ip === undefined) {
    throw new InvalidRequestError(
      `field "instanceId" must be an IP address (got ${showValue(request.instanceId)})`,
    );
  }
  const log = context.logger.child({ ip });

  const current = await context.leases.get(ip);
  const state = current?.record.state;
  if (current === undefined || state === LeaseState.Free) {
    log.info(
      { state: state ?? "unknown" },
      "delete of a free or unknown IP: nothing to do",
    );
    return { result: released(context, request, ip, state ?? "unknown") };
  }
  if (state === LeaseState.Quarantined) {
    await resetQuarantinedPod(context, request, current.record);
    return {
      result: released(context, request, ip, state, current.record.reason),
    };
  }

  const wasReleasing = state === LeaseState.Releasing;
  const lease = await context.leases.beginRelease(
    ip,
    request.allocationId,
    request.requestId,
  );
  if (lease === undefined) {
    return { result: released(context, request, ip, LeaseState.Free) };
  }
  const releasedBy = lease.record.releaseRequestId;
  if (releasedBy !== undefined && releasedBy !== request.requestId) {
    // That delete writes the trigger and frees the VM once it has reset;
    // writing again could meet the VM already rebooted with new keys.
    log.info(
      { releasedBy },
      "another delete is releasing this VM; leaving the reboot to it",
    );
    return { result: released(context, request, ip, lease.record.state) };
  }
  const pinned = lease.record.hostKey?.fingerprint;

  // This delete moved the lease to releasing now, or is served again
  // after its agent died (then the trigger may be written already).
  if (!wasReleasing || (await triggerMissing(context, ip, pinned))) {
    const triggerDeadline = new Date(
      Math.min(
        Date.parse(request.deadline),
        Date.now() + 3 * context.connectTimeoutMs,
      ),
    );
    try {
      await context.delivery.triggerReboot(ip, {
        deadline: triggerDeadline,
        ...(pinned ? { pinnedFingerprint: pinned } : {}),
      });
      log.info({ fingerprint: pinned }, "reboot trigger written");
    } catch (error) {
      const failure = toByomError(error);
      if (failure instanceof HostKeyRejectedError) {
        log.error(
          { alert: "host-key-changed", pinned, err: errorFields(failure) },
          "VM presented a different host key than at delivery; nothing written",
        );
      }
      const reason = `reboot trigger failed: ${failure.message}`;
      await context.leases.quarantine(ip, reason);
      context.emitter.emit("lease:quarantined", { ip, reason });
      return {
        result: released(context, request, ip, LeaseState.Quarantined, reason),
      };
    }
  }

  return {
    result: released(context, request, ip, LeaseState.Releasing),
    after: () => finishRelease(context, ip, lease.record.allocationId, pinned),
  };
}

/**
 * A VM quarantined while it held this pod (an operator action, a failed
 * probe) still holds the pod's user-data: write the reboot trigger, pinned
 * to the key seen at delivery, so the VM resets; it stays quarantined until
 * the prober (or an operator) finds it clean. NOT_OWNER for a delete naming
 * another allocation.
 */
async function resetQuarantinedPod(
  context: AgentContext,
  request: DeleteRequest,
  record: LeaseRecord,
): Promise<void> {
  const owner = record.allocationId;
  if (owner === undefined || record.hostKey === undefined) {
    return;
  }
  if (request.allocationId !== undefined && request.allocationId !== owner) {
    throw new NotOwnerError(
      `ip ${record.ip} was leased to allocation ${owner}, not ${request.allocationId}; nothing done`,
    );
  }
  try {
    await context.delivery.triggerReboot(record.ip, {
      deadline: new Date(Date.now() + 3 * context.connectTimeoutMs),
      pinnedFingerprint: record.hostKey.fingerprint,
    });
    context.logger.info(
      { ip: record.ip, allocationId: owner },
      "reboot trigger written to a quarantined VM that held the pod",
    );
  } catch (error) {
    context.logger.warn(
      { ip: record.ip, err: errorFields(error) },
      "could not reboot a quarantined VM that held the pod; it stays quarantined",
    );
  }
}

/**
 * For a delete served again (its agent died): true when the VM still runs
 * with the pinned key and no reboot trigger, i.e. the earlier attempt died
 * before writing it. A changed key or a VM that does not answer means the
 * reboot is under way.
 */
async function triggerMissing(
  context: AgentContext,
  ip: string,
  pinned: string | undefined,
): Promise<boolean> {
  try {
    const seen = await context.delivery.inspect(ip, {
      timeoutMs: context.connectTimeoutMs,
      ...(pinned ? { pinnedFingerprint: pinned } : {}),
    });
    return !seen.cidataEntries.includes(rebootName);
  } catch (error) {
    context.logger.debug(
      { ip, err: errorFields(error) },
      "VM not reachable with its pinned key; taking the reboot as under way",
    );
    return false;
  }
}

async function finishRelease(
  context: AgentContext,
  ip: string,
  owner: string | undefined,
  previousFingerprint: string | undefined,
): Promise<void> {
  const log = context.logger.child({ ip });
  let reset: Awaited<ReturnType<AgentContext["delivery"]["waitForReset"]>>;
  try {
    reset = await context.delivery.waitForReset(ip, {
      deadline: new Date(Date.now() + context.releaseTimeoutMs),
      ...(previousFingerprint ? { previousFingerprint } : {}),
    });
  } catch (error) {
    if (context.closing()) {
      throw error; // shutting down: the request is handed back, not judged
    }
    // A failed write here (NATS trouble) fails the follow-up: the request
    // is handed back and its next delivery judges the VM again.
    const reason = `did not reset within ${context.releaseTimeoutMs} ms: ${toByomError(error).message}`;
    await context.leases.quarantine(ip, reason, {
      ...(owner ? { expectAllocationId: owner } : {}),
    });
    context.emitter.emit("lease:quarantined", { ip, reason });
    log.warn({ reason }, "VM quarantined after release");
    return;
  }
  // The VM has reset: only NATS trouble can stop the lease being freed.
  // Keep trying through a short outage; a longer one hands the request
  // back (its next delivery finds the VM reset and frees it).
  await retryFor(
    () =>
      context.leases.free(ip, {
        from: [LeaseState.Releasing],
        ...(owner ? { allocationId: owner } : {}),
      }),
    {
      forMs: context.natsRetryMs,
      stopped: context.closing,
      retryIf: (error) => error instanceof UnavailableError,
      onRetry: (error, pauseMs) =>
        log.warn(
          { err: errorFields(error), pauseMs },
          "could not free the reset VM's lease; retrying",
        ),
    },
  );
  context.emitter.emit("lease:released", { ip });
  log.info(
    { fingerprint: reset.hostKey.fingerprint },
    "VM reset; back in the pool",
  );
}

function released(
  context: AgentContext,
  request: DeleteRequest,
  ip: string,
  state: string,
  reason?: string,
): SuccessResult {
  return {
    v: 1,
    requestId: request.requestId,
    ok: true,
    kind: "delete",
    release: { state, ...(reason ? { reason } : {}) },
    ...(request.allocationId ? { allocationId: request.allocationId } : {}),
    agent: context.agentId,
    finishedAt: new Date().toISOString(),
  };
}
