import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";

import { DirectMsgHeaders } from "@nats-io/jetstream";
import type { KV } from "@nats-io/kv";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";

import type { LeaseStore } from "../../src/lease/index.js";
import type { Result } from "../../src/protocol/index.js";
import type { Sandbox } from "../../src/sandbox/index.js";
import { waitFor } from "./wait.js";

/** sha256 hex of some bytes or text. */
export function sha256(bytes: Uint8Array | string): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/**
 * Counts every result that reaches any inbox of a connection, by request
 * id, so a test can check that each request was answered exactly once.
 */
export interface ResultWatch {
  /** Results seen so far, by request id. */
  readonly answers: ReadonlyMap<string, Result[]>;
  close(): void;
}

/**
 * Watches `_INBOX.>` on `nc` (every inbox in the account, not only this
 * connection's) for results; JetStream acks and stored-message reads are
 * skipped.
 */
export function watchResults(nc: NatsConnection): ResultWatch {
  const answers = new Map<string, Result[]>();
  const subscription: Subscription = nc.subscribe("_INBOX.>");
  void (async () => {
    for await (const message of subscription) {
      // A read of the result bucket (a direct get answered to some inbox)
      // carries the stored result too; it is not an answer.
      if (message.headers?.get(DirectMsgHeaders.Stream)) {
        continue;
      }
      let value: unknown;
      try {
        value = message.json();
      } catch {
        continue;
      }
      const result = value as Partial<Result>;
      if (
        typeof result?.requestId === "string" &&
        typeof result.ok === "boolean" &&
        result.v === 1
      ) {
        const list = answers.get(result.requestId) ?? [];
        list.push(result as Result);
        answers.set(result.requestId, list);
      }
    }
  })();
  return { answers, close: () => subscription.unsubscribe() };
}

export interface InvariantOptions {
  leases: LeaseStore;
  sandbox: Sandbox;
  /** Results seen, and the request ids that must each have one answer. */
  watch?: ResultWatch;
  requestIds?: readonly string[];
  /** Live (claimed, ready, releasing) leases expected now, `ip -> allocation id`. */
  live: Readonly<Record<string, string>>;
  /** sha256 of every user-data that was delivered whole. */
  delivered: ReadonlySet<string>;
  /**
   * The result bucket (history 1; only results written to it). With it,
   * "answered once" means a stored result per request, no result ever
   * written twice, and at most one on the inboxes: a node that
   * dies can lose the inbox copy (core NATS), and the publisher then reads
   * the stored one. Without it, exactly one on the inboxes.
   */
  results?: KV;
}

/**
 * The invariants every test ends with: every request answered exactly
 * once; no IP with two owners and no allocation on two IPs; no lease lost
 * or leaked (the live leases are exactly `live`, every pool IP has a
 * lease); no partial user-data on any VM (no temp files, and a held
 * user-data is one that was delivered whole).
 */
export async function assertInvariants(
  options: InvariantOptions,
): Promise<void> {
  const ids = options.requestIds ?? [];
  // The watch reads on its own iterator; let it catch up with the test's.
  await waitFor(
    () => ids.every((id) => (options.watch?.answers.get(id)?.length ?? 0) > 0),
    { timeoutMs: 5000, what: "a result for every request" },
  ).catch(() => undefined);
  for (const requestId of ids) {
    const answers = options.watch?.answers.get(requestId) ?? [];
    if (options.results === undefined) {
      assert.equal(answers.length, 1, `request ${requestId} answered once`);
      continue;
    }
    assert.ok(answers.length <= 1, `request ${requestId} answered once`);
    // Right after a node was killed a read can time out while the bucket
    // elects a leader: read again.
    const results = options.results;
    const stored = await waitFor(() => results.get(requestId), {
      timeoutMs: 20_000,
      what: `a read of the result of ${requestId}`,
    });
    assert.equal(stored?.operation, "PUT", `request ${requestId} has a result`);
  }
  if (options.results !== undefined) {
    // The bucket keeps one value per key: as many writes as values means
    // no result was ever written twice.
    const { state } = (await options.results.status()).streamInfo;
    assert.equal(state.last_seq, state.messages, "no result written twice");
  }

  const leases = await options.leases.list();
  const byAllocation = new Map<string, string[]>();
  const live: Record<string, string> = {};
  for (const lease of leases) {
    const { ip, state, allocationId } = lease.record;
    // A quarantined lease keeps its last owner for the record; it is
    // never leased, so it owns nothing.
    if (
      state === "free" ||
      state === "quarantined" ||
      allocationId === undefined
    ) {
      continue;
    }
    live[ip] = allocationId;
    byAllocation.set(allocationId, [
      ...(byAllocation.get(allocationId) ?? []),
      ip,
    ]);
  }
  for (const [allocationId, ips] of byAllocation) {
    assert.equal(ips.length, 1, `${allocationId} holds ${ips.join(", ")}`);
  }
  assert.deepEqual(live, { ...options.live }, "live leases");
  const pool = options.sandbox.status().map((vm) => vm.ip);
  assert.deepEqual(
    leases.map((lease) => lease.record.ip).sort(),
    [...pool].sort(),
    "one lease per pool IP",
  );

  await assertWholeUserData(options.sandbox, options.delivered);
}

/**
 * No partial user-data on any VM: no temp files in any `cidata/`, and a
 * held user-data is one of `delivered` (sha256), delivered whole. The part
 * of {@link assertInvariants} that a test without requests or leases (a
 * delivery on its own) ends with.
 */
export async function assertWholeUserData(
  sandbox: Sandbox,
  delivered: ReadonlySet<string>,
): Promise<void> {
  for (const vm of sandbox.status()) {
    const names: string[] = await readdir(vm.cidataDir).catch(() => []);
    const stray = names.filter(
      (name) => name !== "user-data" && name !== "reboot",
    );
    assert.deepEqual(stray, [], `no temp files on ${vm.ip}`);
    if (names.includes("user-data")) {
      const held = await readFile(join(vm.cidataDir, "user-data"));
      assert.ok(
        delivered.has(sha256(held)),
        `user-data on ${vm.ip} is one delivered whole`,
      );
    }
  }
}
