import { silentLogger, type Logger } from "../logging/index.js";
import type { HostKey, HostKeyDecision, HostKeyPolicy } from "./fingerprint.js";

/** Options of the trust-on-first-use policy. */
export interface TofuPolicyOptions {
  /** Receives one info line per accepted key; silent by default. */
  logger?: Logger;
}

/**
 * The trust-on-first-use policy: accepts every key and logs its type and
 * fingerprint at info level with the fields `{ ip, keyType, fingerprint }`.
 * Pinning a key for the rest of a lease is the caller's job (the delivery
 * `pinnedFingerprint` option).
 */
export function createTofuPolicy(
  options: TofuPolicyOptions = {},
): HostKeyPolicy {
  const base = options.logger ?? silentLogger();
  // Callers often pass a child already bound to this component.
  const logger = base.child({
    ...(base.bindings().component === undefined
      ? { component: "hostkeys" }
      : {}),
    mode: "tofu",
  });

  const close = async (): Promise<void> => {};
  // The key last seen per IP: a new one is logged at info (first use, or a
  // VM that rebooted), a repeat only at debug.
  const lastSeen = new Map<string, string>();
  return {
    mode: "tofu",
    check(ip: string, key: HostKey): HostKeyDecision {
      const known = lastSeen.get(ip) === key.fingerprint;
      lastSeen.set(ip, key.fingerprint);
      logger[known ? "debug" : "info"](
        { ip, keyType: key.type, fingerprint: key.fingerprint },
        "accepted host key on first use",
      );
      return { ok: true };
    },
    algorithms: () => undefined,
    readiness: () => ({ ok: true }),
    close,
    [Symbol.asyncDispose]: close,
  };
}
