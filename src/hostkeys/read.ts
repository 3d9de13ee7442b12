import { open, readdir, stat } from "node:fs/promises";
import path from "node:path";

import ssh2 from "ssh2";

import { fingerprintOf } from "./fingerprint.js";

/** One trusted key of an allowlist directory. */
export interface AllowedHostKey {
  /** Key type as in the line, e.g. "ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa". */
  type: string;
  /** `SHA256:` fingerprint, as `ssh-keygen -l` prints it. */
  fingerprint: string;
  /** The key's SSH wire blob. */
  blob: Buffer;
  /** File name inside the directory, e.g. "vms.pub". */
  file: string;
  /** 1-based line number in that file. */
  line: number;
  /** The line's comment, when it has one. */
  comment?: string;
}

/** A line (or a whole file, with line 0) that is not trusted, and why. */
export interface SkippedLine {
  file: string;
  /** 1-based; 0 when the entry concerns the whole file. */
  line: number;
  reason: string;
}

/** What an allowlist directory holds, as {@link readAllowlistDir} found it. */
export interface AllowlistReadResult {
  dir: string;
  /** Trusted keys, in file name order then line order; no duplicates. */
  keys: AllowedHostKey[];
  /** Lines and files not trusted, with the reason and how to fix it. */
  skipped: SkippedLine[];
  /**
   * Problems with the directory as a whole: missing, not a directory,
   * no keys at all, a file that could not be read. Any of them means the
   * agent trusts nothing from this read (or keeps its last good set).
   */
  problems: string[];
  /** Mount issues that do not stop trust but stop updates (sub-path mounts). */
  warnings: string[];
  /**
   * False when a listed file could not be read (gone or unreadable midway,
   * as during a Secret swap): the key set is incomplete and must not
   * replace a good one.
   */
  complete: boolean;
}

/** Largest part of a file that is read, in bytes. */
export const maxFileBytes = 16 * 1024;
/** Keys trusted per file; later key lines are skipped. */
export const maxKeysPerFile = 100;

/** Host key types an allowlist line may carry. */
export const allowedKeyTypes = [
  "ssh-ed25519",
  "ecdsa-sha2-nistp256",
  "ecdsa-sha2-nistp384",
  "ecdsa-sha2-nistp521",
  "ssh-rsa",
] as const;

const keyTypePattern =
  /^(ssh-|ecdsa-|sk-|rsa-|x509v3-)[a-z0-9@.-]+$|-cert-v01@openssh\.com$/;

/**
 * Reads every `*.pub` file of an allowlist directory (names starting with
 * "." are the Secret volume's internals and are not read; symlinks are
 * followed). Never throws: every failure is in the result.
 *
 * Each file: at most {@link maxFileBytes} bytes and {@link maxKeysPerFile}
 * keys; CRLF or LF line ends; blank and `#` lines ignored; one
 * `type base64 [comment]` key per line. Lines in known_hosts form (a host
 * field or a `@cert-authority`/`@revoked` marker before the key type,
 * hashed `|1|` hosts included), unknown types, malformed keys and
 * duplicate fingerprints are skipped with a reason.
 */
export async function readAllowlistDir(
  dir: string,
): Promise<AllowlistReadResult> {
  const result: AllowlistReadResult = {
    dir,
    keys: [],
    skipped: [],
    problems: [],
    warnings: [],
    complete: true,
  };

  let names: string[];
  try {
    names = await readdir(dir);
  } catch (error) {
    result.problems.push(describeDirError(dir, error));
    return result;
  }

  let dirDevice: number;
  try {
    dirDevice = (await stat(dir)).dev;
  } catch (error) {
    result.problems.push(describeDirError(dir, error));
    result.complete = false;
    return result;
  }
  const seen = new Map<string, AllowedHostKey>();
  for (const name of names.filter(isKeyFile).sort()) {
    await readOneFile(dir, name, dirDevice, result, seen);
  }

  if (result.keys.length === 0 && result.problems.length === 0) {
    result.problems.push(
      names.some(isKeyFile)
        ? `allowlist ${dir} holds no usable key: every line was skipped`
        : `allowlist ${dir} has no *.pub file`,
    );
  }
  return result;
}

function isKeyFile(name: string): boolean {
  return name.endsWith(".pub") && !name.startsWith(".");
}

function describeDirError(dir: string, error: unknown): string {
  const code = (error as NodeJS.ErrnoException).code;
  if (code === "ENOENT") {
    return `allowlist directory ${dir} does not exist: every VM is refused until it does (check SSH_HOST_KEY_ALLOWLIST_DIR and the Secret volume)`;
  }
  if (code === "ENOTDIR") {
    return `allowlist ${dir} is a file, not a directory: mount the Secret as a directory (a volumeMount without subPath) and set SSH_HOST_KEY_ALLOWLIST_DIR to it`;
  }
  return `allowlist directory ${dir} cannot be read: ${code ?? String(error)}`;
}

