import { UnavailableError } from "../errors/index.js";
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
 */
export class LeaseCache {
  readonly #slots = new Map<string, Slot>();
  #watched = 0;
  #waiters: Waiter[] = [];
  #closedError: Error | undefined;

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
    if (current === undefined || current.revision < slot.revision) {
      this.#slots.set(ip, slot);
    }
  }
}
