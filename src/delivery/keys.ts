import { createPrivateKey, type KeyObject } from "node:crypto";

import ssh2 from "ssh2";
import type { ParsedKey } from "ssh2";

import { ConfigError } from "../errors/index.js";
import { readAtMost } from "../files/index.js";
import { fingerprintOf } from "../hostkeys/index.js";

/** The agent's SSH client key, checked and in a format ssh2 reads. */
export interface LoadedPrivateKey {
  /** Key bytes for ssh2 (PKCS#8 input comes back as PKCS#1 or SEC1 PEM). */
  key: Buffer;
  /** SSH key type, e.g. "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256". */
  type: string;
  /** `SHA256:` fingerprint of the public half, as `ssh-keygen -l` prints it. */
  publicFingerprint: string;
}

const pkcs8Pattern = /-----BEGIN (ENCRYPTED )?PRIVATE KEY-----/;
const pemPublicPattern =
  /-----BEGIN (RSA |EC )?PUBLIC KEY-----|---- BEGIN SSH2 PUBLIC KEY ----/;

/**
 * Reads and checks the agent's private key file. Accepts OpenSSH, PKCS#1
 * RSA and SEC1 EC PEM keys (encrypted ones with `passphrase`), and converts
 * PKCS#8 RSA and EC keys, which ssh2 cannot read, to PKCS#1/SEC1.
 *
 * @throws ConfigError naming the path and the cause: missing or unreadable
 *   file, a public key instead of a private one, an encrypted key without
 *   (or with a wrong) passphrase, an ed25519 PKCS#8 key, an unknown format.
 *   Messages never contain key material.
 */
export async function loadPrivateKey(
  path: string,
  passphrase?: string,
): Promise<LoadedPrivateKey> {
  let raw: Buffer;
  try {
    raw = await readAtMost(path, maxKeyFileBytes + 1);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? "read error";
    throw new ConfigError(`ssh private key ${path} cannot be read: ${code}`, {
      cause: error,
    });
  }
  if (raw.length > maxKeyFileBytes) {
    throw new ConfigError(
      `ssh private key ${path} is larger than ${maxKeyFileBytes} bytes: not a private key file`,
    );
  }
  const text = raw.toString("utf8");
  if (text.trim() === "") {
    throw new ConfigError(`ssh private key ${path} is empty`);
  }
  if (pemPublicPattern.test(text)) {
    throw publicKeyGiven(path);
  }

  const key = pkcs8Pattern.test(text)
    ? convertPkcs8(path, text, passphrase)
    : raw;
  const parsed = parseWithSsh2(path, key, passphrase);
  if (!parsed.isPrivateKey()) {
    throw publicKeyGiven(path);
  }
  return {
    key,
    type: parsed.type,
    publicFingerprint: fingerprintOf(parsed.getPublicSSH()),
  };
}

function publicKeyGiven(path: string): ConfigError {
  return new ConfigError(
    `ssh private key ${path} holds a public key: give the private key file (the one without .pub)`,
  );
}

function parseWithSsh2(
  path: string,
  key: Buffer,
  passphrase: string | undefined,
): ParsedKey {
  let result: ParsedKey | ParsedKey[] | Error;
  try {
    result = ssh2.utils.parseKey(key, passphrase);
  } catch (error) {
    result = error instanceof Error ? error : new Error(String(error));
  }
  if (result instanceof Error) {
    // No cause: ssh2's message may quote bytes of the key, and logs print
    // an error's cause chain.
    throw new ConfigError(
      `ssh private key ${path} ${describeParseError(result)}`,
    );
  }
  const keys = Array.isArray(result) ? result : [result];
  const [first] = keys;
  if (first === undefined || keys.length > 1) {
    throw new ConfigError(
      `ssh private key ${path} holds ${keys.length} keys: give a file with exactly one`,
    );
  }
  return first;
}

/**
 * ssh2's parse errors by the fixed start of their message, with what we
 * say instead. Whatever ssh2 appends (a magic, cipher, kdf or key type
 * read from the file) is never shown: it is bytes of the key.
 */
