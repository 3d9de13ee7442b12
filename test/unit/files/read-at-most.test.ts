import assert from "node:assert/strict";
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, rm, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";

import { readAtMost } from "../../../src/files/index.js";

const run = promisify(execFile);

describe("readAtMost", () => {
  let dir: string;
  let writer: { process: ChildProcess; exited: Promise<unknown> } | undefined;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "byom-read-limited-"));
  });

  after(async () => {
    if (writer !== undefined) {
      // Usually gone already: closing the reader ends cat with SIGPIPE.
      writer.process.kill("SIGKILL");
      await writer.exited;
    }
    await rm(dir, { recursive: true, force: true });
  });

  it("returns a file shorter than the limit whole", async () => {
    const path = join(dir, "short.txt");
    await writeFile(path, "#cloud-config\n");
    assert.equal((await readAtMost(path, 1024)).toString(), "#cloud-config\n");
  });

  it("returns exactly the limit of a longer file, across chunks", async () => {
    const path = join(dir, "long.txt");
    const content = Buffer.alloc(200 * 1024, "abc");
    await writeFile(path, content);
    const limit = 150 * 1024 + 7;
    assert.deepEqual(await readAtMost(path, limit), content.subarray(0, limit));
  });

  it("stops at the limit on /dev/zero, which reports size 0", async () => {
    const read = await readAtMost("/dev/zero", 1025);
    assert.equal(read.length, 1025);
  });

  it("stops at the limit of a sparse file without reading it whole", async () => {
    const path = join(dir, "sparse.bin");
    await writeFile(path, "");
    await truncate(path, 600 * 1024 * 1024);
    assert.equal((await readAtMost(path, 4097)).length, 4097);
  });

  it("stops at the limit on a FIFO whose writer never stops", async () => {
    const fifo = join(dir, "endless.fifo");
    await run("mkfifo", [fifo]);
    const child = spawn("sh", ["-c", 'exec cat /dev/zero > "$1"', "sh", fifo], {
      stdio: "ignore",
    });
    writer = { process: child, exited: once(child, "exit") };
    assert.equal((await readAtMost(fifo, 100_001)).length, 100_001);
  });

  it("throws the fs error for a missing file and a directory", async () => {
    await assert.rejects(readAtMost(join(dir, "missing"), 10), {
      code: "ENOENT",
    });
    await assert.rejects(readAtMost(dir, 10), { code: "EISDIR" });
  });
});
