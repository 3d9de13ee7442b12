import type { NatsConnection } from "@nats-io/transport-node";

import type { Logger } from "../logging/index.js";
import type { LeaseState } from "../protocol/index.js";

/** The value stored under a lease key (JSON, UTF-8). */
export interface LeaseRecord {
  /** Canonical IP (RFC 5952 for IPv6). */
  ip: string;
  state: LeaseState;
  /** Owner; kept through `releasing`, and as the last owner in `quarantined`. */
  allocationId?: string;
  requestId?: string;
  podName?: string;
  podNamespace?: string;
  /** Node of the cloud-api-adaptor that asked. */
  requestingNode?: string;
  /** Agent (node name) that served the request. */
  agent?: string;
  /** Host key seen at delivery; kept through `releasing` for pinning. */
  hostKey?: { type: string; fingerprint: string };
  /** sha256 (hex) of the user-data delivered; set with `ready`. */
  userDataSha256?: string;
  /** Request id of the delete that moved the lease to `releasing`. */
  releaseRequestId?: string;
  /** Why the lease was quarantined or freed. */
  reason?: string;
  /** ISO time the current state was entered. */
  since: string;
  /** ISO time of the last write. */
  updatedAt: string;
}

/** A lease record with the KV revision it was read at (for CAS). */
export interface Lease {
  readonly record: LeaseRecord;
  readonly revision: number;
}

/** Who asks for an IP. */
export interface ClaimRequest {
  /** `<podName>-<sandboxId>`; KV key characters only (`A-Za-z0-9_-=.`). */
  allocationId: string;
  requestId: string;
  podName: string;
  podNamespace: string;
  requestingNode: string;
}

/** What `start()` found and did. */
export interface ReconcileReport {
  /** Pool IPs that had no key and got a `free` one, in pool order. */
  created: string[];
  /** Pool IPs whose key was already there (left untouched). */
  present: number;
  /** Lease keys of IPs not in the configured pool; never deleted. */
  orphans: Lease[];
}

export interface LeaseStoreOptions {
  /** Connection from `@nats-io/transport-node`; the store never closes it. */
  nc: NatsConnection;
  /** KV bucket name, e.g. `byom-leases`. */
  bucket: string;
  /** Canonical IPs in pool order. */
  pool: readonly string[];
  /** This agent's id (node name), recorded in the leases it writes. */
  agent: string;
  /** Values kept per key (audit); used only when creating the bucket. Default 5. */
  history?: number;
  /** Stream replicas; used only when creating the bucket. Default 1. */
  replicas?: number;
  /** Silent by default. */
  logger?: Logger;
  /**
   * How long an acquire waits for another acquire of the same allocation id
   * (an index entry without an IP) before taking it over as abandoned.
   * Default 2 000 ms.
   */
  pendingTimeoutMs?: number;
  /**
   * How long to wait for the watch-fed cache to catch up with the bucket
   * before failing with UnavailableError. Default 5 000 ms.
   */
  cacheSyncTimeoutMs?: number;
  /**
   * Make sure every pool IP has a key at start (default true). Operator
   * tools pass false: adding keys is the agents' job, and a tool run with
   * another VM_POOL_IPS must not add leases nobody serves.
   */
  reconcile?: boolean;
}

/** Options of `acquire`. */
export interface AcquireOptions {
  /** IPs not to pick (e.g. ones that just failed a readiness probe). */
  exclude?: ReadonlySet<string>;
}

/** Options of `free`. */
export interface FreeOptions {
  /** States the lease may be in; default `["releasing"]`. */
  from?: readonly LeaseState[];
  /** Recorded in the free record. */
  reason?: string;
  /**
   * Only free the lease while this allocation holds it (NotOwnerError
   * otherwise), so a late caller never frees someone else's lease.
   */
  allocationId?: string;
}

/**
 * The IP pool in a JetStream KV bucket. Every state change is a
 * compare-and-swap on the key's revision. Errors: `InvalidRequestError`
 * (bad or unknown IP, bad allocation id), `NotOwnerError`,
 * `PoolExhaustedError`, `UnavailableError` (NATS failed or timed out).
 */
export interface LeaseStore {
  /**
   * Creates the bucket if missing, gives every pool IP a `free` key when it
   * has none (create-only: a live lease is never overwritten or deleted),
   * starts the watch-fed cache and reports orphans. Call once, first.
   */
  start(): Promise<ReconcileReport>;
  /**
   * Leases an IP to `claim.allocationId` (state `claimed`). Idempotent by
   * allocation id: a live (claimed/ready) lease is returned with
   * `existing: true`. The first pick is the upstream MD5 rule over the free
   * IPs in pool order, then the next free IP, wrapping. Concurrent acquires
   * of one allocation id end with one IP. Throws `PoolExhaustedError` when
   * no IP outside `exclude` is free.
   */
  acquire(
    claim: ClaimRequest,
    options?: AcquireOptions,
  ): Promise<{ lease: Lease; existing: boolean }>;
  /**
   * `claimed` → `ready` for the owner, storing the host key seen.
   * Idempotent when already ready for the owner; `NotOwnerError` otherwise.
   */
  markReady(
    ip: string,
    allocationId: string,
    hostKey: { type: string; fingerprint: string },
    delivered?: { userDataSha256: string },
  ): Promise<Lease>;
  /**
   * Any state → `quarantined` with reason and time; a quarantined IP is
   * never leased. Unbinds the allocation (its next acquire picks another
   * IP). `NotOwnerError` when `expectAllocationId` is given and another
   * allocation owns the lease. Already quarantined: returned unchanged,
   * unless `replaceReason` (an operator's quarantine): then only the
   * reason changes, so an operator's reason replaces an automatic one.
   */
  quarantine(
    ip: string,
    reason: string,
    options?: { expectAllocationId?: string; replaceReason?: boolean },
  ): Promise<Lease>;
  /**
   * `claimed`/`ready` → `releasing`, keeping owner and host key. Returns
   * undefined when the IP has no key or is free; a `releasing` or
   * `quarantined` lease is returned unchanged. `NotOwnerError` when
   * `allocationId` is given and another allocation owns the lease.
   */
  beginRelease(
    ip: string,
    allocationId?: string,
    requestId?: string,
  ): Promise<Lease | undefined>;
  /**
   * `releasing` (or a state in `from`) → `free`, clearing owner, host key
   * and the allocation index. A free lease is returned unchanged; a lease
   * in another state gives `NotOwnerError`.
   */
  free(ip: string, options?: FreeOptions): Promise<Lease>;
  /** Operator action: any state → `free`. */
  forceRelease(ip: string): Promise<Lease>;
  /** Operator action: `quarantined` → `free`. */
  unquarantine(ip: string): Promise<Lease>;
  /** Fresh read from the server; undefined when the IP has no key. */
  get(ip: string): Promise<Lease | undefined>;
  /** The claimed, ready or releasing lease of an allocation, if any. */
  findByAllocation(allocationId: string): Promise<Lease | undefined>;
  /** Every lease: pool order, then orphans; current as of the call. */
  list(): Promise<Lease[]>;
  /** Leases per state (pool IPs and orphans); current as of the call. */
  counts(): Promise<Record<LeaseState, number>>;
  /** Stops the watch. Idempotent; does not close the connection. */
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}
