/**
 * The upstream BYOM provider's pool design, for comparison: the whole pool
 * is one document (allocated map + free list) updated by compare-and-swap
 * on the document's revision, re-reading it after a lost race. Here it is
 * one key of a JetStream KV bucket (upstream: one ConfigMap updated with
 * optimistic locking on resourceVersion), implemented correctly: every
 * update names the revision it read, and a "wrong last sequence" answer
 * (JetStream API code 10071) means re-read and decide again.
 *
 * Selection is the same as ours and upstream's: MD5 of the allocation id
 * over the free list (`preferredIndex`).
 */
import { JetStreamApiCodes, JetStreamApiError } from "@nats-io/jetstream";
import { Kvm, type KV } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";

import { preferredIndex } from "../src/protocol/index.js";

/** The stored document. */
interface PoolDocument {
  /** allocation id → IP */
  allocated: Record<string, string>;
  /** Free IPs; released ones are appended, as upstream does. */
  free: string[];
}

/** Counters of one allocator. */
export interface DocumentPoolStats {
  /** Updates refused because the document changed since it was read. */
  conflicts: number;
  /** Re-reads after a refused update (one per conflict). */
  retries: number;
}

/** One allocator's handle on the single-document pool. */
export interface DocumentPool {
  readonly stats: DocumentPoolStats;
  /** Returns the IP leased to `allocationId` (the same one if it has one). */
  allocate(allocationId: string): Promise<string>;
  /** Puts the allocation's IP back on the free list; false if it had none. */
  release(allocationId: string): Promise<boolean>;
}

const documentKey = "pool";
const encoder = new TextEncoder();
const decoder = new TextDecoder();
/** Rounds before an operation gives up (a live-lock guard, never hit in practice). */
const maxRounds = 10_000;

/** Creates (or replaces) the bucket's pool document with every IP free. */
export async function seedDocumentPool(
  nc: NatsConnection,
  bucket: string,
  pool: readonly string[],
  history = 5,
): Promise<void> {
  const kv = await new Kvm(nc).create(bucket, { history });
  const document: PoolDocument = { allocated: {}, free: [...pool] };
  await kv.put(documentKey, encoder.encode(JSON.stringify(document)));
}

/** Opens the pool document in `bucket` on its own connection. */
export async function openDocumentPool(
  nc: NatsConnection,
  bucket: string,
): Promise<DocumentPool> {
  const kv = await new Kvm(nc).open(bucket);
  const stats: DocumentPoolStats = { conflicts: 0, retries: 0 };

  return {
    stats,
    allocate: (allocationId) =>
      change(kv, stats, (document) => {
        const existing = document.allocated[allocationId];
        if (existing !== undefined) {
          return { result: existing };
        }
        const index = preferredIndex(allocationId, document.free.length);
        if (index < 0) {
          throw new Error("pool exhausted");
        }
        const ip = document.free[index]!;
        document.free.splice(index, 1);
        document.allocated[allocationId] = ip;
        return { result: ip, write: true };
      }),
    release: (allocationId) =>
      change(kv, stats, (document) => {
        const ip = document.allocated[allocationId];
        if (ip === undefined) {
          return { result: false };
        }
        delete document.allocated[allocationId];
        document.free.push(ip);
        return { result: true, write: true };
      }),
  };
}

/** Read, decide, CAS; re-read on a lost race. */
async function change<T>(
  kv: KV,
  stats: DocumentPoolStats,
  decide: (document: PoolDocument) => { result: T; write?: boolean },
): Promise<T> {
  for (let round = 0; round < maxRounds; round += 1) {
    const entry = await kv.get(documentKey);
    if (entry === null) {
      throw new Error("pool document missing");
    }
    const document = JSON.parse(decoder.decode(entry.value)) as PoolDocument;
    const { result, write } = decide(document);
    if (write !== true) {
      return result;
    }
    try {
      await kv.update(
        documentKey,
        encoder.encode(JSON.stringify(document)),
        entry.revision,
      );
      return result;
    } catch (error) {
      if (!isWrongLastSequence(error)) {
        throw error;
      }
      stats.conflicts += 1;
      stats.retries += 1;
    }
  }
  throw new Error(`pool document changed on each of ${maxRounds} rounds`);
}

function isWrongLastSequence(error: unknown): boolean {
  return (
    error instanceof JetStreamApiError &&
    error.code === JetStreamApiCodes.StreamWrongLastSequence
  );
}
