import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { generateKeyPairSync, randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";

import { createDelivery, loadPrivateKey } from "../../../src/delivery/index.js";
import { ConfigError } from "../../../src/errors/index.js";
import { createTofuPolicy } from "../../../src/hostkeys/index.js";

const run = promisify(execFile);

/** An SSH wire string: uint32 length, then the bytes. */
function sshString(value: string | Buffer): Buffer {
  const bytes = typeof value === "string" ? Buffer.from(value) : value;
  const length = Buffer.alloc(4);
  length.writeUInt32BE(bytes.length);
  return Buffer.concat([length, bytes]);
}

/** An OpenSSH private key file around `body`, wrapped as ssh-keygen does. */
function openSshPem(body: Buffer): string {
  const lines = body.toString("base64").match(/.{1,70}/g) ?? [];
  return `-----BEGIN OPENSSH PRIVATE KEY-----\n${lines.join("\n")}\n-----END OPENSSH PRIVATE KEY-----\n`;
}

const openSshMagic = Buffer.from("openssh-key-v1\0", "latin1");

/**
 * Fails when `message` holds anything of `payload`: a 4-byte window in any
 * single-byte or UTF-8 reading, a printable-ASCII run, or base64 of it.
 */
function assertNoKeyBytes(message: string, payload: Buffer): void {
  assert.match(message, /^[\x20-\x7e]*$/, "message has non-ASCII bytes");
  for (let start = 0; start + 4 <= payload.length; start += 1) {
    const window = payload.subarray(start, start + 4);
    for (const reading of [
      window.toString("latin1"),
      window.toString("utf8"),
    ]) {
      if (/^[\x20-\x7e]{4}$/.test(reading) && /[A-Z]{2}/.test(reading)) {
        assert.ok(
          !message.includes(reading),
          `message holds key bytes "${reading}": ${message}`,
        );
      }
    }
  }
  assert.ok(!message.includes(payload.toString("base64").slice(0, 12)));
}

describe("loadPrivateKey", () => {
  let dir: string;

  /** Makes a key with ssh-keygen; returns its path and `ssh-keygen -l` fingerprint. */
  async function keygen(
    name: string,
    args: string[],
    passphrase = "",
  ): Promise<{ path: string; fingerprint: string }> {
    const path = join(dir, name);
    await run("ssh-keygen", [
      "-q",
      "-N",
      passphrase,
      "-C",
      "",
      "-f",
      path,
      ...args,
    ]);
    const { stdout } = await run("ssh-keygen", ["-l", "-f", `${path}.pub`]);
    return { path, fingerprint: stdout.split(/\s+/)[1] ?? "" };
  }

  async function assertConfigError(
    promise: Promise<unknown>,
    pattern: RegExp,
    path: string,
  ): Promise<ConfigError> {
    const error = await promise.then(
      () => assert.fail("expected a ConfigError"),
      (caught: unknown) => caught,
    );
    assert.ok(error instanceof ConfigError, String(error));
    assert.match(error.message, pattern);
    assert.ok(error.message.includes(path), error.message);
    assert.doesNotMatch(error.message, /BEGIN|AAAA/);
    return error;
  }

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "byom-keys-"));
  });

  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("loads an OpenSSH ed25519 key", async () => {
    const { path, fingerprint } = await keygen("ed25519", ["-t", "ed25519"]);
    const loaded = await loadPrivateKey(path);
    assert.equal(loaded.type, "ssh-ed25519");
    assert.equal(loaded.publicFingerprint, fingerprint);
    assert.deepEqual(loaded.key, await readFile(path));
  });

  it("loads a PKCS#1 RSA key", async () => {
    const { path, fingerprint } = await keygen("rsa-pem", [
      "-t",
      "rsa",
      "-b",
      "2048",
      "-m",
      "PEM",
    ]);
    assert.match(await readFile(path, "utf8"), /BEGIN RSA PRIVATE KEY/);
    const loaded = await loadPrivateKey(path);
    assert.equal(loaded.type, "ssh-rsa");
    assert.equal(loaded.publicFingerprint, fingerprint);
  });

  it("loads a SEC1 EC key", async () => {
    const { path, fingerprint } = await keygen("ec-pem", [
      "-t",
      "ecdsa",
      "-m",
      "PEM",
    ]);
    assert.match(await readFile(path, "utf8"), /BEGIN EC PRIVATE KEY/);
    const loaded = await loadPrivateKey(path);
    assert.equal(loaded.type, "ecdsa-sha2-nistp256");
    assert.equal(loaded.publicFingerprint, fingerprint);
  });

  it("converts PKCS#8 RSA and EC keys to PKCS#1 and SEC1", async () => {
    const rsa = await keygen("rsa-p8", [
      "-t",
      "rsa",
      "-b",
      "2048",
      "-m",
      "PKCS8",
    ]);
    const ec = await keygen("ec-p8", [
      "-t",
      "ecdsa",
      "-b",
      "384",
      "-m",
      "PKCS8",
    ]);
    assert.match(await readFile(rsa.path, "utf8"), /BEGIN PRIVATE KEY/);

    const loadedRsa = await loadPrivateKey(rsa.path);
    const loadedEc = await loadPrivateKey(ec.path);

    assert.match(loadedRsa.key.toString(), /BEGIN RSA PRIVATE KEY/);
    assert.equal(loadedRsa.publicFingerprint, rsa.fingerprint);
    assert.match(loadedEc.key.toString(), /BEGIN EC PRIVATE KEY/);
    assert.equal(loadedEc.type, "ecdsa-sha2-nistp384");
    assert.equal(loadedEc.publicFingerprint, ec.fingerprint);
  });

  it("decrypts an encrypted PKCS#8 key with its passphrase", async () => {
    const path = join(dir, "rsa-p8-encrypted");
    const { privateKey } = generateKeyPairSync("rsa", {
      modulusLength: 2048,
      privateKeyEncoding: {
        type: "pkcs8",
        format: "pem",
        cipher: "aes-256-cbc",
        passphrase: "correct horse",
      },
      publicKeyEncoding: { type: "spki", format: "pem" },
    });
    await writeFile(path, privateKey, { mode: 0o600 });

    const loaded = await loadPrivateKey(path, "correct horse");
    assert.equal(loaded.type, "ssh-rsa");
    await assertConfigError(
      loadPrivateKey(path),
      /encrypted and no passphrase/,
      path,
    );
    await assertConfigError(
      loadPrivateKey(path, "wrong"),
      /wrong passphrase/,
      path,
    );
  });

  it("refuses an ed25519 PKCS#8 key and says how to convert it", async () => {
    const path = join(dir, "ed25519-p8");
    const { privateKey } = generateKeyPairSync("ed25519", {
      privateKeyEncoding: { type: "pkcs8", format: "pem" },
      publicKeyEncoding: { type: "spki", format: "pem" },
    });
    await writeFile(path, privateKey, { mode: 0o600 });
    await assertConfigError(
      loadPrivateKey(path),
      /ssh-keygen -p -f .* -m RFC4716/,
      path,
    );
  });

  it("refuses an encrypted key without passphrase, and with a wrong one", async () => {
    const openssh = await keygen(
      "ed25519-encrypted",
      ["-t", "ed25519"],
      "secret-pass",
    );
    const pem = await keygen(
      "rsa-pem-encrypted",
      ["-t", "rsa", "-b", "2048", "-m", "PEM"],
      "secret-pass",
    );
    for (const { path } of [openssh, pem]) {
      await assertConfigError(
        loadPrivateKey(path),
        /is encrypted and no passphrase is set/,
        path,
      );
      await assertConfigError(
        loadPrivateKey(path, "nope"),
        /wrong passphrase/,
        path,
      );
    }
    const loaded = await loadPrivateKey(openssh.path, "secret-pass");
    assert.equal(loaded.publicFingerprint, openssh.fingerprint);
  });

  it("refuses a public key given instead of the private key", async () => {
    const { path } = await keygen("given-public", ["-t", "ed25519"]);
    const pemPublic = join(dir, "public.pem");
    const { publicKey } = generateKeyPairSync("ec", {
      namedCurve: "prime256v1",
      publicKeyEncoding: { type: "spki", format: "pem" },
      privateKeyEncoding: { type: "pkcs8", format: "pem" },
    });
    await writeFile(pemPublic, publicKey);
    await assertConfigError(
      loadPrivateKey(`${path}.pub`),
      /holds a public key/,
      `${path}.pub`,
    );
    await assertConfigError(
      loadPrivateKey(pemPublic),
      /holds a public key/,
      pemPublic,
    );
  });

  it("refuses a missing file, an empty file and garbage", async () => {
    const missing = join(dir, "missing");
    const empty = join(dir, "empty");
    const garbage = join(dir, "garbage");
    await writeFile(empty, "");
    await writeFile(garbage, "not a key at all\n");
    const error = await assertConfigError(
      loadPrivateKey(missing),
      /cannot be read: ENOENT/,
      missing,
    );
    assert.equal((error.cause as NodeJS.ErrnoException).code, "ENOENT");
    await assertConfigError(loadPrivateKey(empty), /is empty/, empty);
    await assertConfigError(
      loadPrivateKey(garbage),
      /not a supported private key/,
      garbage,
    );
  });

  it("stops reading a file that is far too large for a key", async () => {
    await assertConfigError(
      loadPrivateKey("/dev/zero"),
      /^ssh private key \/dev\/zero is larger than 65536 bytes: not a private key file$/,
      "/dev/zero",
    );
  });

  it("never puts key bytes in the message of a delivery given a damaged key", () => {
    const payload = Buffer.concat([
      Buffer.from("KEYMAGICSECRET!"),
      randomBytes(64),
    ]);
    assert.throws(
      () =>
        createDelivery({
          privateKey: Buffer.from(openSshPem(payload)),
          policy: createTofuPolicy(),
          connectTimeoutMs: 1000,
        }),
      (error: unknown) => {
        assert.ok(error instanceof ConfigError, String(error));
        assert.match(error.message, /^delivery privateKey is not a supported/);
        assert.ok(!error.message.includes("KEYMAGIC"), error.message);
        assertNoKeyBytes(error.message, payload);
        return true;
      },
    );
  });

  describe("never puts key bytes in the message of a damaged key", () => {
    async function refusal(name: string, body: Buffer): Promise<string> {
      const path = join(dir, name);
      await writeFile(path, openSshPem(body), { mode: 0o600 });
      const error = await assertConfigError(
        loadPrivateKey(path),
        /is not a supported private key \(/,
        path,
      );
      assert.equal(error.cause, undefined, "the ssh2 error is chained");
      return error.message;
    }

    it("random bytes after the OpenSSH header", async () => {
      const payload = randomBytes(512);
      const message = await refusal("random-openssh", payload);
      assert.match(message, /\(unsupported OpenSSH key format\)/);
      assertNoKeyBytes(message, payload);
    });

    it("a printable magic that is not openssh-key-v1", async () => {
      const payload = Buffer.concat([
        Buffer.from("KEYMAGICSECRET!"),
        randomBytes(64),
      ]);
      const message = await refusal("printable-magic", payload);
      assert.ok(!message.includes("KEYMAGIC"), message);
      assertNoKeyBytes(message, payload);
    });

    it("an unknown cipher, key derivation or key type named in the file", async () => {
      const cipher = Buffer.concat([
        openSshMagic,
        sshString("CIPHERSECRET-cbc"),
        randomBytes(40),
      ]);
      const kdf = Buffer.concat([
        openSshMagic,
        sshString("aes256-ctr"),
        sshString("KDFSECRET"),
        randomBytes(40),
      ]);
      const privateSection = Buffer.concat([
        Buffer.from([1, 2, 3, 4, 1, 2, 3, 4]),
        sshString("TYPESECRET-ssh"),
        randomBytes(40),
      ]);
      const type = Buffer.concat([
        openSshMagic,
        sshString("none"),
        sshString("none"),
        sshString(""),
        Buffer.from([0, 0, 0, 1]),
        sshString(sshString("TYPESECRET-ssh")),
        sshString(privateSection),
      ]);
      const cases = [
        { name: "cipher", body: cipher, reason: /unsupported cipher/ },
        { name: "kdf", body: kdf, reason: /unsupported key derivation/ },
        { name: "type", body: type, reason: /unsupported key type/ },
      ];
      for (const { name, body, reason } of cases) {
        const message = await refusal(`unknown-${name}`, body);
        assert.match(message, reason);
        assertNoKeyBytes(message, body);
        assert.doesNotMatch(message, /SECRET/);
      }
    });
  });
});
