import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { mkdtemp, rm, truncate, writeFile } from "node:fs/promises";
import { createServer, type AddressInfo, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

const cli = new URL("../../bin/byom.js", import.meta.url).pathname;

interface CliRun {
  code: number | string | null;
  stdout: string;
  stderr: string;
  elapsedMs: number;
}

describe("byom create reads --user-data up to BYOM_MAX_USER_DATA_BYTES", () => {
  const capBytes = 1024;
  let workDir: string;
  // Stands in for NATS: a create that reads the file first connects to no one.
  let listener: Server;
  let connections = 0;
  let env: NodeJS.ProcessEnv;

  function create(userData: string): Promise<CliRun> {
    const started = Date.now();
    return new Promise((resolve) => {
      execFile(
        process.execPath,
        [
          cli,
          "create",
          "--pod",
          "p",
          "--sandbox-id",
          "s",
          "--user-data",
          userData,
          "--json",
        ],
        { env, timeout: 15_000, maxBuffer: 64 * 1024 },
        (error, stdout, stderr) => {
          const code = error === null ? 0 : (error.code ?? error.signal);
          resolve({
            code: code ?? null,
            stdout,
            stderr,
            elapsedMs: Date.now() - started,
          });
        },
      );
    });
  }

  function assertTooLarge(run: CliRun, file: string): void {
    assert.equal(run.code, 2, `${run.stderr}${run.stdout}`);
    const output = JSON.parse(run.stdout) as {
      ok: boolean;
      error: { code: string; message: string; retryable: boolean };
    };
    assert.equal(output.ok, false);
    assert.equal(output.error.code, "PAYLOAD_TOO_LARGE");
    assert.equal(output.error.retryable, false);
    assert.ok(output.error.message.includes(`"${file}"`), output.error.message);
    assert.match(
      output.error.message,
      new RegExp(
        `is larger than .*${capBytes} bytes.*BYOM_MAX_USER_DATA_BYTES=${capBytes}.*nothing was sent`,
      ),
    );
    assert.doesNotMatch(output.error.message, /UTF-8/);
    assert.equal(connections, 0, "the CLI connected to NATS");
  }

  before(async () => {
    workDir = await mkdtemp(join(tmpdir(), "byom-cli-user-data-"));
    listener = createServer((socket) => {
      connections += 1;
      socket.destroy();
    });
    listener.listen(0, "127.0.0.1");
    await once(listener, "listening");
    const { port } = listener.address() as AddressInfo;
    env = {
      PATH: process.env.PATH ?? "",
      NATS_URL: `nats://127.0.0.1:${port}`,
      NODE_NAME: "user-data-node",
      BYOM_MAX_USER_DATA_BYTES: String(capBytes),
    };
  });

  after(async () => {
    listener?.close();
    await rm(workDir, { recursive: true, force: true });
  });

  it("stops reading /dev/zero at the cap and refuses it fast", async () => {
    const run = await create("/dev/zero");
    assertTooLarge(run, "/dev/zero");
    assert.ok(run.elapsedMs < 10_000, `took ${run.elapsedMs} ms`);
  });

  it("refuses a large sparse file by its size, not its encoding", async () => {
    const sparse = join(workDir, "sparse.bin");
    await writeFile(sparse, "");
    await truncate(sparse, 600 * 1024 * 1024);
    assertTooLarge(await create(sparse), sparse);
  });

  it("refuses random binary over the cap as too large, not as bad UTF-8", async () => {
    const binary = join(workDir, "random.bin");
    await writeFile(binary, randomBytes(4 * capBytes));
    assertTooLarge(await create(binary), binary);
  });

  it("refuses a file one byte over the cap", async () => {
    const justOver = join(workDir, "just-over.yaml");
    await writeFile(
      justOver,
      `#cloud-config\n#${"x".repeat(capBytes - "#cloud-config\n#".length)}\n`,
    );
    assertTooLarge(await create(justOver), justOver);
  });

  it("sends a file of exactly the cap on to NATS", async () => {
    const atCap = join(workDir, "at-cap.yaml");
    // Valid user-data (a mapping), padded with a comment to the cap.
    const head =
      "#cloud-config\nwrite_files:\n  - path: /run/peerpod/x\n    content: x\n#";
    await writeFile(
      atCap,
      `${head}${"x".repeat(capBytes - head.length - 1)}\n`,
    );
    const connectionsBefore = connections;
    const run = await create(atCap);
    // The stand-in server speaks no NATS, so the create fails after that.
    assert.equal(run.code, 7, `${run.stderr}${run.stdout}`);
    assert.match(run.stdout, /"code":"UNAVAILABLE"/);
    assert.ok(
      connections > connectionsBefore,
      "the CLI never tried to connect",
    );
  });
});