const parseErrorReasons: ReadonlyArray<readonly [RegExp, string]> = [
  [/^Unsupported key format/, "not a key format ssh2 knows"],
  [/^Unsupported OpenSSH key magic/, "unsupported OpenSSH key format"],
  [/^Malformed (encrypted )?OpenSSH private key/, "malformed key data"],
  [/^Unsupported cipher for OpenSSH key/, "unsupported cipher"],
  [/^Cipher \(.*\) not supported/, "unsupported cipher"],
  [/^Unsupported kdf name/, "unsupported key derivation function"],
  [/^Unsupported OpenSSH private key type/, "unsupported key type"],
  [/^Unsupported private key EC OID/, "unsupported elliptic curve"],
  [/integrity check failed/, "integrity check failed: damaged file"],
  [/^Malformed PPK/, "malformed PuTTY key"],
  [/^Malformed .*public key/, "malformed public key"],
  [/^Failed to generate information to decrypt key/, "key derivation failed"],
];

/** The largest private key file read (an RSA 16384-bit key is ~13 KiB). */
const maxKeyFileBytes = 64 * 1024;

/**
 * Why ssh2 could not parse a key, in our words: ssh2's messages can quote
 * bytes read from the key file, so they are never shown.
 */
export function describeParseError(error: Error): string {
  const message = error.message;
  if (/no passphrase given/i.test(message)) {
    return "is encrypted and no passphrase is set";
  }
  if (/bad passphrase/i.test(message)) {
    return "cannot be decrypted: wrong passphrase";
  }
  const known = parseErrorReasons.find(([pattern]) => pattern.test(message));
  const code = (error as { code?: unknown }).code;
  const reason =
    known?.[1] ??
    (typeof code === "string" && /^[A-Z0-9_]+$/.test(code)
      ? `ssh2 error ${code}`
      : "unrecognised ssh2 error, not shown as it may quote the key");
  return `is not a supported private key (${reason}): give an OpenSSH, PKCS#1 RSA, SEC1 EC, or PKCS#8 RSA/EC PEM key`;
}

/** ssh2 cannot read PKCS#8; re-encode RSA as PKCS#1 and EC as SEC1. */
function convertPkcs8(
  path: string,
  pem: string,
  passphrase: string | undefined,
): Buffer {
  const encrypted = pem.includes("BEGIN ENCRYPTED PRIVATE KEY");
  if (encrypted && passphrase === undefined) {
    throw new ConfigError(
      `ssh private key ${path} is encrypted and no passphrase is set`,
    );
  }

  let keyObject: KeyObject;
  try {
    keyObject = createPrivateKey(
      encrypted ? { key: pem, format: "pem", passphrase } : pem,
    );
  } catch (error) {
    const reason = encrypted
      ? "cannot be decrypted: wrong passphrase or damaged file"
      : "is a PKCS#8 file node cannot read";
    throw new ConfigError(`ssh private key ${path} ${reason}`, {
      cause: error,
    });
  }

  // The output stays unencrypted, in memory only: ssh2 ignores a
  // passphrase given with an unencrypted key.
  switch (keyObject.asymmetricKeyType) {
    case "rsa":
      return Buffer.from(keyObject.export({ type: "pkcs1", format: "pem" }));
    case "ec":
      return Buffer.from(keyObject.export({ type: "sec1", format: "pem" }));
    case "ed25519":
      throw new ConfigError(
        `ssh private key ${path} is an ed25519 key in PKCS#8 format, which the ssh client cannot read: convert it to OpenSSH format with \`ssh-keygen -p -f ${path} -m RFC4716\` (needs an ssh-keygen that reads PKCS#8 ed25519; OpenSSH 9.2 does not) or create a new key with \`ssh-keygen -t ed25519\``,
      );
    default:
      throw new ConfigError(
        `ssh private key ${path} is a PKCS#8 ${keyObject.asymmetricKeyType ?? "unknown"} key: use an ed25519, ecdsa or rsa key`,
      );
  }
}
