/**
 * Compare-and-swap writes of lease-bucket keys that stay exclusive on a
 * replicated stream of nats-server 2.9 as well.
 *
 * A KV update carries the revision it expects. nats-server 2.9 checks that
 * revision, on a replicated stream, only on the leader before proposing the
 * write, against what it has stored so far: two updates proposed together
 * with the same expected revision both pass and both succeed (measured: 29
 * of 100 pairs on a 3-node 2.9.10 cluster). Message de-duplication, on the
 * other hand, is decided when each replica applies the write, in log order.
 * So every update also carries `Nats-Msg-Id: <key>@<expected revision>`:
 * the first write of that transition to be applied wins everywhere, a
 * second one is refused as a duplicate of the first and reported here as
 * a lost race. (A duplicate can also be this process's own write whose
 * answer was lost; the caller re-reads either way and finds it.) Creates (expected revision 0) are checked at apply time by 2.9
 * already and carry no message id: a key purged and created again within
 * the duplicate window would otherwise be refused.
 */
import { jetstream, type JetStreamClient } from "@nats-io/jetstream";
import type { KV } from "@nats-io/kv";
import { headers, type NatsConnection } from "@nats-io/transport-node";

import { LeaseWriteHeader } from "../protocol/index.js";
import { isLostRace, unavailable } from "./kv.js";

/** KV operation marker of a delete, as nats.js writes and reads it. */
const deleteOperation = "DEL";

/** Exclusive writes of one bucket's keys. */
export interface KeyWriter {
  /**
   * Creates `key` (no `revision`) or replaces it at `revision`. Resolves
   * the new revision, or undefined when the key changed meanwhile (re-read
   * and decide again). Rejects with UNAVAILABLE on a NATS failure.
   */
  put(
    key: string,
    value: Uint8Array,
    revision?: number,
  ): Promise<number | undefined>;
  /** Deletes `key` at `revision`; false when the key changed meanwhile. */
  delete(key: string, revision: number): Promise<boolean>;
}

/** The writer of `bucket`'s keys; `kv` is that bucket, used for reads. */
export function createKeyWriter(
  nc: NatsConnection,
  bucket: string,
  kv: KV,
): KeyWriter {
  return new BucketKeyWriter(nc, bucket, kv);
}

/** `Nats-Msg-Id` of the transition of `key` away from `revision`. */
export function transitionId(key: string, revision: number): string {
  return `${key}@${revision}`;
}

class BucketKeyWriter implements KeyWriter {
  readonly #js: JetStreamClient;
  readonly #subjectPrefix: string;
  readonly #kv: KV;

  constructor(nc: NatsConnection, bucket: string, kv: KV) {
    this.#js = jetstream(nc);
    this.#subjectPrefix = `$KV.${bucket}.`;
    this.#kv = kv;
  }

  async put(
    key: string,
    value: Uint8Array,
    revision?: number,
  ): Promise<number | undefined> {
    if (revision !== undefined && revision > 0) {
      return this.#publish(key, value, revision);
    }
    const created = await this.#publish(key, value, 0);
    if (created !== undefined) {
      return created;
    }
    // Refused: the key exists, or its last value is a delete marker, which
    // counts as absent and is replaced like any other revision.
    let entry;
    try {
      entry = await this.#kv.get(key);
    } catch (error) {
      throw unavailable(`read ${key}`, error);
    }
    if (entry === null || entry.operation === "PUT") {
      return undefined;
    }
    return this.#publish(key, value, entry.revision);
  }

  async delete(key: string, revision: number): Promise<boolean> {
    const written = await this.#publish(key, new Uint8Array(0), revision, {
      [LeaseWriteHeader.Operation]: deleteOperation,
    });
    return written !== undefined;
  }

  /**
   * Writes `key` at `revision`, de-duplicated by transition when
   * `revision` > 0. Resolves the new revision, or undefined for a lost race.
   */
  async #publish(
    key: string,
    value: Uint8Array,
    revision: number,
    extraHeaders: Record<string, string> = {},
  ): Promise<number | undefined> {
    const marks = headers();
    for (const [name, text] of Object.entries(extraHeaders)) {
      marks.set(name, text);
    }
    try {
      const ack = await this.#js.publish(this.#subjectPrefix + key, value, {
        headers: marks,
        expect: { lastSubjectSequence: revision },
        ...(revision > 0 ? { msgID: transitionId(key, revision) } : {}),
      });
      return ack.duplicate ? undefined : ack.seq;
    } catch (error) {
      if (isLostRace(error)) {
        return undefined;
      }
      throw unavailable(`write ${key}`, error);
    }
  }
}
