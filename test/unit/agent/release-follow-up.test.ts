/*
 * The follow-up of a delete (wait for the reset, then free the lease) with
 * a fake lease store and VM: NATS trouble while freeing a reset VM is
 * retried, never judged as a VM that did not reset.
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import type { AgentContext } from "../../../src/agent/context.js";
import { handleDelete } from "../../../src/agent/delete.js";
import { SafeEmitter } from "../../../src/agent/events.js";
import { UnavailableError } from "../../../src/errors/index.js";
import type { Lease, LeaseRecord } from "../../../src/lease/index.js";
import { silentLogger } from "../../../src/logging/index.js";
import type { DeleteRequest } from "../../../src/protocol/index.js";

const ip = "127.0.0.9";
const hostKey = { type: "ssh-ed25519", fingerprint: "SHA256:old" };

/** A ready lease, a VM that resets at once, and `free` failing `failures` times. */
function fakeContext(failures: number) {
  let record: LeaseRecord = {
    ip,
    state: "ready",
    allocationId: "pod-s",
    hostKey,
    since: "",
    updatedAt: "",
  };
  const calls = { free: 0, quarantine: [] as string[] };
  const lease = (): Lease => ({ record, revision: 1 });
  const context = {
    agentId: "agent-1",
    logger: silentLogger(),
    emitter: new SafeEmitter(silentLogger()),
    closing: () => false,
    connectTimeoutMs: 100,
    releaseTimeoutMs: 1000,
    natsRetryMs: 1500,
    readinessTimeoutMs: 100,
    requireSealed: false,
    leases: {
      get: async () => lease(),
      beginRelease: async () => {
        record = { ...record, state: "releasing", releaseRequestId: "del-1" };
        return lease();
      },
      free: async () => {
        calls.free += 1;
        if (calls.free <= failures) {
          throw new UnavailableError("read ip failed: timeout");
        }
        record = { ip, state: "free", since: "", updatedAt: "" };
        return lease();
      },
      quarantine: async (_ip: string, reason: string) => {
        calls.quarantine.push(reason);
        record = { ...record, state: "quarantined", reason };
        return lease();
      },
    },
    delivery: {
      triggerReboot: async () => ({ hostKey }),
      waitForReset: async () => ({
        hostKey: { type: "ssh-ed25519", fingerprint: "SHA256:new" },
      }),
    },
  } as unknown as AgentContext;
  return { context, calls, state: () => record.state };
}

const request: DeleteRequest = {
  v: 1,
  kind: "delete",
  requestId: "del-1",
  instanceId: ip,
  allocationId: "pod-s",
  requestingNode: "node-a",
  deadline: new Date(Date.now() + 60_000).toISOString(),
};

describe("release follow-up", () => {
  it("frees a reset VM through a short NATS outage, without quarantining it", async () => {
    const fake = fakeContext(2);
    const outcome = await handleDelete(fake.context, request);
    assert.equal(
      outcome.result.ok && outcome.result.release?.state,
      "releasing",
    );
    await outcome.after?.();
    assert.equal(fake.calls.free, 3);
    assert.deepEqual(fake.calls.quarantine, []);
    assert.equal(fake.state(), "free");
  });

  it("fails the follow-up with a retryable error when NATS stays away, leaving the lease to the next delivery", async () => {
    const fake = fakeContext(Number.POSITIVE_INFINITY);
    const outcome = await handleDelete(fake.context, request);
    const following = outcome.after!();
    await assert.rejects(
      following,
      (error: unknown) =>
        error instanceof UnavailableError && error.retryable === true,
    );
    assert.deepEqual(fake.calls.quarantine, []);
    assert.equal(fake.state(), "releasing");
  });
});
