import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readdir } from "node:fs/promises";
import { tmpdir } from "node:os";
import { describe, it } from "node:test";
import { promisify } from "node:util";

const run = promisify(execFile);
const cli = new URL("../../bin/byom.js", import.meta.url).pathname;

async function leftovers(): Promise<string[]> {
  const temporary = (await readdir(tmpdir())).filter(
    (name) => name.startsWith("byom-nats-") || name.startsWith("byom-demo-"),
  );
  const state = (await readdir("/var/lib")).filter((name) =>
    name.startsWith("byom-demo-"),
  );
  const { stdout } = await run("ps", ["-eo", "args"]);
  const processes = stdout
    .split("\n")
    .filter((line) => /sshd .*byom-demo-|nats-server .*byom-nats-/.test(line));
  return [...temporary, ...state, ...processes];
}

describe("byom demo", () => {
  it("provisions three pods, deletes one, and leaves nothing behind", async () => {
    const before = await leftovers();
    const { stdout } = await run(
      process.execPath,
      [cli, "demo", "--json", "--first-ip", "127.42.0.2"],
      {
        env: { ...process.env, NATS_URL: "" },
        timeout: 60_000,
      },
    );

    const summary = JSON.parse(stdout) as {
      ok: boolean;
      seconds: number;
      pods: Array<{ ip: string; sent: string; held: string }>;
      deleted: {
        ip: string;
        bootsBefore: number;
        bootsAfter: number;
        state: string;
      };
    };
    assert.equal(summary.ok, true);
    assert.equal(summary.pods.length, 3);
    assert.equal(new Set(summary.pods.map((pod) => pod.ip)).size, 3);
    for (const pod of summary.pods) {
      assert.equal(pod.held, pod.sent);
    }
    assert.equal(summary.deleted.state, "free");
    assert.equal(summary.deleted.bootsAfter, summary.deleted.bootsBefore + 1);
    assert.deepEqual(await leftovers(), before);
  });

  it("narrates each step for a person", async () => {
    const { stdout } = await run(
      process.execPath,
      [cli, "demo", "--first-ip", "127.42.1.2"],
      {
        env: { ...process.env, NATS_URL: "" },
        timeout: 60_000,
      },
    );
    assert.match(stdout, /started nats-server -js/);
    assert.match(stdout, /sha256 held [0-9a-f]{64}\s+match/);
    assert.match(stdout, /host key after\s+SHA256:/);
    assert.match(stdout, /cleaned up/);
  });
});
