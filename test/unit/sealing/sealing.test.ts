import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { ByomError } from "../../../src/errors/index.js";
import { decodeRequest } from "../../../src/protocol/index.js";
import {
  checkSealingPublicKey,
  createSealingKeyPair,
  createUnsealer,
  loadSealingSeeds,
  openUserData,
  sealUserData,
  sealingPublicKeyOf,
} from "../../../src/sealing/index.js";

const text =
  "#cloud-config\nwrite_files:\n  - path: /run/peerpod/a\n    content: é\n";

function invalid(pattern: RegExp): (error: unknown) => boolean {
  return (error: unknown) => {
    assert.ok(error instanceof ByomError);
    assert.equal(error.code, "INVALID_REQUEST");
    assert.match(error.message, pattern);
    return true;
  };
}

describe("sealing", () => {
  it("seals to a public key and opens with its seed, byte for byte", () => {
    const pair = createSealingKeyPair();
    assert.match(pair.publicKey, /^X[A-Z2-7]{55}$/);
    assert.match(pair.seed, /^SX/);
    assert.equal(sealingPublicKeyOf(pair.seed), pair.publicKey);
    const sealed = sealUserData(text, pair.publicKey);
    assert.equal(sealed.alg, "x25519-xsalsa20-poly1305");
    assert.ok(!Buffer.from(sealed.box, "base64").toString().includes("cloud"));
    assert.equal(openUserData(sealed, pair.seed), text);
  });

  it("uses a fresh sender key for every message", () => {
    const pair = createSealingKeyPair();
    const first = sealUserData(text, pair.publicKey);
    const second = sealUserData(text, pair.publicKey);
    assert.notEqual(first.sender, second.sender);
    assert.notEqual(first.box, second.box);
  });

  it("tries every seed of a rotation, and names userDataSealed when none opens it", () => {
    const oldPair = createSealingKeyPair();
    const newPair = createSealingKeyPair();
    const unseal = createUnsealer([newPair.seed, oldPair.seed]);
    assert.equal(unseal(sealUserData(text, oldPair.publicKey)), text);
    assert.equal(unseal(sealUserData(text, newPair.publicKey)), text);
    assert.throws(
      () => openUserData(sealUserData(text, oldPair.publicKey), newPair.seed),
      invalid(/^field "userDataSealed" cannot be opened/),
    );
    const damaged = sealUserData(text, newPair.publicKey);
    damaged.box = Buffer.from("xkv1 and not a box").toString("base64");
    assert.throws(() => unseal(damaged), invalid(/cannot be opened/));
  });

  it("refuses bad keys without repeating a seed", () => {
    assert.throws(
      () => checkSealingPublicKey("UABC"),
      /must be an xkey public key/,
    );
    assert.throws(
      () => createUnsealer(["SXNOTASEEDATALL"]),
      (error: unknown) =>
        error instanceof ByomError &&
        /must be an xkey seed/.test(error.message) &&
        !error.message.includes("SXNOTASEEDATALL"),
    );
  });

  it("fits the wire schema as userDataSealed, exclusive with userData", () => {
    const pair = createSealingKeyPair();
    const create = {
      v: 1,
      kind: "create",
      requestId: "r1",
      podName: "web-1",
      podNamespace: "default",
      sandboxId: "s1",
      requestingNode: "node-a",
      deadline: "2099-01-01T00:00:00Z",
      userDataSealed: sealUserData(text, pair.publicKey),
    };
    const encode = (value: unknown): Uint8Array =>
      new TextEncoder().encode(JSON.stringify(value));
    assert.ok(decodeRequest(encode(create), "create"));
    assert.throws(
      () => decodeRequest(encode({ ...create, userData: text }), "create"),
      invalid(/fields "userData" and "userDataSealed" are exclusive/),
    );
  });

  it("reads a seed file of a device or huge size only so far, and refuses it", async () => {
    await assert.rejects(
      loadSealingSeeds("/dev/zero"),
      (error: unknown) =>
        error instanceof ByomError &&
        /^sealing seed file "\/dev\/zero" must be an xkey seed/.test(
          error.message,
        ),
    );
  });
});
