/**
 * The IP pool as leases in a JetStream KV bucket (DESIGN §5): one key per
 * pool IP plus an index key per allocation id; every state change is a
 * compare-and-swap on the key's revision.
 */
import { KvLeaseStore } from "./store.js";
import type { LeaseStore, LeaseStoreOptions } from "./types.js";

export type {
  AcquireOptions,
  ClaimRequest,
  FreeOptions,
  Lease,
  LeaseRecord,
  LeaseStore,
  LeaseStoreOptions,
  ReconcileReport,
} from "./types.js";

/**
 * Makes a lease store on `options.bucket`; nothing happens until
 * `start()`. Throws InvalidRequestError for a pool entry that is not an
 * IP address or is listed twice.
 */
export function createLeaseStore(options: LeaseStoreOptions): LeaseStore {
  return new KvLeaseStore(options);
}

export { createKeyWriter, transitionId, type KeyWriter } from "./cas.js";
export { isLostRace } from "./kv.js";
