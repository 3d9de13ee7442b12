/*
 * Several requests for one allocation at once (a retry sent while the
 * first still runs), deletes racing each other, and a request served
 * again on a VM found dirty: one writer per VM, no false quarantine, no
 * delivery onto a VM that never reset.
 */
import assert from "node:assert/strict";
import { readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Kvm, type KV } from "@nats-io/kv";
import { createInbox, headers } from "@nats-io/transport-node";

import { ByomError } from "../../src/errors/index.js";
import type { ClaimRequest } from "../../src/lease/index.js";
import { Header, requestSubject } from "../../src/protocol/index.js";
import {
  assertInvariants,
  sha256,
  watchResults,
  type ResultWatch,
} from "../helpers/request-invariants.js";
import { startStack, type TestStack } from "../helpers/stack.js";
import { waitFor } from "../helpers/wait.js";

const fixtures = new URL("../fixtures/userdata/", import.meta.url);

describe("one allocation, several requests at once", () => {
  let stack: TestStack;
  let userData: Buffer;
  let watch: ResultWatch;
  let results: KV;
  const quarantined: string[] = [];
  const live: Record<string, string> = {};
  const requestIds: string[] = [];
  /** sha256 of every user-data written whole to a VM. */
  const delivered = new Set<string>();

  before(async () => {
    userData = await readFile(new URL("pod-basic.yaml", fixtures));
    delivered.add(sha256(userData));
    stack = await startStack({
      vms: 5,
      firstIp: "127.64.0.2",
      prefix: "sameall",
      agent: { concurrency: 4, quarantineProbeIntervalMs: 0 },
    });
    watch = watchResults(stack.clientConnection);
    results = await new Kvm(stack.clientConnection).open(
      stack.names.resultBucket,
    );
    stack.agent.events.on("lease:quarantined", ({ ip, reason }) =>
      quarantined.push(`${ip}: ${reason}`),
    );
  });

  after(async () => {
    watch?.close();
    await stack?.close();
  });

  function claim(podName: string, requestId: string): ClaimRequest {
    return {
      allocationId: `${podName}-s`,
      requestId,
      podName,
      podNamespace: "default",
      requestingNode: "node-a",
    };
  }

  /**
   * Publishes a delete with request id `requestId` under a new message id
   * (as a retry past JetStream's duplicate window would be) and waits
   * until an agent has taken and acked it.
   */
  async function deleteAfterDuplicateWindow(
    requestId: string,
    ip: string,
    allocationId?: string,
  ): Promise<void> {
    const replyHeaders = headers();
    replyHeaders.set(Header.ReplyTo, createInbox());
    replyHeaders.set(Header.MsgId, `${requestId}-later`);
    await jetstream(stack.clientConnection).publish(
      requestSubject(stack.names, "delete"),
      JSON.stringify({
        v: 1,
        kind: "delete",
        requestId,
        instanceId: ip,
        ...(allocationId === undefined ? {} : { allocationId }),
        requestingNode: "node-a",
        deadline: new Date(Date.now() + 30_000).toISOString(),
      }),
      { headers: replyHeaders },
    );
    const jsm = await jetstreamManager(stack.clientConnection);
    await waitFor(
      async () =>
        (await jsm.streams.info(stack.names.stream)).state.messages === 0,
      { what: "the delete to be taken and acked" },
    );
  }

  async function invariants(): Promise<void> {
    await assertInvariants({
      leases: stack.agent.leases,
      sandbox: stack.vms.sandbox,
      watch,
      requestIds,
      live,
      delivered,
    });
  }

  it("gives three creates of one allocation sent at once the same VM, delivered once at a time", async () => {
    const ids = ["dup-a", "dup-b", "dup-c"];
    requestIds.push(...ids);
    const created = await Promise.all(
      ids.map((requestId) =>
        stack.publisher.createInstance({
          podName: "dup",
          sandboxId: "s",
          userData,
          requestId,
        }),
      ),
    );

    const ips = new Set(created.map((result) => result.instance.id));
    assert.equal(ips.size, 1, `one VM for all: ${[...ips].join(", ")}`);
    const [ip] = ips;
    live[ip!] = "dup-s";
    assert.deepEqual(quarantined, []);
    assert.equal((await stack.agent.leases.get(ip!))?.record.state, "ready");
    await invariants();
  });

  it("lets one of two deletes sent at once reboot the VM; the other reports it releasing", async () => {
    const ip = Object.keys(live)[0]!;
    const bootsBefore = stack.vms.sandbox.vm(ip).boots;
    const ids = ["dup-del-a", "dup-del-b"];
    requestIds.push(...ids);

    const deleted = await Promise.all(
      ids.map((requestId) =>
        stack.publisher.deleteInstance({
          instanceId: ip,
          allocationId: "dup-s",
          requestId,
        }),
      ),
    );

    assert.deepEqual(
      deleted.map((result) => result.release.state),
      ["releasing", "releasing"],
    );
    await waitFor(
      async () => (await stack.agent.leases.get(ip))?.record.state === "free",
      { timeoutMs: 20_000, what: `${ip} to reset and be free` },
    );
    assert.equal(stack.vms.sandbox.vm(ip).boots, bootsBefore + 1);
    assert.deepEqual(quarantined, []);
    delete live[ip];
    await invariants();
  });

  it("waits for another request of the allocation that holds the claim, then finishes", async () => {
    const { lease } = await stack.agent.leases.acquire(
      claim("slow", "slow-first"),
    );
    const ip = lease.record.ip;
    requestIds.push("slow-second");
    let finishedAt: number | undefined;
    const second = stack.publisher
      .createInstance({
        podName: "slow",
        sandboxId: "s",
        userData,
        requestId: "slow-second",
      })
      .then((result) => {
        finishedAt = Date.now();
        return result;
      });

    // The claim holder has no answer: the second request must not write.
    await new Promise((resolve) => setTimeout(resolve, 1500));
    assert.equal(finishedAt, undefined, "the second request waited");
    assert.deepEqual(
      await readFile(join(stack.vms.sandbox.vm(ip).cidataDir, "user-data"))
        .then(() => ["user-data"])
        .catch(() => []),
      [],
    );
    // The first request gives its claim back (it failed): decide again.
    const releasedAt = Date.now();
    await stack.agent.leases.free(ip, {
      from: ["claimed"],
      allocationId: "slow-s",
    });

    const result = await second;
    assert.ok(finishedAt! >= releasedAt);
    live[result.instance.id] = "slow-s";
    assert.deepEqual(quarantined, []);
    await invariants();
  });

  it("takes over the claim of an answered request of the allocation", async () => {
    const { lease } = await stack.agent.leases.acquire(
      claim("late", "late-first"),
    );
    const ip = lease.record.ip;
    // What an expired first request leaves: its answer, and its claim.
    await results.put(
      "late-first",
      JSON.stringify({
        v: 1,
        requestId: "late-first",
        ok: false,
        error: { code: "EXPIRED", message: "expired", retryable: true },
        agent: "test",
        finishedAt: new Date().toISOString(),
      }),
    );

    requestIds.push("late-second");
    const result = await stack.publisher.createInstance({
      podName: "late",
      sandboxId: "s",
      userData,
      requestId: "late-second",
    });

    assert.equal(result.instance.id, ip);
    live[ip] = "late-s";
    await invariants();
  });

  it("does not deliver onto a VM that never reset when a request is served again", async () => {
    // A first try claimed the VM, found it dirty, and could not quarantine
    // it (NATS trouble): the request comes back with its claim in place.
    const { lease } = await stack.agent.leases.acquire(
      claim("dirty", "dirty-req"),
    );
    const dirty = lease.record.ip;
    const foreign = Buffer.from("#cloud-config\nwrite_files: []\n");
    await writeFile(
      join(stack.vms.sandbox.vm(dirty).cidataDir, "user-data"),
      foreign,
    );

    requestIds.push("dirty-req");
    const result = await stack.publisher.createInstance({
      podName: "dirty",
      sandboxId: "s",
      userData,
      requestId: "dirty-req",
    });

    assert.notEqual(result.instance.id, dirty);
    assert.match(quarantined.join("\n"), /never reset/);
    const held = await stack.agent.leases.get(dirty);
    assert.equal(held?.record.state, "quarantined");
    live[result.instance.id] = "dirty-s";
    // The quarantined VM keeps what the test wrote until it resets.
    delivered.add(sha256(foreign));
    await invariants();
  });

  it("writes nothing when a delete takes the lease between the claim and the write", async () => {
    let raced: Promise<unknown> | undefined;
    let racedIp: string | undefined;
    const stop = stack.agent.events.on("lease:acquired", (event) => {
      if (event.allocationId === "raced-s" && raced === undefined) {
        racedIp = event.ip;
        // What a delete of the pod does first, while the SSH connection
        // of the create is still being set up.
        raced = stack.agent.leases.beginRelease(
          event.ip,
          "raced-s",
          "raced-del",
        );
      }
    });
    requestIds.push("raced-req");
    try {
      await assert.rejects(
        stack.publisher.createInstance({
          podName: "raced",
          sandboxId: "s",
          userData,
          requestId: "raced-req",
        }),
        (error: unknown) =>
          error instanceof ByomError &&
          error.code === "NOT_OWNER" &&
          /no longer claimed by allocation raced-s .*nothing written$/.test(
            error.message,
          ),
      );
    } finally {
      stop();
    }
    await raced;
    const ip = racedIp!;
    assert.deepEqual(
      await readdir(stack.vms.sandbox.vm(ip).cidataDir),
      [],
      "nothing written to the VM",
    );
    // The delete would now reboot the VM and free it.
    await stack.agent.leases.free(ip, {
      from: ["releasing"],
      allocationId: "raced-s",
    });
    await invariants();
  });

  it("refuses a request id used before for another request, and never serves it", async () => {
    requestIds.push("reused-1");
    const first = await stack.publisher.createInstance({
      podName: "reuse-a",
      sandboxId: "s",
      userData,
      requestId: "reused-1",
    });
    const ip = first.instance.id;
    live[ip] = "reuse-a-s";

    // The same create sent again (a retry): JetStream drops the duplicate
    // and the stored answer is read at once, not at the timeout.
    const sentAgain = Date.now();
    const again = await stack.publisher.createInstance({
      podName: "reuse-a",
      sandboxId: "s",
      userData,
      requestId: "reused-1",
      timeoutMs: 60_000,
    });
    assert.equal(again.instance.id, ip);
    assert.ok(Date.now() - sentAgain < 30_000, "answered before the timeout");

    // Within JetStream's duplicate window: the publish is dropped, and the
    // stored result answered another pod.
    await assert.rejects(
      stack.publisher.createInstance({
        podName: "reuse-b",
        sandboxId: "s",
        userData,
        requestId: "reused-1",
        timeoutMs: 60_000,
      }),
      (error: unknown) =>
        error instanceof ByomError &&
        error.code === "INVALID_REQUEST" &&
        /^request id reused-1 was used before for another create \(allocation reuse-a-s\); send this create with a new request id$/.test(
          error.message,
        ),
    );

    // After the window (a new message id): the agent must not run a delete
    // it cannot answer.
    const bootsBefore = stack.vms.sandbox.vm(ip).boots;
    await deleteAfterDuplicateWindow("reused-1", ip, "reuse-a-s");
    assert.equal(stack.vms.sandbox.vm(ip).boots, bootsBefore);
    assert.equal((await stack.agent.leases.get(ip))?.record.state, "ready");
    await invariants();
  });

  it("does nothing to the VM's next pod when a finished delete is sent again after the duplicate window", async () => {
    const ip = Object.keys(live).find((key) => live[key] === "reuse-a-s")!;
    requestIds.push("again-del", "again-next");
    await stack.publisher.deleteInstance({
      instanceId: ip,
      requestId: "again-del",
    });
    delete live[ip];
    await waitFor(
      async () => (await stack.agent.leases.get(ip))?.record.state === "free",
      { timeoutMs: 20_000, what: `${ip} to reset and be free` },
    );
    const next = await stack.publisher.createInstance({
      podName: "next",
      sandboxId: "s",
      userData,
      requestId: "again-next",
    });
    assert.equal(next.instance.id, ip, "the only free VM");
    live[ip] = "next-s";
    const bootsBefore = stack.vms.sandbox.vm(ip).boots;

    // The same delete again, as a retry past JetStream's duplicate window
    // (a new message id) or a redelivery whose ack was lost.
    await deleteAfterDuplicateWindow("again-del", ip);
    assert.equal(stack.vms.sandbox.vm(ip).boots, bootsBefore);
    assert.equal((await stack.agent.leases.get(ip))?.record.state, "ready");
    await invariants();
  });
});
