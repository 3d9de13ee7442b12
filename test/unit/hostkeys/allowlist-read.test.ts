import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import {
  createAllowlistPolicy,
  createHostKeyPolicy,
  hostKeyFromBlob,
  maxFileBytes,
  maxKeysPerFile,
  readAllowlistDir,
} from "../../../src/hostkeys/index.js";
import { makePublicKeys, type TestKey } from "../../helpers/secret-volume.js";

describe("readAllowlistDir", () => {
  let root: string;
  let keys: TestKey[];
  let ecdsa: TestKey;
  let rsa: TestKey;
  let dirCount = 0;

  before(async () => {
    root = await mkdtemp(join(tmpdir(), "byom-allowlist-unit-"));
    keys = await makePublicKeys(6);
    [ecdsa] = (await makePublicKeys(1, "ecdsa")) as [TestKey];
    [rsa] = (await makePublicKeys(1, "rsa")) as [TestKey];
  });

  after(async () => {
    await rm(root, { recursive: true, force: true });
  });

  async function dirWith(files: Record<string, string>): Promise<string> {
    dirCount += 1;
    const dir = join(root, `d${dirCount}`);
    await mkdir(dir, { recursive: true });
    for (const [name, content] of Object.entries(files)) {
      await writeFile(join(dir, name), content);
    }
    return dir;
  }

  const key = (index: number): TestKey => {
    const found = keys[index];
    assert.ok(found);
    return found;
  };

  it("trusts every key of every *.pub file, with comments, blank lines and CRLF", async () => {
    const dir = await dirWith({
      "a.pub": `# vm 1\r\n\r\n${key(0).line}\r\n  ${key(1).line}  \r\n`,
      "b.pub": `${ecdsa.line}\n\n# rsa\n${rsa.line}`,
      "notes.txt": key(2).line,
      ".hidden.pub": key(3).line,
    });

    const read = await readAllowlistDir(dir);

    assert.deepEqual(
      read.keys.map((entry) => [entry.file, entry.line, entry.fingerprint]),
      [
        ["a.pub", 3, key(0).fingerprint],
        ["a.pub", 4, key(1).fingerprint],
        ["b.pub", 1, ecdsa.fingerprint],
        ["b.pub", 4, rsa.fingerprint],
      ],
    );
    assert.deepEqual(
      read.keys.map((entry) => entry.type),
      ["ssh-ed25519", "ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"],
    );
    assert.equal(read.keys[0]?.comment, "test-0");
    assert.deepEqual(read.skipped, []);
    assert.deepEqual(read.problems, []);
    assert.equal(read.complete, true);
  });

  it("reports known_hosts lines, hashed ones and markers with file, line and fix, and never trusts them", async () => {
    const [type, base64] = key(0).line.split(" ");
    const dir = await dirWith({
      "hosts.pub": [
        `10.0.0.5 ${type} ${base64}`,
        `|1|F1E1KeoE/eEWhi10WpGv4OdiO6Y=|3988QV0VE8wmZL7suNrYQLITLCg= ${type} ${base64}`,
        `@cert-authority *.example ${type} ${base64}`,
        `vm-1,10.0.0.6 ${type} ${base64}`,
        `${key(1).line}`,
      ].join("\n"),
    });

    const read = await readAllowlistDir(dir);

    assert.deepEqual(
      read.keys.map((entry) => entry.fingerprint),
      [key(1).fingerprint],
    );
    assert.deepEqual(
      read.skipped.map((line) => [line.file, line.line]),
      [
        ["hosts.pub", 1],
        ["hosts.pub", 2],
        ["hosts.pub", 3],
        ["hosts.pub", 4],
      ],
    );
    assert.match(
      read.skipped[0]?.reason ?? "",
      /known_hosts form.*"10\.0\.0\.5".*remove it/,
    );
    assert.match(read.skipped[1]?.reason ?? "", /hashed host/);
    assert.match(read.skipped[2]?.reason ?? "", /@cert-authority/);
    assert.match(read.skipped[3]?.reason ?? "", /known_hosts form/);
  });

  it("skips unknown types, certificates and malformed keys with a reason", async () => {
    const [, base64 = ""] = key(0).line.split(" ");
    const dir = await dirWith({
      "bad.pub": [
        `ssh-dss ${base64}`,
        `ssh-ed25519-cert-v01@openssh.com ${base64}`,
        `ssh-ed25519 ${base64.slice(0, 20)}`,
        `ecdsa-sha2-nistp256 ${base64}`,
        "hello world",
        key(2).line,
      ].join("\n"),
    });

    const read = await readAllowlistDir(dir);

    assert.equal(read.keys.length, 1);
    assert.deepEqual(
      read.skipped.map((line) => line.line),
      [1, 2, 3, 4, 5],
    );
    assert.match(read.skipped[0]?.reason ?? "", /ssh-dss is not supported/);
    assert.match(read.skipped[2]?.reason ?? "", /malformed ssh-ed25519/);
    assert.match(read.skipped[3]?.reason ?? "", /ecdsa-sha2-nistp256/);
    assert.match(read.skipped[4]?.reason ?? "", /not a public key line/);
  });

  it("skips a duplicate fingerprint and names the first place it was listed", async () => {
    const dir = await dirWith({
      "a.pub": key(0).line,
      "b.pub": `${key(1).line}\n${key(0).line.replace("test-0", "again")}`,
    });

    const read = await readAllowlistDir(dir);

    assert.equal(read.keys.length, 2);
    assert.deepEqual(read.skipped, [
      {
        file: "b.pub",
        line: 2,
        reason: `duplicate of a.pub:1 (${key(0).fingerprint}); skipped`,
      },
    ]);
  });

  it(`reads at most ${maxKeysPerFile} keys and ${maxFileBytes} bytes a file and reports the rest`, async () => {
    const many = await makePublicKeys(maxKeysPerFile + 2);
    const padding = `# ${"x".repeat(200)}\n`;
    const big = `${key(4).line}\n${padding.repeat(100)}${key(5).line}\n`;
    const dir = await dirWith({
      "many.pub": many.map((entry) => entry.line).join("\n"),
      "big.pub": big,
    });

    const read = await readAllowlistDir(dir);

    assert.equal(
      read.keys.filter((entry) => entry.file === "many.pub").length,
      maxKeysPerFile,
    );
    assert.deepEqual(
      read.keys
        .filter((entry) => entry.file === "big.pub")
        .map((entry) => entry.line),
      [1],
    );
    const bigSkip = read.skipped.find((line) => line.file === "big.pub");
    assert.match(
      bigSkip?.reason ?? "",
      /file is \d+ bytes; only the first 16384 bytes/,
    );
    const manySkip = read.skipped.find((line) => line.file === "many.pub");
    assert.equal(manySkip?.line, maxKeysPerFile + 1);
    assert.match(manySkip?.reason ?? "", /more than 100 keys/);
  });

  it("fails closed on a missing directory, a file instead of a directory, and an empty set", async () => {
    const missing = await readAllowlistDir(join(root, "nope"));
    const empty = await readAllowlistDir(
      await dirWith({ "a.pub": "# none\n" }),
    );
    const noFiles = await readAllowlistDir(await dirWith({}));
    const file = join(root, "single.pub");
    await writeFile(file, key(0).line);
    const notDir = await readAllowlistDir(file);

    for (const read of [missing, empty, noFiles, notDir]) {
      assert.equal(read.keys.length, 0);
      assert.equal(read.problems.length, 1);
    }
    assert.match(missing.problems[0] ?? "", /does not exist/);
    assert.match(empty.problems[0] ?? "", /holds no usable key/);
    assert.match(noFiles.problems[0] ?? "", /has no \*\.pub file/);
    assert.match(
      notDir.problems[0] ?? "",
      /is a file.*mount the Secret as a directory/,
    );
  });

  it("refuses every VM and reports not ready when the directory is missing or empty, never falling back to TOFU", async () => {
    const missing = await createAllowlistPolicy({
      dir: join(root, "absent"),
      reloadIntervalMs: 0,
    });
    const empty = await createHostKeyPolicy({
      allowlistDir: await dirWith({ "a.pub": "\n" }),
      reloadIntervalMs: 0,
    });
    try {
      const blob = Buffer.from(key(0).line.split(" ")[1] ?? "", "base64");
      for (const policy of [missing, empty]) {
        assert.equal(policy.mode, "allowlist");
        const decision = policy.check("127.0.0.9", hostKeyFromBlob(blob));
        assert.equal(decision.ok, false);
        assert.equal(policy.readiness().ok, false);
        assert.ok(policy.readiness().reason);
      }
      assert.match(missing.readiness().reason ?? "", /does not exist/);
    } finally {
      await missing.close();
      await missing.close();
      await empty.close();
    }
  });

  it("chooses TOFU without a directory", async () => {
    const policy = await createHostKeyPolicy({ allowlistDir: "" });
    assert.equal(policy.mode, "tofu");
    await policy.close();
  });

  it("offers only the host key algorithms of the listed types", async () => {
    const policy = await createAllowlistPolicy({
      dir: await dirWith({ "a.pub": `${rsa.line}\n${ecdsa.line}\n` }),
      reloadIntervalMs: 0,
    });
    try {
      assert.deepEqual(policy.algorithms(), [
        "ecdsa-sha2-nistp256",
        "rsa-sha2-512",
        "rsa-sha2-256",
        "ssh-rsa",
      ]);
      assert.equal(policy.status().keys, 2);
      assert.ok(policy.status().lastReloadAt instanceof Date);

      const seen: number[] = [];
      const unsubscribe = policy.onReload((reload) => seen.push(reload.keys));
      await policy.reload();
      unsubscribe();
      await policy.reload();
      assert.deepEqual(seen, [2]);
    } finally {
      await policy.close();
    }
  });
});
