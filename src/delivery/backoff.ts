import { setTimeout as delay } from "node:timers/promises";

/** Capped exponential backoff with full jitter. */
export interface BackoffSettings {
  /** Upper bound of the first pause, in ms. */
  initialMs: number;
  /** Upper bound of any pause, in ms. */
  maxMs: number;
}

export const defaultBackoff: BackoffSettings = { initialMs: 200, maxMs: 5000 };

/**
 * The pause before retry number `attempt` (0 for the first retry): a uniform
 * draw from [0, min(maxMs, initialMs * 2^attempt)), "full jitter", so that
 * agents retrying the same VM spread out. `random` is injectable for tests.
 */
export function backoffDelayMs(
  attempt: number,
  settings: BackoffSettings,
  random: () => number = Math.random,
): number {
  const exponent = Math.min(Math.max(attempt, 0), 30);
  const ceiling = Math.min(settings.maxMs, settings.initialMs * 2 ** exponent);
  return Math.floor(random() * ceiling);
}

/** Resolves the caller's partial settings against the defaults and checks them. */
export function resolveBackoff(
  partial: Partial<BackoffSettings> | undefined,
): BackoffSettings {
  const initialMs = partial?.initialMs ?? defaultBackoff.initialMs;
  const maxMs = partial?.maxMs ?? defaultBackoff.maxMs;
  if (!(initialMs > 0) || !(maxMs >= initialMs)) {
    throw new RangeError(
      `backoff needs 0 < initialMs <= maxMs, got initialMs=${initialMs} maxMs=${maxMs}`,
    );
  }
  return { initialMs, maxMs };
}

/** Sleeps `ms`, rejecting early with the signal's reason when it aborts. */
export async function pause(ms: number, signal: AbortSignal): Promise<void> {
  await delay(ms, undefined, { signal });
}
