import assert from "node:assert/strict";

import type { Agent } from "../../src/agent/index.js";
import { ByomError } from "../../src/errors/index.js";
import type { Publisher } from "../../src/publisher/index.js";

/**
 * Creates `count` pods, retrying a retryable failure until `untilMs`;
 * returns the IP of each allocation.
 */
export async function createAll(
  publisher: Publisher,
  prefix: string,
  count: number,
  userData: Buffer,
  untilMs: number,
): Promise<{ ips: Map<string, string>; retries: number }> {
  const ips = new Map<string, string>();
  let retries = 0;
  await Promise.all(
    Array.from({ length: count }, async (_, index) => {
      const podName = `${prefix}-${index}`;
      // A new request id per attempt: the allocation id, not the request
      // id, is what makes a retried create land on the same VM.
      for (let attempt = 0; ; attempt += 1) {
        const requestId = `${prefix}-req-${index}-${attempt}`;
        try {
          const created = await publisher.createInstance({
            podName,
            sandboxId: "s",
            userData,
            requestId,
            timeoutMs: 8000,
          });
          ips.set(`${podName}-s`, created.instance.id);
          return;
        } catch (error) {
          if (
            !(error instanceof ByomError) ||
            !error.retryable ||
            Date.now() > untilMs
          ) {
            throw error;
          }
          retries += 1;
        }
      }
    }),
  );
  return { ips, retries };
}

/** Every lease that is not free belongs to exactly one of `expected`. */
export async function assertOneOwnerEach(
  agent: Agent,
  expected: Map<string, string>,
): Promise<void> {
  const live = (await agent.leases.list()).filter(
    (lease) => lease.record.state !== "free",
  );
  const owners = new Map(
    live.map((lease) => [lease.record.allocationId ?? "", lease.record.ip]),
  );
  assert.equal(live.length, expected.size, "one lease per allocation, no leak");
  assert.equal(
    new Set(live.map((lease) => lease.record.ip)).size,
    live.length,
    "no IP twice",
  );
  assert.deepEqual(owners, expected);
  for (const lease of live) {
    assert.equal(lease.record.state, "ready");
  }
}
