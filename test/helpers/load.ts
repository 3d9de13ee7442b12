import { ByomError } from "../../src/errors/index.js";
import type { Publisher } from "../../src/publisher/index.js";

/**
 * Sends `send` until it is answered: a retryable failure (the answer was
 * lost to a fault) sends again with the same request id, which JetStream
 * de-duplicates and the agent answers once. Gives up on any other error
 * or after `untilMs`.
 */
export async function untilAnswered<T>(
  send: () => Promise<T>,
  retries: { count: number },
  untilMs: number,
): Promise<T> {
  for (;;) {
    try {
      return await send();
    } catch (error) {
      if (
        !(error instanceof ByomError) ||
        !error.retryable ||
        Date.now() > untilMs
      ) {
        throw error;
      }
      retries.count += 1;
    }
  }
}

/**
 * Creates `count` pods at once, each with one request id that is sent
 * again on a retryable failure until `untilMs`. Returns the live leases
 * (`ip -> allocation id`), the request ids and how many sends were
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
  const requestIds = Array.from(
    { length: count },
    (_, index) => `${prefix}-req-${index}`,
  );
  const created = await Promise.all(
    requestIds.map((requestId, index) =>
      untilAnswered(
        () =>
          publisher.createInstance({
            podName: `${prefix}-${index}`,
            sandboxId: "s",
            userData,
            requestId,
            timeoutMs: 8000,
          }),
        retries,
        untilMs,
      ),
    ),
  );
  const live: Record<string, string> = {};
  for (const [index, result] of created.entries()) {
    live[result.instance.id] = `${prefix}-${index}-s`;
  }
  return { live, requestIds, retries: retries.count };
}
