/** Telling a lost compare-and-swap from a failure, by JetStream API code. */
import { JetStreamApiCodes, JetStreamApiError } from "@nats-io/jetstream";

import { ByomError, UnavailableError } from "../errors/index.js";

const lostRaceCodes: ReadonlySet<number> = new Set<number>([
  JetStreamApiCodes.StreamWrongLastSequence,
  // Newer servers say this when the expected subject sequence is unknown;
  // re-reading and deciding again is right for it too.
  JetStreamApiCodes.StreamWrongLastSequenceUnknown,
]);

/** True when a write failed only because the key changed since it was read. */
export function isLostRace(error: unknown): boolean {
  return error instanceof JetStreamApiError && lostRaceCodes.has(error.code);
}

/** A NATS failure as an UnavailableError naming what failed; ours pass. */
export function unavailable(action: string, error: unknown): ByomError {
  if (error instanceof ByomError) {
    return error;
  }
  const message = error instanceof Error ? error.message : String(error);
  return new UnavailableError(`${action} failed: ${message}`, {
    cause: error,
  });
}
