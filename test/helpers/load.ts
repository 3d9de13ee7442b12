import { ByomError } from "../../src/errors/index.js";
import type { Publisher } from "../../src/publisher/index.js";

/** How {@link untilAnswered} retries. */
export interface RetryPlan {
  /** The first request id; later ones get a suffix. */
  requestId: string;
  /** Every request id sent is pushed here (each must be answered once). */
  used: string[];
  /** The stored result of a request id, if any (publisher.status). */
  status: (requestId: string) => Promise<unknown>;
  retries: { count: number };
  untilMs: number;
}

/**
 * Sends until answered, as a careful client does. A retryable failure
 * with no stored answer (lost to a fault) is sent again with the same
 * request id, which JetStream de-duplicates and the agent answers once;
 * one the agent answered (EXPIRED, say) keeps that answer, so the retry
 * gets a new request id. Gives up on any other error or after `untilMs`.
 */
export async function untilAnswered<T>(
  send: (requestId: string) => Promise<T>,
  plan: RetryPlan,
): Promise<T> {
  let requestId = plan.requestId;
  plan.used.push(requestId);
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await send(requestId);
    } catch (error) {
      if (
        !(error instanceof ByomError) ||
        !error.retryable ||
        Date.now() > plan.untilMs
      ) {
        throw error;
      }
      plan.retries.count += 1;
      const answered = await plan.status(requestId).catch(() => undefined);
      if (answered !== undefined) {
        requestId = `${plan.requestId}-${attempt}`;
        plan.used.push(requestId);
      }
    }
  }
}

/**
 * Creates `count` pods at once, retrying a retryable failure until
 * `untilMs` ({@link untilAnswered}). Returns the live leases
 * (`ip -> allocation id`), every request id sent and how many sends were
 * repeated.
 */
export async function createAll(
  publisher: Publisher,
  prefix: string,
  count: number,
  userData: Buffer,
  untilMs: number,
): Promise<{
  live: Record<string, string>;
  requestIds: string[];
  retries: number;
}> {
  const retries = { count: 0 };
  const requestIds: string[] = [];
  const created = await Promise.all(
    Array.from({ length: count }, (_, index) =>
      untilAnswered(
        (requestId) =>
          publisher.createInstance({
            podName: `${prefix}-${index}`,
            sandboxId: "s",
            userData,
            requestId,
            timeoutMs: 8000,
          }),
        {
          requestId: `${prefix}-req-${index}`,
          used: requestIds,
          status: (id) => publisher.status(id),
          retries,
          untilMs,
        },
      ),
    ),
  );
  const live: Record<string, string> = {};
  for (const [index, result] of created.entries()) {
    live[result.instance.id] = `${prefix}-${index}-s`;
  }
  return { live, requestIds, retries: retries.count };
}
