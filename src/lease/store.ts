import { randomUUID } from "node:crypto";
import { setTimeout as delay } from "node:timers/promises";

import type { QueuedIterator } from "@nats-io/transport-node";
import { Kvm, type KV, type KvEntry, type KvWatchEntry } from "@nats-io/kv";

import {
  InvalidRequestError,
  NotOwnerError,
  PoolExhaustedError,
  UnavailableError,
} from "../errors/index.js";
import { errorFields, silentLogger, type Logger } from "../logging/index.js";
import {
  LeaseKeyPrefix,
  LeaseState,
  allocationKey,
  decodeIpKey,
  leaseKey,
} from "../protocol/index.js";
import { LeaseCache } from "./cache.js";
import { createKeyWriter, type KeyWriter } from "./cas.js";
import { unavailable } from "./kv.js";
import {
  type AllocationIndex,
  allLeaseStates,
  checkAllocationId,
  checkClaim,
  claimedRecord,
  describeCounts,
  emptyCounts,
  encodeJson,
  freeRecord,
  liveStates,
  ownedStates,
  parseAllocationIndex,
  parseLeaseRecord,
  requireIp,
  withState,
} from "./record.js";
import type {
  AcquireOptions,
  ClaimRequest,
  FreeOptions,
  Lease,
  LeaseRecord,
  LeaseStore,
  LeaseStoreOptions,
  ReconcileReport,
} from "./types.js";

/** Re-read-and-retry rounds of one operation before giving up. */
/** Refused creates of an absent allocation entry before writing it anyway. */
const phantomLimit = 3;
const maxRounds = 50;
/** Pause between looks at another acquire's unfinished index entry. */
const pendingPollMs = 20;
/** Parallel key creations during reconcile. */
const reconcileParallelism = 32;
/** Attempts of a start-up step that failed for a NATS reason. */
const startAttempts = 5;

/** What a read-modify-write step decided. */
type Decision =
  { readonly write: LeaseRecord } | { readonly done: Lease | undefined };

/** What an acquire's claim attempt came to. */
type ClaimOutcome =
  | { readonly lease: Lease; readonly existing: boolean }
  | { readonly retry: true };

/** Value read for a stored key that is not a lease record. */
const unreadableReason = "unreadable lease value";

export class KvLeaseStore implements LeaseStore {
  /** Last write queued per key; see #writeKey. */
  readonly #writesInFlight = new Map<string, Promise<void>>();
  readonly #options: LeaseStoreOptions;
  readonly #pool: readonly string[];
  readonly #poolSet: ReadonlySet<string>;
  readonly #log: Logger;
  readonly #cache: LeaseCache;
  readonly #pendingTimeoutMs: number;
  readonly #syncTimeoutMs: number;
  #kv: KV | undefined;
  #writer: KeyWriter | undefined;
  #watch: QueuedIterator<KvWatchEntry> | undefined;
  #watchLoop: Promise<void> | undefined;
  #starting = false;
  #closed = false;

