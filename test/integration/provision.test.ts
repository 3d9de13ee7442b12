import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { jetstream } from "@nats-io/jetstream";
import {
  createInbox,
  headers,
  type NatsConnection,
} from "@nats-io/transport-node";

import type { Agent } from "../../src/agent/index.js";
import { ByomError } from "../../src/errors/index.js";
import type { Publisher } from "../../src/publisher/index.js";
import {
  Header,
  requestSubject,
  type ResourceNames,
  type Result,
} from "../../src/protocol/index.js";
import type { Sandbox } from "../../src/sandbox/index.js";
import { startStack, type TestStack } from "../helpers/stack.js";
import { waitFor } from "../helpers/wait.js";

const fixtures = new URL("../fixtures/userdata/", import.meta.url);
const sha256 = (bytes: Buffer): string =>
  createHash("sha256").update(bytes).digest("hex");

describe("provisioning end to end on sandbox VMs", () => {
  let stack: TestStack;
  let sandbox: Sandbox;
  let agent: Agent;
  let publisher: Publisher;
  let clientConnection: NatsConnection;
  let names: ResourceNames;
  let pool: string[];

  before(async () => {
    stack = await startStack({
      vms: 3,
      firstIp: "127.41.0.2",
      prefix: "provision",
    });
    ({ agent, publisher, clientConnection, names, pool } = stack);
    sandbox = stack.vms.sandbox;
  });

  after(async () => {
    await stack?.close();
  });

  async function liveLeases(): Promise<string[]> {
    const leases = await agent.leases.list();
    return leases
      .filter((lease) => lease.record.state !== "free")
      .map(
        (lease) =>
          `${lease.record.ip}=${lease.record.state}:${lease.record.allocationId}`,
      );
  }

  async function rawRequest(
    payload: Uint8Array,
    kind = "create",
  ): Promise<Result> {
    const inbox = createInbox();
    const subscription = clientConnection.subscribe(inbox, {
      max: 1,
      timeout: 10_000,
    });
    const requestHeaders = headers();
    requestHeaders.set(Header.ReplyTo, inbox);
    requestHeaders.set(
      Header.MsgId,
      `raw-${Math.random().toString(36).slice(2)}`,
    );
    await jetstream(clientConnection).publish(
      requestSubject(names, kind as "create"),
      payload,
      { headers: requestHeaders },
    );
    for await (const message of subscription) {
      return message.json<Result>();
    }
    throw new Error("no result");
  }

  it("delivers user-data that the VM holds byte for byte, and names that VM", async () => {
    const userData = await readFile(new URL("pod-initdata.yaml", fixtures));
    const created = await publisher.createInstance({
      podName: "web-1",
      podNamespace: "team-a",
      sandboxId: "s1",
      userData,
    });

    assert.ok(pool.includes(created.instance.id));
    assert.deepEqual(created.instance, {
      id: created.instance.id,
      name: `byom-${created.instance.id}`,
      ips: [created.instance.id],
    });
    const vm = sandbox.vm(created.instance.id);
    const held = await readFile(join(vm.cidataDir, "user-data"));
    assert.equal(sha256(held), sha256(userData));
    assert.equal(
      created.hostKey?.fingerprint,
      vm.hostKeys.find((key) => key.type === created.hostKey?.type)
        ?.fingerprint,
    );
    const lease = await agent.leases.get(created.instance.id);
    assert.equal(lease?.record.state, "ready");
    assert.equal(lease?.record.allocationId, "web-1-s1");
    assert.equal(
      lease?.record.hostKey?.fingerprint,
      created.hostKey?.fingerprint,
    );
  });

  it("gives the same allocation id the same IP and no second lease", async () => {
    const userData = await readFile(new URL("pod-basic.yaml", fixtures));
    const first = await publisher.createInstance({
      podName: "web-2",
      sandboxId: "s2",
      userData,
    });
    const before = await liveLeases();
    const second = await publisher.createInstance({
      podName: "web-2",
      sandboxId: "s2",
      userData,
    });

    assert.equal(second.instance.id, first.instance.id);
    assert.deepEqual(await liveLeases(), before);
  });

  it("refuses the same allocation id with other user-data instead of pretending to deliver it", async () => {
    const other = await readFile(new URL("pod-initdata.yaml", fixtures));
    const before = await liveLeases();
    await assert.rejects(
      publisher.createInstance({
        podName: "web-2",
        sandboxId: "s2",
        userData: other,
      }),
      (error: unknown) =>
        error instanceof ByomError &&
        error.code === "INVALID_REQUEST" &&
        /already holds VM .* with other user-data/.test(error.message),
    );
    assert.deepEqual(await liveLeases(), before);
  });

  it("answers POOL_EXHAUSTED when every VM is leased and changes nothing", async () => {
    const userData = await readFile(new URL("pod-basic.yaml", fixtures));
    await publisher.createInstance({
      podName: "web-3",
      sandboxId: "s3",
      userData,
    });
    const before = await liveLeases();
    assert.equal(before.length, 3);

    await assert.rejects(
      publisher.createInstance({ podName: "web-4", sandboxId: "s4", userData }),
      (error: unknown) =>
        error instanceof ByomError && error.code === "POOL_EXHAUSTED",
    );
    assert.deepEqual(await liveLeases(), before);
  });

  it("refuses a delete by an allocation that does not own the IP", async () => {
    const lease = (await agent.leases.findByAllocation("web-1-s1"))!;
    await assert.rejects(
      publisher.deleteInstance({
        instanceId: lease.record.ip,
        allocationId: "web-9-s9",
      }),
      (error: unknown) =>
        error instanceof ByomError && error.code === "NOT_OWNER",
    );
    assert.equal(
      (await agent.leases.get(lease.record.ip))?.record.state,
      "ready",
    );
  });

  it("reboots the VM on delete and frees the IP once it has reset", async () => {
    const lease = (await agent.leases.findByAllocation("web-1-s1"))!;
    const ip = lease.record.ip;
    const bootsBefore = sandbox.vm(ip).boots;
    const keysBefore = sandbox.vm(ip).hostKeys.map((key) => key.fingerprint);

    const deleted = await publisher.deleteInstance({
      instanceId: ip,
      allocationId: "web-1-s1",
    });
    assert.equal(deleted.release.state, "releasing");
    await waitFor(
      async () => (await agent.leases.get(ip))?.record.state === "free",
      {
        timeoutMs: 20_000,
        what: `${ip} to be free again`,
      },
    );

    const vm = sandbox.vm(ip);
    assert.equal(vm.boots, bootsBefore + 1);
    assert.ok(
      vm.hostKeys.every((key) => !keysBefore.includes(key.fingerprint)),
    );
    assert.deepEqual(vm.appliedFiles, []);
  });

  it("writes the reboot trigger when a delete's earlier agent died before writing it", async () => {
    const userData = await readFile(new URL("pod-basic.yaml", fixtures));
    const created = await publisher.createInstance({
      podName: "web-6",
      sandboxId: "s6",
      userData,
    });
    const ip = created.instance.id;
    const bootsBefore = sandbox.vm(ip).boots;
    // What an agent killed between marking the lease and writing the
    // trigger leaves; the same delete request then comes back.
    await agent.leases.beginRelease(ip, created.allocationId, "web-6-delete");

    const deleted = await publisher.deleteInstance({
      instanceId: ip,
      allocationId: created.allocationId,
      requestId: "web-6-delete",
    });

    assert.equal(deleted.release.state, "releasing");
    await waitFor(
      async () => (await agent.leases.get(ip))?.record.state === "free",
      {
        timeoutMs: 20_000,
        what: `${ip} to be rebooted and free`,
      },
    );
    assert.equal(sandbox.vm(ip).boots, bootsBefore + 1);
  });

  it("succeeds as a no-op when deleting a free or unknown IP", async () => {
    const free = (await agent.leases.list()).find(
      (lease) => lease.record.state === "free",
    )!;
    const before = await liveLeases();

    const freed = await publisher.deleteInstance({
      instanceId: free.record.ip,
    });
    const unknown = await publisher.deleteInstance({
      instanceId: "127.41.9.9",
    });

    assert.equal(freed.release.state, "free");
    assert.equal(unknown.release.state, "unknown");
    assert.deepEqual(await liveLeases(), before);
  });

  it("answers bad payloads with INVALID_REQUEST naming the problem, and keeps serving", async () => {
    const encode = (value: unknown): Uint8Array =>
      new TextEncoder().encode(
        typeof value === "string" ? value : JSON.stringify(value),
      );
    const before = await liveLeases();
    const cases: Array<[Uint8Array, RegExp]> = [
      [encode("{not json"), /not valid JSON/],
      [
        encode({ v: 1, kind: "create", requestId: "bad-1" }),
        /field "podName" is required/,
      ],
      [
        encode({ v: 2, kind: "create", requestId: "bad-2" }),
        /unsupported protocol version 2/,
      ],
      [encode([1, 2]), /must be a JSON object/],
    ];
    for (const [payload, pattern] of cases) {
      const result = await rawRequest(payload);
      assert.equal(result.ok, false);
      assert.ok(!result.ok && result.error.code === "INVALID_REQUEST");
      assert.match(!result.ok ? result.error.message : "", pattern);
    }
    assert.deepEqual(await liveLeases(), before);

    const userData = await readFile(new URL("pod-basic.yaml", fixtures));
    const served = await publisher.createInstance({
      podName: "web-5",
      sandboxId: "s5",
      userData,
    });
    assert.ok(pool.includes(served.instance.id));
  });
});