async function readOneFile(
  dir: string,
  name: string,
  dirDevice: number,
  result: AllowlistReadResult,
  seen: Map<string, AllowedHostKey>,
): Promise<void> {
  const full = path.join(dir, name);
  let text: string;
  let size: number;
  try {
    const stats = await stat(full);
    if (!stats.isFile()) {
      result.skipped.push({
        file: name,
        line: 0,
        reason: "not a regular file; skipped",
      });
      return;
    }
    if (stats.dev !== dirDevice) {
      result.warnings.push(
        `${name} is a mount point of its own (a Secret key mounted with subPath?): it never updates; mount the Secret as a directory instead`,
      );
    }
    ({ text, size } = await readHead(full));
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? String(error);
    result.problems.push(`allowlist file ${name} cannot be read: ${code}`);
    result.complete = false;
    return;
  }

  const usable =
    size > maxFileBytes ? text.slice(0, text.lastIndexOf("\n") + 1) : text;
  const lines = usable.split("\n");
  let keysInFile = 0;
  for (const [index, raw] of lines.entries()) {
    const line = raw.replace(/\r$/, "").trim();
    if (line === "" || line.startsWith("#")) {
      continue;
    }
    const number = index + 1;
    if (keysInFile >= maxKeysPerFile) {
      result.skipped.push({
        file: name,
        line: number,
        reason: `more than ${maxKeysPerFile} keys in the file; this and later lines are skipped (split the keys over several files)`,
      });
      break;
    }
    const parsed = parseKeyLine(line);
    if ("reason" in parsed) {
      result.skipped.push({ file: name, line: number, reason: parsed.reason });
      continue;
    }
    const earlier = seen.get(parsed.fingerprint);
    if (earlier !== undefined) {
      result.skipped.push({
        file: name,
        line: number,
        reason: `duplicate of ${earlier.file}:${earlier.line} (${parsed.fingerprint}); skipped`,
      });
      continue;
    }
    const key: AllowedHostKey = { ...parsed, file: name, line: number };
    seen.set(key.fingerprint, key);
    result.keys.push(key);
    keysInFile += 1;
  }

  if (size > maxFileBytes) {
    const firstSkipped = lines.length;
    result.skipped.push({
      file: name,
      line: firstSkipped,
      reason: `file is ${size} bytes; only the first ${maxFileBytes} bytes are read, lines from ${firstSkipped} on are skipped (split the keys over several files)`,
    });
  }
}

/** Reads at most maxFileBytes + 1 bytes; reports the full size. */
async function readHead(file: string): Promise<{ text: string; size: number }> {
  const handle = await open(file, "r");
  try {
    const { size } = await handle.stat();
    const buffer = Buffer.alloc(Math.min(size, maxFileBytes));
    const { bytesRead } = await handle.read(buffer, 0, buffer.length, 0);
    return { text: buffer.subarray(0, bytesRead).toString("utf8"), size };
  } finally {
    await handle.close();
  }
}

type ParsedLine = Omit<AllowedHostKey, "file" | "line"> | { reason: string };

/** Parses one `type base64 [comment]` line; known_hosts lines are refused. */
export function parseKeyLine(line: string): ParsedLine {
  const fields = line.split(/\s+/);
  const [first = "", second = "", third = ""] = fields;

  if (first === "@cert-authority" || first === "@revoked") {
    return {
      reason: `known_hosts marker ${first} is not supported: list each VM's host key as "type base64" (from its /etc/ssh/ssh_host_*_key.pub)`,
    };
  }
  if (first.startsWith("|1|")) {
    return {
      reason: `known_hosts line with a hashed host field: hashed entries cannot be used; take the key from the VM (byom allowlist scan, or its /etc/ssh/ssh_host_*_key.pub) and list it as "${second || "type"} base64"`,
    };
  }
  if (!keyTypePattern.test(first) && keyTypePattern.test(second)) {
    return {
      reason: `known_hosts form: the field "${first}" comes before the key type; remove it so that the line starts with "${second}" (${second} ${third.slice(0, 12)}...)`,
    };
  }
  if (!(allowedKeyTypes as readonly string[]).includes(first)) {
    return {
      reason: keyTypePattern.test(first)
        ? `key type ${first} is not supported for host keys (use one of ${allowedKeyTypes.join(", ")})`
        : `not a public key line: expected "type base64 [comment]" with a type of ${allowedKeyTypes.join(", ")}`,
    };
  }

  const parsed = ssh2.utils.parseKey(`${first} ${second}`);
  const key = Array.isArray(parsed) ? parsed[0] : parsed;
  if (key === undefined || key instanceof Error) {
    return {
      reason: `malformed ${first} key: ${key instanceof Error ? key.message : "no key"}`,
    };
  }
  if (key.type !== first) {
    return {
      reason: `the line says ${first} but the key inside is ${key.type}`,
    };
  }
  const blob = key.getPublicSSH();
  const comment = fields.slice(2).join(" ");
  return {
    type: first,
    fingerprint: fingerprintOf(blob),
    blob,
    ...(comment === "" ? {} : { comment }),
  };
}
