/**
 * Host keys of pod VMs: their OpenSSH fingerprints and the policy that
 * decides whether a VM presenting a key may receive user-data.
 *
 * Two policies share one interface: `tofu` (accept and log, the default)
 * and `allowlist` (accept only the keys listed in a directory, reloaded
 * while the agent runs).
 */
import type { Logger } from "../logging/index.js";
import { createAllowlistPolicy } from "./allowlist.js";
import type { AllowlistReload, HostKeyPolicy } from "./fingerprint.js";
import { createTofuPolicy } from "./tofu.js";

export {
  fingerprintOf,
  hostKeyFromBlob,
  type AllowlistReload,
  type AllowlistReloadTrigger,
  type HostKey,
  type HostKeyDecision,
  type HostKeyMode,
  type HostKeyPolicy,
} from "./fingerprint.js";
export { createTofuPolicy, type TofuPolicyOptions } from "./tofu.js";
export {
  createAllowlistPolicy,
  type AllowlistPolicy,
  type AllowlistPolicyOptions,
  type AllowlistStatus,
} from "./allowlist.js";
export {
  allowedKeyTypes,
  maxFileBytes,
  maxKeysPerFile,
  parseKeyLine,
  readAllowlistDir,
  type AllowedHostKey,
  type AllowlistReadResult,
  type SkippedLine,
} from "./read.js";

export {
  scanHostKeys,
  type HostKeyScan,
  type ScanOptions,
  type ScannedHostKey,
} from "./scan.js";

/** Options of {@link createHostKeyPolicy}. */
export interface HostKeyPolicyOptions {
  /** `SSH_HOST_KEY_ALLOWLIST_DIR`; empty or undefined means TOFU. */
  allowlistDir?: string;
  /** Allowlist only: period of the full re-read; default 60 000 ms; 0 = off. */
  reloadIntervalMs?: number;
  /** Silent by default. */
  logger?: Logger;
  /** Allowlist only: called after every reload (see createAllowlistPolicy). */
  onReload?: (reload: AllowlistReload) => void;
}

/**
 * The policy the configuration asks for: the allowlist when
 * `allowlistDir` is set (read before this resolves, then hot-reloaded),
 * else trust on first use. Close the result when done.
 */
export async function createHostKeyPolicy(
  options: HostKeyPolicyOptions,
): Promise<HostKeyPolicy> {
  const dir = options.allowlistDir?.trim() ?? "";
  if (dir === "") {
    return createTofuPolicy(
      options.logger === undefined ? {} : { logger: options.logger },
    );
  }
  return createAllowlistPolicy({
    dir,
    ...(options.reloadIntervalMs === undefined
      ? {}
      : { reloadIntervalMs: options.reloadIntervalMs }),
    ...(options.logger === undefined ? {} : { logger: options.logger }),
    ...(options.onReload === undefined ? {} : { onReload: options.onReload }),
  });
}
