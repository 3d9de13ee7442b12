import assert from "node:assert/strict";
import { once } from "node:events";
import { readdir, readFile, stat } from "node:fs/promises";
import { createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { createDelivery, type Delivery } from "../../src/delivery/index.js";
import { ByomError } from "../../src/errors/index.js";
import { createTofuPolicy } from "../../src/hostkeys/index.js";
import { assertWholeUserData, sha256 } from "../helpers/request-invariants.js";
import { startSandbox, type TestSandbox } from "../helpers/sandbox.js";
import { waitFor } from "../helpers/wait.js";

describe("SSH faults during delivery", () => {
  let vms: TestSandbox;
  let delivery: Delivery;
  let silent: Server;
  const silentSockets: Array<{
    socket: Socket;
    openedAt: number;
    closedAt?: number;
  }> = [];

  before(async () => {
    vms = await startSandbox({ vms: 1, firstIp: "127.60.0.2" });
    delivery = createDelivery({
      privateKey: vms.privateKey,
      connectTimeoutMs: 400,
      policy: createTofuPolicy(),
      backoff: { initialMs: 50, maxMs: 200 },
    });
    // A "VM" that accepts TCP on port 22 and never says a word.
    silent = createServer((socket) => {
      const entry: { socket: Socket; openedAt: number; closedAt?: number } = {
        socket,
        openedAt: Date.now(),
      };
      silentSockets.push(entry);
      // Read (and drop) what the client says, so its close is seen.
      socket.resume();
      socket.on("close", () => (entry.closedAt = Date.now()));
      socket.on("error", () => undefined);
    });
    silent.listen(22, "127.60.1.2");
    await once(silent, "listening");
  });

  after(async () => {
    await delivery?.close();
    for (const { socket } of silentSockets) {
      socket.destroy();
    }
    silent?.close();
    await vms?.stop();
  });

  it("never leaves a partial user-data when sshd dies mid-upload, and the retry removes the temp file", async () => {
    const vm = vms.sandbox.status()[0]!;
    const big = Buffer.alloc(256 * 1024 * 1024, "x");
    const uploading = delivery.deliver(vm.ip, big, {
      deadline: new Date(Date.now() + 8000),
    });
    const failed = uploading.then(
      () => undefined,
      (error: unknown) => error,
    );

    const temp = await waitFor(
      async () => {
        const names = await readdir(vm.cidataDir);
        const name = names.find((entry) => entry.startsWith(".user-data."));
        return name !== undefined &&
          (await stat(join(vm.cidataDir, name))).size > 0
          ? name
          : undefined;
      },
      { timeoutMs: 10_000, intervalMs: 5, what: "the upload to start" },
    );
    await vms.sandbox.stopVm(vm.ip);

    const error = await failed;
    assert.ok(
      error instanceof ByomError,
      `expected a ByomError, got ${String(error)}`,
    );
    assert.equal(error.code, "VM_UNREACHABLE");
    const after = await readdir(vm.cidataDir);
    assert.ok(
      !after.includes("user-data"),
      "the final path must not hold a partial file",
    );
    assert.ok(after.includes(temp), "the interrupted temp file is still there");

    await vms.sandbox.startVm(vm.ip);
    const small = await readFile(
      new URL("../fixtures/userdata/pod-basic.yaml", import.meta.url),
    );
    await delivery.deliver(vm.ip, small, {
      deadline: new Date(Date.now() + 5000),
    });
    assert.deepEqual(await readdir(vm.cidataDir), ["user-data"]);
    assert.deepEqual(await readFile(join(vm.cidataDir, "user-data")), small);
    await assertWholeUserData(vms.sandbox, new Set([sha256(small)]));
  });

  it("ends each attempt on a VM that accepts TCP but never speaks at its timeout", async () => {
    const started = Date.now();
    await assert.rejects(
      delivery.deliver("127.60.1.2", Buffer.from("x"), {
        deadline: new Date(started + 2000),
      }),
      (error: unknown) =>
        error instanceof ByomError && error.code === "VM_UNREACHABLE",
    );

    assert.ok(
      silentSockets.length >= 2,
      `expected retries, saw ${silentSockets.length} connection(s)`,
    );
    await waitFor(
      () => silentSockets.every((entry) => entry.closedAt !== undefined),
      {
        what: "every attempt's connection to be closed by the client",
      },
    );
    for (const entry of silentSockets) {
      const heldMs = entry.closedAt! - entry.openedAt;
      assert.ok(
        heldMs < 1500,
        `an attempt held its connection ${heldMs} ms; the timeout is 400 ms`,
      );
    }
    // The real VM still holds only what the first test delivered whole.
    const small = await readFile(
      new URL("../fixtures/userdata/pod-basic.yaml", import.meta.url),
    );
    await assertWholeUserData(vms.sandbox, new Set([sha256(small)]));
  });
});
