import ssh2 from "ssh2";
import type { ServerHostKeyAlgorithm } from "ssh2";

import { hostKeyFromBlob } from "./fingerprint.js";

/** One host key a VM offered to `scanHostKeys`. */
export interface ScannedHostKey {
  /** Key type from the blob ("ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"). */
  type: string;
  /** `SHA256:` fingerprint, as `ssh-keygen -l` prints it. */
  fingerprint: string;
  /** `type base64`, ready for an allowlist file. */
  line: string;
}

/** What a scan of one VM found. */
export interface HostKeyScan {
  ip: string;
  port: number;
  /** Every host key the VM offered, in algorithm order, no duplicates. */
  keys: ScannedHostKey[];
  /** Set when the VM could not be reached at all. */
  error?: string;
}

/** Options of {@link scanHostKeys}. */
export interface ScanOptions {
  /** SSH port; default 22. */
  port?: number;
  /** Per handshake, in ms; default 5000. */
  timeoutMs?: number;
}

/** One handshake per algorithm; rsa-sha2-512 yields the VM's ssh-rsa key. */
const scanAlgorithms = [
  "ssh-ed25519",
  "ecdsa-sha2-nistp256",
  "ecdsa-sha2-nistp384",
  "ecdsa-sha2-nistp521",
  "rsa-sha2-512",
] as const;

/**
 * Collects every host key a VM offers: one SSH handshake per host key
 * algorithm, each limited to that algorithm, ended as soon as the key is
 * seen (no login is attempted). Never throws: a VM that cannot be reached
 * comes back with `error` and no keys.
 */
export async function scanHostKeys(
  ip: string,
  options: ScanOptions = {},
): Promise<HostKeyScan> {
  const port = options.port ?? 22;
  const timeoutMs = options.timeoutMs ?? 5000;
  const keys: ScannedHostKey[] = [];
  for (const algorithm of scanAlgorithms) {
    const outcome = await offeredKey(ip, port, algorithm, timeoutMs);
    if ("unreachable" in outcome) {
      return { ip, port, keys, error: outcome.unreachable };
    }
    if (
      outcome.key !== undefined &&
      !keys.some((key) => key.fingerprint === outcome.key?.fingerprint)
    ) {
      keys.push(outcome.key);
    }
  }
  if (keys.length === 0) {
    return { ip, port, keys, error: "the VM offered no supported host key" };
  }
  return { ip, port, keys };
}

/** The key offered for one algorithm, none, or why the VM is unreachable. */
function offeredKey(
  ip: string,
  port: number,
  algorithm: (typeof scanAlgorithms)[number],
  timeoutMs: number,
): Promise<{ key?: ScannedHostKey } | { unreachable: string }> {
  return new Promise((resolve) => {
    const client = new ssh2.Client();
    let key: ScannedHostKey | undefined;
    let done = false;
    const finish = (
      result: { key?: ScannedHostKey } | { unreachable: string },
    ): void => {
      if (done) {
        return;
      }
      done = true;
      client.destroy();
      resolve(result);
    };

    client.on("error", (error: Error & { level?: string; code?: string }) => {
      if (key !== undefined) {
        finish({ key });
        return;
      }
      // No matching algorithm: the VM has no key of this type.
      if (error.level === "handshake" || /no matching/i.test(error.message)) {
        finish({});
        return;
      }
      finish({ unreachable: error.code ?? error.message });
    });
    client.on("close", () => finish(key === undefined ? {} : { key }));
    try {
      client.connect({
        host: ip,
        port,
        username: "byom-scan",
        readyTimeout: timeoutMs,
        algorithms: {
          serverHostKey: [algorithm as ServerHostKeyAlgorithm],
        },
        hostVerifier: (blob: Buffer) => {
          const hostKey = hostKeyFromBlob(blob);
          key = {
            type: hostKey.type,
            fingerprint: hostKey.fingerprint,
            line: `${hostKey.type} ${blob.toString("base64")}`,
          };
          // Refusing the key ends the handshake before any login.
          return false;
        },
      });
    } catch (error) {
      finish({ unreachable: (error as Error).message });
    }
  });
}
