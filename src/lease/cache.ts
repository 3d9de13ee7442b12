import { UnavailableError } from "../errors/index.js";
import { LeaseState, preferredIndex } from "../protocol/index.js";
import { FreePositions } from "./free-positions.js";
import type { Lease } from "./types.js";

interface Slot {
  /** undefined: the key was deleted at `revision`. */
  readonly lease: Lease | undefined;
  readonly revision: number;
}

interface Waiter {
  readonly revision: number;
  readonly resolve: () => void;
  readonly reject: (error: Error) => void;
  readonly timer: NodeJS.Timeout;
}

/**
 * The last known lease per IP, fed by the bucket watch and by this store's
 * own writes. Only a hint for selection: every write is a CAS, so a stale
 * slot costs a lost race, never a wrong owner. A slot only moves forward
 * in revision, whichever source reports first.
 *
 * It also keeps which pool IPs are free, updated on every change, so that
 * choosing an IP costs O(log pool) rather than a scan of the pool.
 */
export class LeaseCache {
  readonly #slots = new Map<string, Slot>();
  readonly #pool: readonly string[];
  readonly #positions = new Map<string, number>();
  readonly #free: FreePositions;
  #watched = 0;
  #waiters: Waiter[] = [];
  #closedError: Error | undefined;

  /** `pool`: canonical IPs in pool order, the order candidates follow. */
  constructor(pool: readonly string[] = []) {
    this.#pool = [...pool];
    this.#pool.forEach((ip, position) => this.#positions.set(ip, position));
    this.#free = new FreePositions(this.#pool.length);
  }

  /** The lease of `ip` as last seen, or undefined. */
  get(ip: string): Lease | undefined {
    return this.#slots.get(ip)?.lease;
  }

  /** Every IP with a live key, in no particular order. */
  *leases(): IterableIterator<Lease> {
    for (const slot of this.#slots.values()) {
      if (slot.lease !== undefined) {
        yield slot.lease;
      }
    }
  }

  /** Records a lease read or written at its revision, unless older. */
  put(ip: string, lease: Lease): void {
    this.#apply(ip, { lease, revision: lease.revision });
  }

  /** Records that the key of `ip` was deleted at `revision`. */
  remove(ip: string, revision: number): void {
    this.#apply(ip, { lease: undefined, revision });
  }

  /** Free pool IPs outside `exclude`. */
  freeCount(exclude: ReadonlySet<string>): number {
    return this.#free.count - this.#excludedFree(exclude).length;
  }

  /**
   * Free pool IPs outside `exclude` in the order acquire tries them: the
   * upstream pick (`preferredIndex` over the free IPs in pool order), then
   * the next free ones in pool order, wrapping, once round. Lazy: each step
   * reads the cache as it is then, so an IP taken while the caller was
   * trying the previous one is passed over; `exclude` is consulted at
   * every step, so the caller may add to it as it goes.
   */
  *candidates(
    allocationId: string,
    exclude: ReadonlySet<string>,
  ): Generator<string, void, undefined> {
    const excluded = this.#excludedFree(exclude);
    const pick = preferredIndex(
      allocationId,
      this.#free.count - excluded.length,
    );
    const first = pick < 0 ? -1 : this.#nthOutside(pick, excluded);
    if (first < 0) {
      return;
    }

    let cursor = first;
    let wrapped = false;
    for (;;) {
      const position = this.#free.nextFrom(cursor);
      if (position < 0 || (wrapped && position >= first)) {
        if (wrapped) {
          return;
        }
        wrapped = true;
        cursor = 0;
        continue;
      }
      cursor = position + 1;
      const ip = this.#pool[position]!;
      if (!exclude.has(ip)) {
        yield ip;
      }
    }
  }

  /** The watch has delivered everything up to stream sequence `revision`. */
  watched(revision: number): void {
    if (revision <= this.#watched) {
      return;
    }
    this.#watched = revision;
    const waiting: Waiter[] = [];
    for (const waiter of this.#waiters) {
      if (waiter.revision <= revision) {
        clearTimeout(waiter.timer);
        waiter.resolve();
      } else {
        waiting.push(waiter);
      }
    }
    this.#waiters = waiting;
  }

  /**
   * Resolves once the watch has delivered stream sequence `revision`;
   * UnavailableError after `timeoutMs` or when the cache is closed.
   */
  caughtUp(revision: number, timeoutMs: number): Promise<void> {
    if (this.#closedError !== undefined) {
      return Promise.reject(this.#closedError);
    }
    if (revision <= this.#watched) {
      return Promise.resolve();
    }
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters = this.#waiters.filter((item) => item !== waiter);
        reject(
          new UnavailableError(
            `lease watch did not reach revision ${revision} within ${timeoutMs} ms (at ${this.#watched})`,
          ),
        );
      }, timeoutMs);
      const waiter: Waiter = { revision, resolve, reject, timer };
      this.#waiters.push(waiter);
    });
  }

  /** Fails every waiter now and later with `error`. */
  close(error: Error): void {
    this.#closedError ??= error;
    for (const waiter of this.#waiters) {
      clearTimeout(waiter.timer);
      waiter.reject(this.#closedError);
    }
    this.#waiters = [];
  }

  #apply(ip: string, slot: Slot): void {
    const current = this.#slots.get(ip);
    if (current !== undefined && current.revision >= slot.revision) {
      return;
    }
    this.#slots.set(ip, slot);
    const position = this.#positions.get(ip);
    if (position !== undefined) {
      this.#free.set(position, slot.lease?.record.state === LeaseState.Free);
    }
  }

  /** Positions of the free pool IPs in `exclude`, ascending. */
  #excludedFree(exclude: ReadonlySet<string>): number[] {
    const positions: number[] = [];
    for (const ip of exclude) {
      const position = this.#positions.get(ip);
      if (position !== undefined && this.#free.has(position)) {
        positions.push(position);
      }
    }
    return positions.sort((left, right) => left - right);
  }

  /**
   * The position of the `rank`-th free IP (from 0) when the free positions
   * `excluded` (ascending) are left out: each one at or before the target
   * pushes it one further.
   */
  #nthOutside(rank: number, excluded: readonly number[]): number {
    let target = rank;
    for (const position of excluded) {
      if (this.#free.countBefore(position) > target) {
        break;
      }
      target += 1;
    }
    return this.#free.nth(target);
  }
}