  constructor(options: LeaseStoreOptions) {
    this.#options = { ...options };
    this.#pool = canonicalPool(options.pool);
    this.#poolSet = new Set(this.#pool);
    this.#cache = new LeaseCache(this.#pool);
    this.#log = (options.logger ?? silentLogger()).child({
      component: "lease",
      bucket: options.bucket,
    });
    this.#pendingTimeoutMs = options.pendingTimeoutMs ?? 2000;
    this.#syncTimeoutMs = options.cacheSyncTimeoutMs ?? 5000;
  }

  async start(): Promise<ReconcileReport> {
    if (this.#starting || this.#closed) {
      throw new InvalidRequestError(
        "lease store can be started once, and not after close()",
      );
    }
    this.#starting = true;

    const kvm = new Kvm(this.#options.nc);
    this.#kv = await this.#retry("open lease bucket", () =>
      kvm.create(this.#options.bucket, {
        history: this.#options.history ?? 5,
        replicas: this.#options.replicas ?? 1,
        // Reads decide ownership: with replicas, a direct get may be
        // served by a follower that lags; reads through the leader do not.
        allow_direct: false,
      }),
    );
    this.#writer = createKeyWriter(
      this.#options.nc,
      this.#options.bucket,
      this.#kv,
    );
    await this.#startWatch(this.#kv);
    await this.#retry("read lease bucket", () => this.#sync());

    const report =
      this.#options.reconcile === false
        ? { created: [], present: this.#pool.length, orphans: this.#orphans() }
        : await this.#reconcile();
    this.#log.info(
      {
        created: report.created.length,
        present: report.present,
        orphans: report.orphans.map((lease) => lease.record.ip),
      },
      "lease pool reconciled",
    );
    return report;
  }

  async acquire(
    claim: ClaimRequest,
    options: AcquireOptions = {},
  ): Promise<{ lease: Lease; existing: boolean }> {
    const kv = this.#requireKv();
    checkClaim(claim);
    const exclude = canonicalSet(options.exclude);
    const key = allocationKey(claim.allocationId);
    const token = randomUUID();
    const log = this.#log.child({
      allocationId: claim.allocationId,
      requestId: claim.requestId,
    });
    let pending: { revision: number; seenAt: number } | undefined;
    let phantomRefusals = 0;

    for (let round = 0; round < maxRounds; round += 1) {
      const entry = await this.#readEntry(kv, key);
      const index =
        entry === undefined ? undefined : parseAllocationIndex(entry.value);

      if (index?.ip !== undefined) {
        const lease = await this.#readLease(kv, index.ip);
        if (isLiveFor(lease, claim.allocationId)) {
          log.debug({ ip: index.ip }, "lease exists for allocation");
          return { lease, existing: true };
        }
      } else if (entry !== undefined && index !== undefined) {
        // Another acquire of this allocation is choosing an IP, or died
        // while choosing: wait for it, then take over.
        if (pending?.revision !== entry.revision) {
          pending = { revision: entry.revision, seenAt: Date.now() };
        }
        if (Date.now() - pending.seenAt < this.#pendingTimeoutMs) {
          await delay(pendingPollMs);
          continue;
        }
        const adopted = await this.#adoptAbandoned(kv, claim, entry, log);
        if (adopted === "retry") {
          continue;
        }
        if (adopted !== undefined) {
          return { lease: adopted, existing: true };
        }
      }

      // No live lease: this acquire chooses. Make sure it can before
      // writing anything, so an exhausted pool is left as it was.
      await this.#requireFree(exclude);
      const own: AllocationIndex = {
        allocationId: claim.allocationId,
        token,
        requestId: claim.requestId,
        since: now(),
      };
      let indexRevision = await this.#writeKey(kv, key, own, entry?.revision);
      if (indexRevision === undefined && entry === undefined) {
        phantomRefusals += 1;
        if (phantomRefusals >= phantomLimit) {
          indexRevision = await this.#putIndexAnyway(kv, key, own, log);
        }
      }
      if (indexRevision === undefined) {
        continue;
      }
      const outcome = await this.#claimForIndex(
        kv,
        claim,
        exclude,
        own,
        indexRevision,
        log,
      );
      if (!("retry" in outcome)) {
        return outcome;
      }
    }
    throw new UnavailableError(
      `acquire for allocation ${claim.allocationId} did not settle after ${maxRounds} rounds of lost races`,
    );
  }

  /**
   * nats-server 2.9 in a cluster can be left, after a write timed out
   * during a leader change, refusing every create of a key that every read
   * shows absent (seen in the 3-node fault test: an allocation stuck for
   * over a minute). The index entry is then written without the
   * compare-and-swap; the IP claim that follows still is one, and
   * #claimForIndex gives the IP back if another acquire of this allocation
   * overtakes this one. Issue #5.
   */
  async #putIndexAnyway(
    kv: KV,
    key: string,
    own: AllocationIndex,
    log: Logger,
  ): Promise<number> {
    log.warn(
      { key },
      "the server refuses to create an allocation entry it reads as absent; writing it without compare-and-swap",
    );
    try {
      return await kv.put(key, encodeJson(own));
    } catch (error) {
      throw unavailable(`write ${key}`, error);
    }
  }

  async markReady(
    ip: string,
    allocationId: string,
    hostKey: { type: string; fingerprint: string },
    delivered?: { userDataSha256: string },
  ): Promise<Lease> {
    const kv = this.#requireKv();
    const canonical = requireIp(ip);
    checkAllocationId(allocationId);
    const hostKeySeen = {
      type: hostKey.type,
      fingerprint: hostKey.fingerprint,
    };

    const lease = await this.#mutate(kv, canonical, (current) => {
      const record = this.#requireKnown(canonical, current)?.record;
      if (
        record?.allocationId !== allocationId ||
        !liveStates.has(record.state)
      ) {
        throw notOwner(canonical, record, allocationId);
      }
      if (record.state === LeaseState.Ready) {
        return { done: current };
      }
      return {
        write: withState(record, LeaseState.Ready, now(), {
          hostKey: hostKeySeen,
          agent: this.#options.agent,
          ...(delivered ? { userDataSha256: delivered.userDataSha256 } : {}),
        }),
      };
    });
    this.#log.info({ ip: canonical, allocationId }, "lease ready");
    return required(lease);
  }

  async quarantine(
    ip: string,
    reason: string,
    options: { expectAllocationId?: string; replaceReason?: boolean } = {},
  ): Promise<Lease> {
    const kv = this.#requireKv();
    const canonical = requireIp(ip);
    const expected = options.expectAllocationId;

    const lease = await this.#mutate(kv, canonical, (current) => {
      const record = this.#requireKnown(canonical, current)?.record;
      if (record?.state === LeaseState.Quarantined) {
        if (options.replaceReason !== true || record.reason === reason) {
          return { done: current };
        }
        // Same state, same since: only who says why changes.
        return {
          write: {
            ...record,
            reason: String(reason),
            agent: this.#options.agent,
            updatedAt: now(),
          },
        };
      }
      if (
        expected !== undefined &&
        record?.allocationId !== undefined &&
        record.allocationId !== expected
      ) {
        throw notOwner(canonical, record, expected);
      }
      const changes = { reason: String(reason), agent: this.#options.agent };
      return {
        write:
          record === undefined
            ? {
                ...freeRecord(canonical, now()),
                ...changes,
                state: LeaseState.Quarantined,
              }
            : withState(record, LeaseState.Quarantined, now(), changes),
      };
    });

    const result = required(lease);
    this.#log.warn(
      { ip: canonical, allocationId: result.record.allocationId, reason },
      "lease quarantined",
    );
    await this.#unbind(kv, canonical, result.record.allocationId);
    return result;
  }

  async beginRelease(
    ip: string,
    allocationId?: string,
    requestId?: string,
  ): Promise<Lease | undefined> {
    const kv = this.#requireKv();
    const canonical = requireIp(ip);
    if (allocationId !== undefined) {
      checkAllocationId(allocationId);
    }

    const lease = await this.#mutate(kv, canonical, (current) => {
      const record = current?.record;
      if (record === undefined || record.state === LeaseState.Free) {
        return { done: undefined };
      }
      if (record.state === LeaseState.Quarantined) {
        return { done: current };
      }
      if (allocationId !== undefined && record.allocationId !== allocationId) {
        throw notOwner(canonical, record, allocationId);
      }
      if (record.state === LeaseState.Releasing) {
        return { done: current };
      }
      return {
        write: withState(
          record,
          LeaseState.Releasing,
          now(),
          requestId === undefined ? {} : { releaseRequestId: requestId },
        ),
      };
    });
    if (lease?.record.state === LeaseState.Releasing) {
      this.#log.info(
        { ip: canonical, allocationId: lease.record.allocationId },
        "lease releasing",
      );
    }
    return lease;
  }

  async free(ip: string, options: FreeOptions = {}): Promise<Lease> {
    const kv = this.#requireKv();
    const canonical = requireIp(ip);
    const from = new Set(options.from ?? [LeaseState.Releasing]);
    let previousOwner: string | undefined;

    const lease = await this.#mutate(kv, canonical, (current) => {
      const record = this.#requireKnown(canonical, current)?.record;
      if (record?.state === LeaseState.Free) {
        return { done: current };
      }
      if (record !== undefined && !from.has(record.state)) {
        throw new NotOwnerError(
          `lease on ${canonical} is ${record.state}${ownerText(record)}, not ${[...from].join(" or ")}; not freed`,
        );
      }
      if (
        options.allocationId !== undefined &&
        record?.allocationId !== options.allocationId
      ) {
        throw notOwner(canonical, record, options.allocationId);
      }
      previousOwner = record?.allocationId;
      return { write: freeRecord(canonical, now(), options.reason) };
    });

    this.#log.info(
      { ip: canonical, allocationId: previousOwner, reason: options.reason },
      "lease freed",
    );
    await this.#unbind(kv, canonical, previousOwner);
    return required(lease);
  }

  forceRelease(ip: string): Promise<Lease> {
    return this.free(ip, { from: allLeaseStates, reason: "force-release" });
  }

  unquarantine(ip: string): Promise<Lease> {
    return this.free(ip, {
      from: [LeaseState.Quarantined],
      reason: "unquarantine",
    });
  }

  async get(ip: string): Promise<Lease | undefined> {
    const kv = this.#requireKv();
    return this.#readLease(kv, requireIp(ip));
  }

  async findByAllocation(allocationId: string): Promise<Lease | undefined> {
    const kv = this.#requireKv();
    checkAllocationId(allocationId);

    const entry = await this.#readEntry(kv, allocationKey(allocationId));
    const index =
      entry === undefined ? undefined : parseAllocationIndex(entry.value);
    if (index?.ip !== undefined) {
      const lease = await this.#readLease(kv, index.ip);
      if (isOwnedBy(lease, allocationId)) {
        return lease;
      }
    }
    return this.#scanOwned(kv, allocationId, ownedStates);
  }

  async list(): Promise<Lease[]> {
    this.#requireKv();
    await this.#sync();
    const leases: Lease[] = [];
    for (const ip of this.#pool) {
      const lease = this.#cache.get(ip);
      if (lease !== undefined) {
        leases.push(lease);
      }
    }
    return [...leases, ...this.#orphans()];
  }

  async counts(): Promise<Record<LeaseState, number>> {
    const counts = emptyCounts();
    for (const lease of await this.list()) {
      counts[lease.record.state] += 1;
    }
    return counts;
  }

  async close(): Promise<void> {
    if (this.#closed) {
      return;
    }
    this.#closed = true;
    this.#cache.close(new UnavailableError("lease store is closed"));
    try {
      this.#watch?.stop();
      await this.#watchLoop;
    } catch (error) {
      this.#log.warn({ err: errorFields(error) }, "lease watch stop failed");
    }
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  // --- start-up ---

  async #startWatch(kv: KV): Promise<void> {
    const watch = await this.#retry("watch lease bucket", () =>
      kv.watch({ key: ">" }),
    );
    this.#watch = watch;
    this.#watchLoop = (async () => {
      try {
        for await (const entry of watch) {
          this.#onWatchEntry(entry);
        }
      } catch (error) {
        this.#log.error({ err: errorFields(error) }, "lease watch failed");
      }
      if (this.#watch !== watch) {
        return; // replaced by a fresh watch; see #restartWatch
      }
      this.#cache.close(new UnavailableError("lease watch ended"));
      if (!this.#closed) {
        this.#log.error("lease watch ended while the store is open");
      }
    })();
  }

  #onWatchEntry(entry: KvWatchEntry): void {
    if (entry.key.startsWith(LeaseKeyPrefix.Ip)) {
      const ip = decodeIpKey(entry.key.slice(LeaseKeyPrefix.Ip.length));
      const lease = toLease(ip, entry);
      if (lease === undefined) {
        this.#cache.remove(ip, entry.revision);
      } else {
        this.#cache.put(ip, lease);
      }
    }
    this.#cache.watched(entry.revision);
  }

  async #reconcile(): Promise<ReconcileReport> {
    const kv = this.#requireKv();
    const missing = this.#pool.filter(
      (ip) => this.#cache.get(ip) === undefined,
    );
    const created: string[] = [];

    for (let start = 0; start < missing.length; start += reconcileParallelism) {
      const batch = missing.slice(start, start + reconcileParallelism);
      const results = await Promise.all(
        batch.map((ip) =>
          this.#retry(`create lease key for ${ip}`, async () => {
            const record = freeRecord(ip, now());
            const revision = await this.#writeKey(kv, leaseKey(ip), record);
            if (revision !== undefined) {
              this.#cache.put(ip, { record, revision });
            }
            return revision !== undefined;
          }),
        ),
      );
      batch.forEach((ip, position) => {
        if (results[position] === true) {
          created.push(ip);
        }
      });
    }

    // Keys another agent created meanwhile arrive through the watch.
    await this.#sync();
    const orphans = this.#orphans();
    for (const orphan of orphans) {
      this.#log.warn(
        { ip: orphan.record.ip, state: orphan.record.state },
        "lease of an IP not in the pool (kept)",
      );
    }
    return {
      created,
      present: this.#pool.length - created.length,
      orphans,
    };
  }

  async #retry<T>(action: string, step: () => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await step();
      } catch (error) {
        if (attempt >= startAttempts || this.#closed) {
          throw unavailable(action, error);
        }
        this.#log.warn(
          { err: errorFields(error), attempt },
          `${action} failed`,
        );
        await delay(100 * 2 ** attempt);
      }
    }
  }

  // --- acquire ---

  /**
   * Claims a free IP for the allocation whose index entry this acquire
   * holds at `indexRevision`, then points the index at it. If the entry was
   * taken over meanwhile, gives the IP back (unless the taker adopted it).
   */
  async #claimForIndex(
    kv: KV,
    claim: ClaimRequest,
    exclude: ReadonlySet<string>,
    own: AllocationIndex,
    indexRevision: number,
    log: Logger,
  ): Promise<ClaimOutcome> {
    const key = allocationKey(claim.allocationId);
    const lease = await this.#claimFreeIp(kv, claim, exclude, log);
    if (lease === undefined) {
      await this.#deleteKey(kv, key, indexRevision);
      throw this.#exhausted(exclude);
    }

    const ip = lease.record.ip;
    const pointed = await this.#writeKey(
      kv,
      key,
      { ...own, ip },
      indexRevision,
    );
    if (pointed !== undefined) {
      log.info({ ip }, "lease claimed");
      return { lease, existing: false };
    }

    const entry = await this.#readEntry(kv, key);
    const index =
      entry === undefined ? undefined : parseAllocationIndex(entry.value);
    if (index?.ip === ip) {
      return {
        lease: required(await this.#readLease(kv, ip)),
        existing: false,
      };
    }
    log.info({ ip }, "allocation taken over while claiming; giving IP back");
    await this.#rollbackClaim(kv, lease, claim.allocationId);
    return { retry: true };
  }

  /**
   * CAS free → claimed on the first free IP in candidate order; a lost race
   * re-reads that key and moves on. A second pass after syncing the cache
   * covers IPs freed since it was last read.
   */
  async #claimFreeIp(
    kv: KV,
    claim: ClaimRequest,
    exclude: ReadonlySet<string>,
    log: Logger,
  ): Promise<Lease | undefined> {
    const skip = new Set(exclude);
    for (let pass = 0; pass < 2; pass += 1) {
      if (pass > 0) {
        await this.#sync();
      }
      for (const ip of this.#cache.candidates(claim.allocationId, skip)) {
        skip.add(ip);
        const lease = await this.#claimIp(kv, ip, claim, log);
        if (lease !== undefined) {
          return lease;
        }
        log.debug({ ip }, "IP taken meanwhile");
      }
    }
    return undefined;
  }

  async #claimIp(
    kv: KV,
    ip: string,
    claim: ClaimRequest,
    log: Logger,
  ): Promise<Lease | undefined> {
    let current = this.#cache.get(ip);
    for (let round = 0; round < 3; round += 1) {
      if (current?.record.state !== LeaseState.Free) {
        return undefined;
      }
      const record = claimedRecord(ip, claim, this.#options.agent, now());
      const revision = await this.#writeKey(
        kv,
        leaseKey(ip),
        record,
        current.revision,
      );
      if (revision !== undefined) {
        const lease = { record, revision };
        this.#cache.put(ip, lease);
        return lease;
      }
      log.debug({ ip }, "lost a CAS race for an IP");
      current = await this.#readLease(kv, ip);
    }
    return undefined;
  }

  /**
   * An earlier acquire of this allocation left its index entry without an
   * IP (it died, or is very slow). Adopt a live lease it claimed, if any;
   * undefined means none exists and the caller takes the entry over.
   */
  async #adoptAbandoned(
    kv: KV,
    claim: ClaimRequest,
    entry: KvEntry,
    log: Logger,
  ): Promise<Lease | "retry" | undefined> {
    const lease = await this.#scanOwned(kv, claim.allocationId, liveStates);
    if (lease === undefined) {
      log.warn("taking over an abandoned allocation entry");
      return undefined;
    }
    const index = parseAllocationIndex(entry.value);
    const pointed = await this.#writeKey(
      kv,
      entry.key,
      { ...index, allocationId: claim.allocationId, ip: lease.record.ip },
      entry.revision,
    );
    if (pointed === undefined) {
      return "retry";
    }
    log.warn(
      { ip: lease.record.ip },
      "adopted the lease of an abandoned acquire",
    );
    return lease;
  }

  /** Gives back an IP this acquire claimed but may not keep. */
  async #rollbackClaim(
    kv: KV,
    claimed: Lease,
    allocationId: string,
  ): Promise<void> {
    const ip = claimed.record.ip;
    let current: Lease | undefined = claimed;
    for (let round = 0; round < maxRounds; round += 1) {
      if (
        current?.record.state !== LeaseState.Claimed ||
        current.record.allocationId !== allocationId
      ) {
        return;
      }
      const record = freeRecord(ip, now(), "claim rolled back");
      const revision = await this.#writeKey(
        kv,
        leaseKey(ip),
        record,
        current.revision,
      );
      if (revision !== undefined) {
        this.#cache.put(ip, { record, revision });
        return;
      }
      current = await this.#readLease(kv, ip);
    }
  }

  /** Throws PoolExhaustedError unless the (synced) cache shows a free IP. */
  async #requireFree(exclude: ReadonlySet<string>): Promise<void> {
    if (this.#cache.freeCount(exclude) > 0) {
      return;
    }
    await this.#sync();
    if (this.#cache.freeCount(exclude) === 0) {
      throw this.#exhausted(exclude);
    }
  }

  #exhausted(exclude: ReadonlySet<string>): PoolExhaustedError {
    const counts = emptyCounts();
    for (const ip of this.#pool) {
      const state = this.#cache.get(ip)?.record.state;
      if (state !== undefined) {
        counts[state] += 1;
      }
    }
    const excluded = [...exclude].filter(
      (ip) => this.#cache.get(ip)?.record.state === LeaseState.Free,
    ).length;
    return new PoolExhaustedError(
      `no free IP in the pool of ${this.#pool.length}: ${describeCounts(counts)}` +
        (excluded > 0 ? ` (${excluded} free IPs excluded)` : ""),
    );
  }

  // --- shared steps ---

  /**
   * Read, decide, CAS; a lost race re-reads and decides again. `decide`
   * may throw to refuse.
   */
  async #mutate(
    kv: KV,
    ip: string,
    decide: (current: Lease | undefined) => Decision,
  ): Promise<Lease | undefined> {
    for (let round = 0; round < maxRounds; round += 1) {
      const current = await this.#readLease(kv, ip);
      const decision = decide(current);
      if ("done" in decision) {
        return decision.done;
      }
      const revision = await this.#writeKey(
        kv,
        leaseKey(ip),
        decision.write,
        current?.revision,
      );
      if (revision !== undefined) {
        const lease = { record: decision.write, revision };
        this.#cache.put(ip, lease);
        return lease;
      }
    }
    throw new UnavailableError(
      `lease on ${ip} changed on every one of ${maxRounds} attempts`,
    );
  }

  /** Refuses an IP that is neither in the pool nor in the bucket. */
  #requireKnown(ip: string, current: Lease | undefined): Lease | undefined {
    if (current === undefined && !this.#poolSet.has(ip)) {
      throw new InvalidRequestError(
        `ip ${ip} is not in the pool and has no lease`,
      );
    }
    return current;
  }

  /** Removes the allocation's index entry if it still points at `ip`. */
  async #unbind(
    kv: KV,
    ip: string,
    allocationId: string | undefined,
  ): Promise<void> {
    if (allocationId === undefined) {
      return;
    }
    try {
      const key = allocationKey(allocationId);
      const entry = await this.#readEntry(kv, key);
      if (entry !== undefined && parseAllocationIndex(entry.value)?.ip === ip) {
        await this.#deleteKey(kv, key, entry.revision);
      }
    } catch (error) {
      // A stale index entry is harmless: acquire checks the lease it names.
      this.#log.warn(
        { err: errorFields(error), ip, allocationId },
        "could not remove allocation index entry",
      );
    }
  }

  /** A lease in `states` owned by the allocation, verified by a fresh read. */
  async #scanOwned(
    kv: KV,
    allocationId: string,
    states: ReadonlySet<LeaseState>,
  ): Promise<Lease | undefined> {
    await this.#sync();
    for (const cached of this.#cache.leases()) {
      if (
        cached.record.allocationId === allocationId &&
        states.has(cached.record.state)
      ) {
        const lease = await this.#readLease(kv, cached.record.ip);
        if (
          lease?.record.allocationId === allocationId &&
          states.has(lease.record.state)
        ) {
          return lease;
        }
      }
    }
    return undefined;
  }

  /** Waits until the cache holds everything the bucket held at the call. */
  async #sync(): Promise<void> {
    const kv = this.#requireKv();
    let lastSeq: number;
    let messages: number;
    try {
      const status = await kv.status();
      lastSeq = status.streamInfo.state.last_seq;
      messages = status.streamInfo.state.messages;
    } catch (error) {
      throw unavailable("read lease bucket status", error);
    }
    if (messages === 0) {
      return;
    }
    try {
      await this.#cache.caughtUp(lastSeq, this.#syncTimeoutMs);
    } catch (error) {
      if (this.#closed) {
        throw error;
      }
      // A watch whose consumer lived on a server that died can lag for a
      // long time; a fresh one replays the bucket (the cache keeps only
      // newer revisions, so replaying is safe).
      this.#log.warn(
        { err: errorFields(error), revision: lastSeq },
        "lease watch is behind; restarting it",
      );
      await this.#restartWatch(kv);
      await this.#cache.caughtUp(lastSeq, this.#syncTimeoutMs);
    }
  }

  async #restartWatch(kv: KV): Promise<void> {
    const previous = this.#watch;
    const previousLoop = this.#watchLoop;
    await this.#startWatch(kv);
    previous?.stop();
    await previousLoop;
  }

  #orphans(): Lease[] {
    const orphans: Lease[] = [];
    for (const lease of this.#cache.leases()) {
      if (!this.#poolSet.has(lease.record.ip)) {
        orphans.push(lease);
      }
    }
    return orphans;
  }

  async #readLease(kv: KV, ip: string): Promise<Lease | undefined> {
    const entry = await this.#readEntry(kv, leaseKey(ip));
    if (entry === undefined) {
      return undefined;
    }
    const lease = toLease(ip, entry);
    if (lease !== undefined) {
      this.#cache.put(ip, lease);
    }
    return lease;
  }

  /** The entry of `key`; undefined when missing or deleted. */
  async #readEntry(kv: KV, key: string): Promise<KvEntry | undefined> {
    let entry: KvEntry | null;
    try {
      entry = await kv.get(key);
    } catch (error) {
      throw unavailable(`read ${key}`, error);
    }
    if (entry === null || entry.operation !== "PUT") {
      return undefined;
    }
    return entry;
  }

  /**
   * Creates `key` (no `revision`) or replaces it at `revision`. Returns the
   * new revision, or undefined when the key changed meanwhile.
   *
   * Each write is exclusive across agents on every server version (see
   * cas.ts). One write in flight per key from this process on top of that:
   * workers of one agent that lose a race to each other cost a round trip
   * each, and queueing them costs none.
   */
  #writeKey(
    kv: KV,
    key: string,
    value: unknown,
    revision?: number,
  ): Promise<number | undefined> {
    const previous = this.#writesInFlight.get(key) ?? Promise.resolve();
    const write = previous.then(() =>
      this.#requireWriter(kv).put(key, encodeJson(value), revision),
    );
    const settled = write.then(
      () => undefined,
      () => undefined,
    );
    this.#writesInFlight.set(key, settled);
    void settled.then(() => {
      if (this.#writesInFlight.get(key) === settled) {
        this.#writesInFlight.delete(key);
      }
    });
    return write;
  }

  /** Deletes `key` if it is still at `revision`; a lost race is fine. */
  async #deleteKey(kv: KV, key: string, revision: number): Promise<void> {
    await this.#requireWriter(kv).delete(key, revision);
  }

  #requireWriter(kv: KV): KeyWriter {
    if (this.#writer === undefined || kv !== this.#kv) {
      throw new UnavailableError("lease store is not started");
    }
    return this.#writer;
  }

  #requireKv(): KV {
    if (this.#closed) {
      throw new UnavailableError("lease store is closed");
    }
    if (this.#kv === undefined) {
      throw new UnavailableError("lease store is not started");
    }
    return this.#kv;
  }
}

