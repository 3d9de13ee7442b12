import { setTimeout as delay } from "node:timers/promises";

/** First pause between attempts; it doubles up to `maxPauseMs`. */
const firstPauseMs = 250;
const maxPauseMs = 4000;

export interface RetryOptions {
  /** Keep trying this long after the first failure. */
  forMs: number;
  /** Stops early (the agent is closing); the last error is thrown. */
  stopped?: () => boolean;
  /** Told of each failure that will be retried. */
  onRetry?: (error: unknown, pauseMs: number) => void;
  /** Which failures are worth another try; default all. */
  retryIf?: (error: unknown) => boolean;
}

/**
 * Runs `attempt` until it resolves, pausing 250 ms, 500 ms, ... up to 4 s
 * between failures, for at most `forMs`; then rejects with the last
 * failure. For steps that only NATS trouble can fail (a stream without a
 * leader while a cluster elects one takes seconds).
 */
export async function retryFor<T>(
  attempt: () => Promise<T>,
  options: RetryOptions,
): Promise<T> {
  const until = Date.now() + options.forMs;
  for (
    let pauseMs = firstPauseMs;
    ;
    pauseMs = Math.min(pauseMs * 2, maxPauseMs)
  ) {
    try {
      return await attempt();
    } catch (error) {
      if (
        Date.now() + pauseMs > until ||
        options.stopped?.() === true ||
        options.retryIf?.(error) === false
      ) {
        throw error;
      }
      options.onRetry?.(error, pauseMs);
      await delay(pauseMs);
    }
  }
}

/**
 * How long the server should wait before delivering a handed-back request
 * again: 1 s, 2 s, 4 s, ... up to 15 s, so the default five deliveries
 * span a NATS leader election rather than use themselves up in it.
 */
export function handBackDelayMs(deliveryCount: number): number {
  return Math.min(1000 * 2 ** Math.max(0, deliveryCount - 1), 15_000);
}
