import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { after, before, describe, it } from "node:test";

import { jetstreamManager } from "@nats-io/jetstream";

import { assertOneOwnerEach, createAll } from "../helpers/load.js";
import { startStack, type TestStack } from "../helpers/stack.js";
import { waitFor } from "../helpers/wait.js";

const userDataFile = new URL(
  "../fixtures/userdata/pod-initdata.yaml",
  import.meta.url,
);

describe("NATS faults: a restarted server", () => {
  let stack: TestStack;
  let userData: Buffer;

  before(async () => {
    userData = await readFile(userDataFile);
    stack = await startStack({
      vms: 8,
      firstIp: "127.62.0.2",
      prefix: "restart",
      // A delivery lost in the restart comes back after the ack wait.
      agent: { queue: { ackWaitMs: 5000 } },
    });
  });

  after(async () => {
    await stack?.close();
  });

  it("keeps every request answered and every lease through a restart under load", async (t) => {
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

    const { ips, retries } = await load;
    assert.equal(ips.size, 8);
    await waitFor(async () => (await stack.agent.leases.counts()).ready === 8, {
      what: "the agent's view to re-sync after the restart",
    });
    await assertOneOwnerEach(stack.agent, ips);
    // Acks travel after the results: wait for the last of them.
    const jsm = await jetstreamManager(stack.clientConnection);
    await waitFor(
      async () =>
        (await jsm.streams.info(stack.names.stream)).state.messages === 0,
      { timeoutMs: 30_000, what: "every request to leave the stream" },
    );
    t.diagnostic(`restart under load: 8 creates answered, ${retries} retried`);
  });
});
