import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";

import { pino } from "pino";

import { HostKeyRejectedError } from "../../../src/errors/index.js";
import {
  createTofuPolicy,
  fingerprintOf,
  hostKeyFromBlob,
} from "../../../src/hostkeys/index.js";

const run = promisify(execFile);

const keyKinds = [
  { args: ["-t", "ed25519"], type: "ssh-ed25519" },
  { args: ["-t", "ecdsa", "-b", "256"], type: "ecdsa-sha2-nistp256" },
  { args: ["-t", "ecdsa", "-b", "384"], type: "ecdsa-sha2-nistp384" },
  { args: ["-t", "rsa", "-b", "2048"], type: "ssh-rsa" },
];

interface GeneratedKey {
  type: string;
  blob: Buffer;
  keygenFingerprint: string;
}

async function generate(
  dir: string,
  name: string,
  args: string[],
): Promise<Omit<GeneratedKey, "type">> {
  const path = join(dir, name);
  await run("ssh-keygen", ["-q", "-N", "", "-C", "test", "-f", path, ...args]);
  const publicLine = await readFile(`${path}.pub`, "utf8");
  const base64 = publicLine.trim().split(/\s+/)[1] ?? "";
  const { stdout } = await run("ssh-keygen", ["-l", "-f", `${path}.pub`]);
  // "<bits> SHA256:<hash> <comment> (<TYPE>)"
  const keygenFingerprint = stdout.trim().split(/\s+/)[1] ?? "";
  return { blob: Buffer.from(base64, "base64"), keygenFingerprint };
}

describe("host key fingerprints", () => {
  let dir: string;
  const keys: GeneratedKey[] = [];

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "byom-hostkeys-"));
    for (const [index, kind] of keyKinds.entries()) {
      const generated = await generate(dir, `key${index}`, kind.args);
      keys.push({ type: kind.type, ...generated });
    }
  });

  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("prints exactly what ssh-keygen -l prints, for every key type", () => {
    for (const key of keys) {
      assert.match(key.keygenFingerprint, /^SHA256:[A-Za-z0-9+/]{43}$/);
      assert.equal(fingerprintOf(key.blob), key.keygenFingerprint, key.type);
    }
  });

  it("reads the key type from the blob", () => {
    for (const key of keys) {
      const hostKey = hostKeyFromBlob(key.blob);
      assert.equal(hostKey.type, key.type);
      assert.equal(hostKey.fingerprint, key.keygenFingerprint);
      assert.deepEqual(hostKey.blob, key.blob);
    }
  });

  it("refuses a blob too short to hold a key type", () => {
    const malformed = [
      Buffer.alloc(0),
      Buffer.from([0, 0, 0]),
      Buffer.from([0, 0, 0, 0]),
      Buffer.from([0, 0, 0, 9, 0x73, 0x73, 0x68]),
      Buffer.from([0, 0, 0, 2, 0x0a, 0x00]),
    ];
    for (const blob of malformed) {
      assert.throws(() => hostKeyFromBlob(blob), HostKeyRejectedError);
    }
  });
});

describe("trust-on-first-use policy", () => {
  it("accepts any key and logs ip, type and fingerprint at info", () => {
    const lines: Record<string, unknown>[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        lines.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
        callback();
      },
    });
    const policy = createTofuPolicy({ logger: pino({ level: "info" }, sink) });
    const blob = Buffer.concat([
      Buffer.from([0, 0, 0, 11]),
      Buffer.from("ssh-ed25519"),
      Buffer.from([0, 0, 0, 32]),
      Buffer.alloc(32, 7),
    ]);
    const key = hostKeyFromBlob(blob);

    assert.deepEqual(policy.check("127.30.0.1", key), { ok: true });

    assert.equal(policy.mode, "tofu");
    assert.equal(policy.algorithms(), undefined);
    assert.deepEqual(policy.readiness(), { ok: true });
    assert.equal(lines.length, 1);
    assert.equal(lines[0]?.level, 30);
    assert.equal(lines[0]?.ip, "127.30.0.1");
    assert.equal(lines[0]?.keyType, "ssh-ed25519");
    assert.equal(lines[0]?.fingerprint, key.fingerprint);
  });

  it("closes twice without error", async () => {
    const policy = createTofuPolicy();
    await policy.close();
    await policy.close();
    await policy[Symbol.asyncDispose]();
  });
});
