import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { Writable } from "node:stream";
import { after, before, describe, it } from "node:test";

import { pino } from "pino";

import {
  createSealingKeyPair,
  createUnsealer,
} from "../../src/sealing/index.js";
import { createPublisher } from "../../src/publisher/index.js";
import {
  assertInvariants,
  sha256,
  watchResults,
  type ResultWatch,
} from "../helpers/request-invariants.js";
import { startStack, type TestStack } from "../helpers/stack.js";
import { waitFor } from "../helpers/wait.js";

const fixtures = new URL("../fixtures/userdata/", import.meta.url);
const fixtureNames = [
  "pod-basic.yaml",
  "pod-initdata.yaml",
  "pod-large-policy.yaml",
] as const;

/** Every log line written, whatever the level. */
class LogCapture extends Writable {
  readonly chunks: string[] = [];
  override _write(
    chunk: Buffer,
    _encoding: BufferEncoding,
    done: (error?: Error | null) => void,
  ): void {
    this.chunks.push(chunk.toString("utf8"));
    done();
  }
  get text(): string {
    return this.chunks.join("");
  }
}

/**
 * Distinctive pieces of a user-data text: every line of some length, and
 * the fake key bodies. Short generic lines (`write_files:`) are skipped.
 */
function distinctivePieces(text: string): string[] {
  const lines = text
    .split("\n")
    .map((line) => line.trim())
    .filter((line) => line.length >= 24);
  return [...new Set([...lines, "FAKEFAKE"])];
}

/** Base64 body lines of a PEM or OpenSSH private key. */
function keyBodyLines(key: string): string[] {
  return key
    .split("\n")
    .map((line) => line.trim())
    .filter((line) => line !== "" && !line.startsWith("-----"));
}

describe("secrets never reach the logs, even at trace level", () => {
  const capture = new LogCapture();
  const logger = pino({ level: "trace" }, capture);
  const sealing = createSealingKeyPair();
  let stack: TestStack;
  let watch: ResultWatch;
  const userData = new Map<string, Buffer>();

  before(async () => {
    for (const name of fixtureNames) {
      userData.set(name, await readFile(new URL(name, fixtures)));
    }
    stack = await startStack({
      vms: 3,
      firstIp: "127.48.0.2",
      prefix: "secrets",
      agent: {
        logger,
        unseal: createUnsealer([sealing.seed]),
        requireSealed: false,
      },
      publisher: { logger },
    });
    watch = watchResults(stack.clientConnection);
  });

  after(async () => {
    watch?.close();
    await stack?.close();
  });

  it("logs a full create and delete of the 3 fixtures, sealed and not, without key material or user-data", async () => {
    const sealedPublisher = createPublisher({
      nc: stack.clientConnection,
      names: stack.names,
      requestingNode: "node-a",
      requestTimeoutMs: 20_000,
      sealingPublicKey: sealing.publicKey,
      logger,
    });
    const created = await Promise.all(
      fixtureNames.map((name, index) =>
        (index === 0 ? stack.publisher : sealedPublisher).createInstance({
          podName: `pod-${index}`,
          sandboxId: "s1",
          userData: userData.get(name)!,
          requestId: `create-${index}`,
        }),
      ),
    );
    for (const [index, instance] of created.entries()) {
      await stack.publisher.deleteInstance({
        instanceId: instance.instance.id,
        allocationId: instance.allocationId,
        requestId: `delete-${index}`,
      });
    }
    await waitFor(
      async () =>
        (await stack.agent.leases.list()).every(
          (lease) => lease.record.state === "free",
        ),
      { timeoutMs: 30_000, what: "every VM free again" },
    );
    await sealedPublisher.close();

    const log = capture.text;
    const lines = log.split("\n").filter((line) => line !== "");
    assert.ok(lines.length > 20, `${lines.length} log lines`);
    const levels = new Set(
      lines.map((line) => (JSON.parse(line) as { level: number }).level),
    );
    assert.ok(levels.has(10) || levels.has(20), "trace or debug lines");
    for (const expected of [
      "agent serving requests",
      "request published",
      "lease acquired",
      "request served",
    ]) {
      assert.ok(log.includes(expected), `log has "${expected}"`);
    }

    const leaks: string[] = [];
    for (const line of keyBodyLines(stack.vms.privateKey)) {
      if (log.includes(line)) leaks.push(`ssh private key line ${line}`);
    }
    for (const secret of [sealing.seed, sealing.seed.slice(2, 30)]) {
      if (log.includes(secret)) leaks.push("sealing seed");
    }
    for (const [name, bytes] of userData) {
      for (const piece of distinctivePieces(bytes.toString("utf8"))) {
        // As written, and JSON-escaped as a logged string field holds it.
        const escaped = JSON.stringify(piece).slice(1, -1);
        if (log.includes(piece) || log.includes(escaped)) {
          leaks.push(`${name}: ${piece.slice(0, 40)}`);
        }
      }
      // JSON-escaped forms, as a logged string field would hold them.
      const escaped = JSON.stringify(bytes.toString("utf8")).slice(1, 200);
      if (log.includes(escaped)) leaks.push(`${name}: escaped text`);
    }
    assert.deepEqual(leaks, []);
    // The check itself finds a leak when there is one.
    const planted = distinctivePieces(
      userData.get("pod-initdata.yaml")!.toString("utf8"),
    );
    assert.ok(planted.length > 10);

    await assertInvariants({
      leases: stack.agent.leases,
      sandbox: stack.vms.sandbox,
      watch,
      requestIds: [
        ...fixtureNames.map((_, index) => `create-${index}`),
        ...fixtureNames.map((_, index) => `delete-${index}`),
      ],
      live: {},
      delivered: new Set([...userData.values()].map((bytes) => sha256(bytes))),
    });
  });
});
