import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { jetstreamManager } from "@nats-io/jetstream";

import { ByomError } from "../../src/errors/index.js";
import { createPublisher } from "../../src/publisher/index.js";
import {
  assertInvariants,
  sha256,
  watchResults,
  type ResultWatch,
} from "../helpers/request-invariants.js";
import { startStack, type TestStack } from "../helpers/stack.js";

const fixtures = new URL("../fixtures/userdata/", import.meta.url);

function isTooLarge(pattern: RegExp): (error: unknown) => boolean {
  return (error: unknown) => {
    assert.ok(error instanceof ByomError);
    assert.equal(error.code, "PAYLOAD_TOO_LARGE");
    assert.match(error.message, pattern);
    return true;
  };
}

describe("user-data size: checked at the publisher, nothing sent when too large", () => {
  let stack: TestStack;
  let large: Buffer;
  let small: Buffer;
  let watch: ResultWatch;
  let configDir: string;
  const requestIds: string[] = [];
  const delivered = new Set<string>();
  const live: Record<string, string> = {};

  before(async () => {
    configDir = await mkdtemp(join(tmpdir(), "byom-max-payload-"));
    const configFile = join(configDir, "nats.conf");
    await writeFile(configFile, "max_payload: 65536\n");
    stack = await startStack({
      vms: 2,
      firstIp: "127.47.1.2",
      prefix: "paysize",
      nats: { args: ["-c", configFile] },
    });
    watch = watchResults(stack.clientConnection);
    large = await readFile(new URL("pod-large-policy.yaml", fixtures));
    small = await readFile(new URL("pod-initdata.yaml", fixtures));
  });

  after(async () => {
    watch?.close();
    await stack?.close();
    await rm(configDir, { recursive: true, force: true });
  });

  async function lastSequence(): Promise<number> {
    const jsm = await jetstreamManager(stack.clientConnection);
    return (await jsm.streams.info(stack.names.stream)).state.last_seq;
  }

  it("reads max_payload from the server", () => {
    assert.equal(stack.clientConnection.info?.max_payload, 65_536);
  });

  it("refuses the 300 KiB fixture over a 64 KiB max_payload, publishing and leasing nothing", async () => {
    const sequence = await lastSequence();
    await assert.rejects(
      stack.publisher.createInstance({
        podName: "large",
        sandboxId: "s1",
        userData: large,
        requestId: "too-large",
      }),
      isTooLarge(
        new RegExp(
          `^encoded request is \\d+ bytes \\(user-data ${large.length} bytes\\); the NATS server's max_payload is 65536 bytes; nothing was sent$`,
        ),
      ),
    );
    assert.equal(await lastSequence(), sequence);
    assert.equal(await stack.publisher.status("too-large"), undefined);
    await assertInvariants({
      leases: stack.agent.leases,
      sandbox: stack.vms.sandbox,
      live,
      delivered,
    });
  });

  it("refuses user-data over the configured cap before encoding it", async () => {
    const capped = createPublisher({
      nc: stack.clientConnection,
      names: stack.names,
      requestingNode: "node-a",
      maxUserDataBytes: 2000,
    });
    const sequence = await lastSequence();
    await assert.rejects(
      capped.createInstance({
        podName: "capped",
        sandboxId: "s1",
        userData: small,
      }),
      isTooLarge(
        new RegExp(
          `^user-data is ${small.length} bytes; the configured cap \\(BYOM_MAX_USER_DATA_BYTES\\) is 2000 bytes \\(the NATS server's max_payload is 65536 bytes\\); nothing was sent$`,
        ),
      ),
    );
    // Binary user-data over the cap is too large before it is bad UTF-8.
    await assert.rejects(
      capped.createInstance({
        podName: "binary",
        sandboxId: "s1",
        userData: new Uint8Array(4096).fill(0xff),
      }),
      isTooLarge(/^user-data is 4096 bytes; the configured cap/),
    );
    assert.equal(await lastSequence(), sequence);
    await capped.close();
    await assertInvariants({
      leases: stack.agent.leases,
      sandbox: stack.vms.sandbox,
      live,
      delivered,
    });
  });

  it("still provisions user-data that fits", async () => {
    const created = await stack.publisher.createInstance({
      podName: "fits",
      sandboxId: "s1",
      userData: small,
      requestId: "fits",
    });
    requestIds.push("fits");
    delivered.add(sha256(small));
    live[created.instance.id] = created.allocationId;
    await assertInvariants({
      leases: stack.agent.leases,
      sandbox: stack.vms.sandbox,
      watch,
      requestIds,
      live,
      delivered,
    });
  });
});

describe("user-data size: the 300 KiB fixture at the default max_payload", () => {
  let stack: TestStack;
  let watch: ResultWatch;

  before(async () => {
    stack = await startStack({
      vms: 1,
      firstIp: "127.47.2.2",
      prefix: "paydefault",
    });
    watch = watchResults(stack.clientConnection);
  });

  after(async () => {
    watch?.close();
    await stack?.close();
  });

  it("delivers it byte for byte", async () => {
    assert.equal(stack.clientConnection.info?.max_payload, 1024 * 1024);
    const large = await readFile(new URL("pod-large-policy.yaml", fixtures));
    const created = await stack.publisher.createInstance({
      podName: "large",
      sandboxId: "s1",
      userData: large,
      requestId: "large-default",
    });
    const held = await readFile(
      join(stack.vms.sandbox.vm(created.instance.id).cidataDir, "user-data"),
    );
    assert.equal(sha256(held), sha256(large));
    await assertInvariants({
      leases: stack.agent.leases,
      sandbox: stack.vms.sandbox,
      watch,
      requestIds: ["large-default"],
      live: { [created.instance.id]: created.allocationId },
      delivered: new Set([sha256(large)]),
    });
  });
});
