import { randomUUID } from "node:crypto";
import type { TestContext } from "node:test";

import { Kvm, type KV } from "@nats-io/kv";
import { connect, type NatsConnection } from "@nats-io/transport-node";

import {
  createLeaseStore,
  type ClaimRequest,
  type LeaseStore,
  type LeaseStoreOptions,
} from "../../src/lease/index.js";

/** A bucket name no other test uses. */
export function uniqueBucket(): string {
  return `leases-${randomUUID().slice(0, 8)}`;
}

/** A NATS connection closed when the test ends. */
export async function connectFor(
  t: TestContext,
  url: string,
): Promise<NatsConnection> {
  const nc = await connect({ servers: url, name: "byom-lease-test" });
  t.after(() => nc.close());
  return nc;
}

/** `count` IPs from `prefix.first` on, e.g. pool("127.0.3", 10, 6). */
export function pool(prefix: string, first: number, count: number): string[] {
  return Array.from(
    { length: count },
    (_, offset) => `${prefix}.${first + offset}`,
  );
}

export function claimFor(allocationId: string): ClaimRequest {
  return {
    allocationId,
    requestId: `req-${allocationId}-${randomUUID().slice(0, 8)}`,
    podName: allocationId,
    podNamespace: "default",
    requestingNode: "node-a",
  };
}

/**
 * Starts a lease store on its own connection; both are closed when the
 * test ends, also when it fails.
 */
export async function startStore(
  t: TestContext,
  url: string,
  options: Omit<LeaseStoreOptions, "nc">,
): Promise<LeaseStore> {
  const nc = await connectFor(t, url);
  const store = createLeaseStore({ ...options, nc });
  t.after(() => store.close());
  await store.start();
  return store;
}

/** The raw bucket, for looking behind the store. */
export async function rawBucket(
  t: TestContext,
  url: string,
  bucket: string,
): Promise<KV> {
  const nc = await connectFor(t, url);
  return new Kvm(nc).open(bucket);
}
