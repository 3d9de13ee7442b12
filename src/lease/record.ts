/**
 * Pure parts of the lease store: the stored values and their validation.
 * No I/O. (The selection order lives with the free set, in cache.ts.)
 */
import { InvalidRequestError } from "../errors/index.js";
import { LeaseState, canonicalIp } from "../protocol/index.js";
import type { ClaimRequest, LeaseRecord } from "./types.js";

/** Every lease state, in lifecycle order. */
export const allLeaseStates: readonly LeaseState[] = Object.values(LeaseState);

/** States in which a lease belongs to its allocation and its pod runs. */
export const liveStates: ReadonlySet<LeaseState> = new Set<LeaseState>([
  LeaseState.Claimed,
  LeaseState.Ready,
]);

/** States in which a lease still binds its allocation id. */
export const ownedStates: ReadonlySet<LeaseState> = new Set<LeaseState>([
  LeaseState.Claimed,
  LeaseState.Ready,
  LeaseState.Releasing,
]);

/**
 * The value under an allocation's index key. Written without `ip` before
 * the claim (the acquire holding `token` is choosing), then pointed at the
 * claimed IP.
 */
export interface AllocationIndex {
  allocationId: string;
  token: string;
  ip?: string;
  requestId?: string;
  since: string;
}

/** KV key tokens: no empty token, no wildcard, no leading or trailing dot. */
const allocationIdPattern = /^[A-Za-z0-9_=-]+(\.[A-Za-z0-9_=-]+)*$/;
const maxAllocationIdLength = 255;

/** Throws InvalidRequestError unless `allocationId` can be a KV key part. */
export function checkAllocationId(allocationId: unknown): string {
  if (
    typeof allocationId !== "string" ||
    allocationId.length > maxAllocationIdLength ||
    !allocationIdPattern.test(allocationId)
  ) {
    throw new InvalidRequestError(
      `allocation id ${JSON.stringify(allocationId)} is invalid: use 1 to ${maxAllocationIdLength} characters of A-Z a-z 0-9 _ - = and single inner dots`,
    );
  }
  return allocationId;
}

/** Throws InvalidRequestError unless the claim's fields are usable. */
export function checkClaim(claim: ClaimRequest): void {
  checkAllocationId(claim.allocationId);
  for (const field of [
    "requestId",
    "podName",
    "podNamespace",
    "requestingNode",
  ] as const) {
    if (typeof claim[field] !== "string") {
      throw new InvalidRequestError(
        `claim field ${field} must be a string, got ${typeof claim[field]}`,
      );
    }
  }
}

/** Canonical text of `ip`, or InvalidRequestError naming it. */
export function requireIp(ip: unknown): string {
  const canonical = typeof ip === "string" ? canonicalIp(ip) : undefined;
  if (canonical === undefined) {
    throw new InvalidRequestError(
      `${JSON.stringify(ip)} is not an IPv4 or IPv6 address`,
    );
  }
  return canonical;
}

export function freeRecord(
  ip: string,
  now: string,
  reason?: string,
): LeaseRecord {
  return {
    ip,
    state: LeaseState.Free,
    ...(reason === undefined ? {} : { reason }),
    since: now,
    updatedAt: now,
  };
}

export function claimedRecord(
  ip: string,
  claim: ClaimRequest,
  agent: string,
  now: string,
): LeaseRecord {
  return {
    ip,
    state: LeaseState.Claimed,
    allocationId: claim.allocationId,
    requestId: claim.requestId,
    podName: claim.podName,
    podNamespace: claim.podNamespace,
    requestingNode: claim.requestingNode,
    agent,
    since: now,
    updatedAt: now,
  };
}

/** The same record in `state`, entered now; owner fields kept. */
export function withState(
  record: LeaseRecord,
  state: LeaseState,
  now: string,
  changes: Partial<LeaseRecord> = {},
): LeaseRecord {
  return { ...record, ...changes, state, since: now, updatedAt: now };
}

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

export function encodeJson(value: unknown): Uint8Array {
  return encoder.encode(JSON.stringify(value));
}

/**
 * Parses a stored lease value. Returns undefined when it is not a lease
 * record for `ip` (a foreign or damaged value is never picked).
 */
export function parseLeaseRecord(
  bytes: Uint8Array,
  ip: string,
): LeaseRecord | undefined {
  const value = parseJson(bytes);
  if (
    !isObject(value) ||
    value.ip !== ip ||
    !allLeaseStates.includes(value.state as LeaseState) ||
    typeof value.since !== "string" ||
    typeof value.updatedAt !== "string"
  ) {
    return undefined;
  }
  for (const field of [
    "allocationId",
    "requestId",
    "podName",
    "podNamespace",
    "requestingNode",
    "agent",
    "reason",
    "userDataSha256",
    "releaseRequestId",
  ]) {
    if (value[field] !== undefined && typeof value[field] !== "string") {
      return undefined;
    }
  }
  return value as unknown as LeaseRecord;
}

/** Parses an index value; undefined when damaged. */
export function parseAllocationIndex(
  bytes: Uint8Array,
): AllocationIndex | undefined {
  const value = parseJson(bytes);
  if (
    !isObject(value) ||
    typeof value.allocationId !== "string" ||
    typeof value.token !== "string" ||
    (value.ip !== undefined && typeof value.ip !== "string")
  ) {
    return undefined;
  }
  return value as unknown as AllocationIndex;
}

/** A count for every state, all zero. */
export function emptyCounts(): Record<LeaseState, number> {
  const counts = {} as Record<LeaseState, number>;
  for (const state of allLeaseStates) {
    counts[state] = 0;
  }
  return counts;
}

/** `"0 free, 3 claimed, ..."` for error messages and logs. */
export function describeCounts(counts: Record<LeaseState, number>): string {
  return allLeaseStates.map((state) => `${counts[state]} ${state}`).join(", ");
}

function parseJson(bytes: Uint8Array): unknown {
  try {
    return JSON.parse(decoder.decode(bytes));
  } catch {
    return undefined;
  }
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
