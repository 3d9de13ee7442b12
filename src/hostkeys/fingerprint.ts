import { createHash } from "node:crypto";

import { HostKeyRejectedError } from "../errors/index.js";

/** A host key as presented by a VM during the SSH handshake. */
export interface HostKey {
  /** Key type from the blob, e.g. "ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa". */
  type: string;
  /** OpenSSH fingerprint, exactly as `ssh-keygen -l` prints it: `SHA256:...`. */
  fingerprint: string;
  /** The raw public key blob (SSH wire format). */
  blob: Buffer;
}

/** A policy's verdict on a host key; `reason` says why a key is refused. */
export type HostKeyDecision = { ok: true } | { ok: false; reason: string };

/** The modes a host-key policy can run in. */
export type HostKeyMode = "tofu" | "allowlist";

/**
 * Decides which host keys are acceptable. Implementations must answer
 * `check` synchronously (it runs inside the SSH handshake).
 */
export interface HostKeyPolicy {
  readonly mode: HostKeyMode;
  /** Accepts or refuses the key a VM at `ip` presented. */
  check(ip: string, key: HostKey): HostKeyDecision;
  /**
   * Server host key algorithms to offer in the handshake, most preferred
   * first; undefined leaves ssh2's defaults.
   */
  algorithms(): string[] | undefined;
  /** Whether the policy can accept any VM at all (for `/readyz`). */
  readiness(): { ok: boolean; reason?: string };
  /**
   * Subscribes to reloads of the key set (allowlist mode only; undefined
   * for TOFU). Returns the unsubscribe function. A listener that throws
   * is logged and ignored.
   */
  onReload?(listener: (reload: AllowlistReload) => void): () => void;
  /** Releases watchers and timers; safe to call twice. */
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/**
 * The OpenSSH SHA256 fingerprint of a public key blob: `SHA256:` followed by
 * the unpadded base64 of the blob's sha256, the text `ssh-keygen -l` prints.
 */
export function fingerprintOf(blob: Buffer): string {
  const digest = createHash("sha256").update(blob).digest("base64");
  return `SHA256:${digest.replace(/=+$/, "")}`;
}

/**
 * Builds a HostKey from a raw SSH public key blob, reading the type from
 * the blob's first SSH string.
 *
 * @throws HostKeyRejectedError (HOST_KEY_REJECTED) when the blob is too
 *   short to hold a key type.
 */
export function hostKeyFromBlob(blob: Buffer): HostKey {
  const type = readKeyType(blob);
  return { type, fingerprint: fingerprintOf(blob), blob: Buffer.from(blob) };
}

function readKeyType(blob: Buffer): string {
  const lengthBytes = 4;
  // Key type names are short ASCII tokens; 64 bytes is generous.
  const maxTypeLength = 64;
  if (blob.length < lengthBytes) {
    throw new HostKeyRejectedError(
      `malformed host key: blob of ${blob.length} bytes has no key type`,
    );
  }
  const length = blob.readUInt32BE(0);
  if (
    length === 0 ||
    length > maxTypeLength ||
    blob.length < lengthBytes + length
  ) {
    throw new HostKeyRejectedError(
      `malformed host key: key type length ${length} does not fit a blob of ${blob.length} bytes`,
    );
  }
  const type = blob.subarray(lengthBytes, lengthBytes + length).toString();
  if (!/^[\x21-\x7e]+$/.test(type)) {
    throw new HostKeyRejectedError(
      "malformed host key: key type is not printable ASCII",
    );
  }
  return type;
}

/** What started a reload. */
export type AllowlistReloadTrigger = "start" | "watch" | "period" | "retry";

/**
 * One reload of the allowlist, as given to `onReload` and kept by
 * `status()`. Fingerprints are `SHA256:` text.
 */
export interface AllowlistReload {
  /**
   * True when the directory was read completely and its keys are now in
   * effect; false when a read failed midway and the last good set stayed.
   */
  ok: boolean;
  /** Keys in effect after this reload. */
  keys: number;
  /** Fingerprints trusted now that were not before. */
  added: string[];
  /** Fingerprints trusted before that are not any more. */
  removed: string[];
  /** Lines and files skipped by this read. */
  skipped: number;
  /** Directory-level problems of this read (see AllowlistReadResult). */
  problems: string[];
  trigger: AllowlistReloadTrigger;
  /** When the reload finished. */
  at: Date;
  /** Time from the start of the read to the swap, in ms. */
  durationMs: number;
}