function canonicalPool(pool: readonly string[]): string[] {
  const seen = new Set<string>();
  for (const ip of pool) {
    const canonical = requireIp(ip);
    if (seen.has(canonical)) {
      throw new InvalidRequestError(`pool lists ${canonical} twice`);
    }
    seen.add(canonical);
  }
  return [...seen];
}

function canonicalSet(ips: ReadonlySet<string> | undefined): Set<string> {
  const result = new Set<string>();
  for (const ip of ips ?? []) {
    result.add(requireIp(ip));
  }
  return result;
}

/**
 * A stored entry as a lease; a value that is not a lease record reads as
 * quarantined (never leased, visible to the operator, fixed by
 * forceRelease). Undefined for a delete marker.
 */
function toLease(ip: string, entry: KvEntry): Lease | undefined {
  if (entry.operation !== "PUT") {
    return undefined;
  }
  const record = parseLeaseRecord(entry.value, ip) ?? {
    ip,
    state: LeaseState.Quarantined,
    reason: unreadableReason,
    since: entry.created.toISOString(),
    updatedAt: entry.created.toISOString(),
  };
  return { record, revision: entry.revision };
}

function isLiveFor(
  lease: Lease | undefined,
  allocationId: string,
): lease is Lease {
  return (
    lease?.record.allocationId === allocationId &&
    liveStates.has(lease.record.state)
  );
}

function isOwnedBy(
  lease: Lease | undefined,
  allocationId: string,
): lease is Lease {
  return (
    lease?.record.allocationId === allocationId &&
    ownedStates.has(lease.record.state)
  );
}

function notOwner(
  ip: string,
  record: LeaseRecord | undefined,
  allocationId: string,
): NotOwnerError {
  const state = record?.state ?? "missing";
  if (record?.allocationId === allocationId) {
    // The allocation's own lease, in a state this step cannot act on.
    return new NotOwnerError(
      `lease on ${ip} of allocation ${allocationId} is ${state}, not claimed (deleted meanwhile?)`,
    );
  }
  return new NotOwnerError(
    `lease on ${ip} is ${state}${record === undefined ? "" : ownerText(record)}, not held by allocation ${allocationId}`,
  );
}

function ownerText(record: LeaseRecord): string {
  return record.allocationId === undefined
    ? ""
    : ` for allocation ${record.allocationId}`;
}

function required(lease: Lease | undefined): Lease {
  if (lease === undefined) {
    throw new UnavailableError("lease vanished while it was being changed");
  }
  return lease;
}

function now(): string {
  return new Date().toISOString();
}
