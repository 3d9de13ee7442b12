import { readFile } from "node:fs/promises";
import { after, before, describe, it } from "node:test";

import { jetstreamManager } from "@nats-io/jetstream";
import { Kvm, type KV } from "@nats-io/kv";

import { createAll, untilAnswered } from "../helpers/load.js";
import {
  assertInvariants,
  sha256,
  watchResults,
  type ResultWatch,
} from "../helpers/request-invariants.js";
import { startStack, type TestStack } from "../helpers/stack.js";
import { waitFor } from "../helpers/wait.js";

const userDataFile = new URL(
  "../fixtures/userdata/pod-initdata.yaml",
  import.meta.url,
);

describe("NATS faults: a restarted server", () => {
  let stack: TestStack;
  let userData: Buffer;
  let watch: ResultWatch;
  let results: KV;

  before(async () => {
    userData = await readFile(userDataFile);
    stack = await startStack({
      vms: 8,
      firstIp: "127.62.0.2",
      prefix: "restart",
      // A delivery lost in the restart comes back after the ack wait.
      agent: { queue: { ackWaitMs: 5000 } },
    });
    watch = watchResults(stack.clientConnection);
    results = await new Kvm(stack.clientConnection).open(
      stack.names.resultBucket,
    );
  });

  after(async () => {
    watch?.close();
    await stack?.close();
  });

  /** Acks travel after the results: waits for the last of them. */
  async function streamDrained(): Promise<void> {
    const jsm = await jetstreamManager(stack.clientConnection);
    await waitFor(
      async () =>
        (await jsm.streams.info(stack.names.stream)).state.messages === 0,
      { timeoutMs: 30_000, what: "every request to leave the stream" },
    );
  }

  it("keeps every request answered once and every lease through a restart under load", async (t) => {
    const delivered = new Set([sha256(userData)]);
    const load = createAll(
      stack.publisher,
      "restart",
      8,
      userData,
      Date.now() + 60_000,
    );
    await waitFor(async () => (await stack.agent.leases.counts()).ready >= 2, {
      what: "the load to be under way",
    });
    await stack.server.restart();

    const { live, requestIds, retries } = await load;
    await waitFor(async () => (await stack.agent.leases.counts()).ready === 8, {
      what: "the agent's view to re-sync after the restart",
    });
    await streamDrained();
    // An inbox copy sent just before the restart can be lost (core NATS):
    // answers are counted on the result bucket.
    await assertInvariants({
      leases: stack.agent.leases,
      sandbox: stack.vms.sandbox,
      watch,
      requestIds,
      live,
      delivered,
      results,
    });

    // The restarted server serves deletes; every VM resets and comes back.
    const deleteRetries = { count: 0 };
    const deleteIds: string[] = [];
    await Promise.all(
      Object.entries(live).map(([ip, allocationId], pod) =>
        untilAnswered(
          (requestId) =>
            stack.publisher.deleteInstance({
              instanceId: ip,
              allocationId,
              requestId,
              timeoutMs: 20_000,
            }),
          {
            requestId: `restart-del-${pod}`,
            used: deleteIds,
            status: (id) => stack.publisher.status(id),
            retries: deleteRetries,
            untilMs: Date.now() + 60_000,
          },
        ),
      ),
    );
    await waitFor(async () => (await stack.agent.leases.counts()).free === 8, {
      timeoutMs: 30_000,
      what: "every VM to come back free",
    });
    await streamDrained();
    await assertInvariants({
      leases: stack.agent.leases,
      sandbox: stack.vms.sandbox,
      watch,
      requestIds: [...requestIds, ...deleteIds],
      live: {},
      delivered,
      results,
    });
    t.diagnostic(
      `restart under load: 8 creates and 8 deletes answered, ${retries + deleteRetries.count} sent again`,
    );
  });
});
