import { stat } from "node:fs/promises";

import { watch, type FSWatcher } from "chokidar";

import { errorFields, silentLogger, type Logger } from "../logging/index.js";
import type {
  AllowlistReload,
  AllowlistReloadTrigger,
  HostKey,
  HostKeyDecision,
  HostKeyPolicy,
} from "./fingerprint.js";
import {
  readAllowlistDir,
  type AllowedHostKey,
  type AllowlistReadResult,
} from "./read.js";

/** Options of {@link createAllowlistPolicy}. */
export interface AllowlistPolicyOptions {
  /** The directory of `*.pub` files (a Secret volume, or a plain folder). */
  dir: string;
  /** Period of the full re-read that covers missed events; default 60 000 ms; 0 = off. */
  reloadIntervalMs?: number;
  /** First pause before re-reading after a read failed midway; default 100 ms, doubling up to 5 000 ms. */
  retryDelayMs?: number;
  /** Silent by default. */
  logger?: Logger;
  /**
   * Called after every reload, the first one included. A listener that
   * throws is logged and ignored.
   */
  onReload?: (reload: AllowlistReload) => void;
}

/** The allowlist policy's state, for status pages and metrics. */
export interface AllowlistStatus {
  dir: string;
  /** Keys in effect. */
  keys: number;
  /** When the key set was last replaced by a complete read. */
  lastReloadAt?: Date;
  /** The most recent reload, successful or not. */
  lastReload?: AllowlistReload;
  /** Reloads so far, failed ones included. */
  reloads: number;
}

/** The allowlist host-key policy; see {@link createAllowlistPolicy}. */
export interface AllowlistPolicy extends HostKeyPolicy {
  readonly mode: "allowlist";
  status(): AllowlistStatus;
  /** The trusted keys now in effect (copies). */
  keys(): AllowedHostKey[];
  /** Re-reads the directory now; resolves with that reload. */
  reload(): Promise<AllowlistReload>;
  onReload(listener: (reload: AllowlistReload) => void): () => void;
}

const defaultReloadIntervalMs = 60_000;
const defaultRetryDelayMs = 100;
const maxRetryDelayMs = 5_000;

/** ssh2 `serverHostKey` names per key type, most preferred first. */
const algorithmsByType: Record<string, readonly string[]> = {
  "ssh-ed25519": ["ssh-ed25519"],
  "ecdsa-sha2-nistp256": ["ecdsa-sha2-nistp256"],
  "ecdsa-sha2-nistp384": ["ecdsa-sha2-nistp384"],
  "ecdsa-sha2-nistp521": ["ecdsa-sha2-nistp521"],
  "ssh-rsa": ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"],
};
const typePreference = Object.keys(algorithmsByType);

/** An immutable key set; replaced whole on each good reload. */
interface KeySet {
  byFingerprint: ReadonlyMap<string, AllowedHostKey>;
  algorithms: string[] | undefined;
  /** Why nothing is accepted, when the set is empty. */
  emptyReason: string | undefined;
}

/**
 * Creates the allowlist policy: trusts only the keys of the `*.pub` files
 * in `dir` (see readAllowlistDir for the format), reads them before it
 * resolves, then keeps them current without a restart: it watches the
 * directory with chokidar (Kubernetes Secret volume swaps included) and
 * re-reads all of it on any event, every `reloadIntervalMs`, and after a
 * read that failed midway. A good read replaces the key set at once; a
 * failed one keeps the last good set.
 *
 * Fails closed: a missing directory or an empty key set refuses every VM
 * and `readiness()` says why. `algorithms()` offers only the host key
 * algorithms of the key types in the set. Warns at start when the
 * directory cannot receive updates (a single file mounted by sub-path).
 * Close it to stop the watcher and timers.
 */
export async function createAllowlistPolicy(
  options: AllowlistPolicyOptions,
): Promise<AllowlistPolicy> {
  const policy = new Allowlist(options);
  try {
    await policy.start();
  } catch (error) {
    await policy.close();
    throw error;
  }
  return policy;
}

class Allowlist implements AllowlistPolicy {
  readonly mode = "allowlist" as const;
  readonly #dir: string;
  readonly #intervalMs: number;
  readonly #retryDelayMs: number;
  readonly #logger: Logger;
  readonly #listeners = new Set<(reload: AllowlistReload) => void>();
  #set: KeySet;
  #keys: AllowedHostKey[] = [];
  #lastReloadAt: Date | undefined;
  #lastReload: AllowlistReload | undefined;
  #reloads = 0;
  #watcher: FSWatcher | undefined;
  #periodTimer: NodeJS.Timeout | undefined;
  #retryTimer: NodeJS.Timeout | undefined;
  #retryAttempt = 0;
  #running: Promise<AllowlistReload> | undefined;
  #pending: AllowlistReloadTrigger | undefined;
  #closed = false;

  constructor(options: AllowlistPolicyOptions) {
    this.#dir = options.dir;
    this.#intervalMs = options.reloadIntervalMs ?? defaultReloadIntervalMs;
    this.#retryDelayMs = options.retryDelayMs ?? defaultRetryDelayMs;
    const base = options.logger ?? silentLogger();
    this.#logger = base.child({
      ...(base.bindings().component === undefined
        ? { component: "hostkeys" }
        : {}),
      mode: "allowlist",
      dir: options.dir,
    });
    if (options.onReload !== undefined) {
      this.#listeners.add(options.onReload);
    }
    this.#set = {
      byFingerprint: new Map(),
      algorithms: undefined,
      emptyReason: `allowlist ${options.dir} not read yet`,
    };
  }

  async start(): Promise<void> {
    await this.#warnIfFile();
    const first = await this.#reload("start");
    if (this.#lastReload?.ok !== true) {
      this.#logger.error(
        { problems: first.problems },
        "allowlist unusable at start: every VM is refused until it is fixed",
      );
    }
    await this.#watch();
    if (this.#intervalMs > 0) {
      this.#periodTimer = setInterval(
        () => this.#request("period"),
        this.#intervalMs,
      );
      this.#periodTimer.unref();
    }
  }

  check(ip: string, key: HostKey): HostKeyDecision {
    const set = this.#set;
    const listed = set.byFingerprint.get(key.fingerprint);
    if (listed !== undefined && listed.type === key.type) {
      this.#logger.debug(
        {
          ip,
          keyType: key.type,
          fingerprint: key.fingerprint,
          source: `${listed.file}:${listed.line}`,
        },
        "accepted listed host key",
      );
      return { ok: true };
    }
    const reason =
      set.emptyReason ??
      `${key.type} key ${key.fingerprint} is not in the allowlist ${this.#dir} (${set.byFingerprint.size} keys)`;
    this.#logger.warn(
      { ip, keyType: key.type, fingerprint: key.fingerprint, reason },
      "refused host key",
    );
    return { ok: false, reason };
  }

  algorithms(): string[] | undefined {
    return this.#set.algorithms?.slice();
  }

  readiness(): { ok: boolean; reason?: string } {
    const reason = this.#set.emptyReason;
    return reason === undefined ? { ok: true } : { ok: false, reason };
  }

  status(): AllowlistStatus {
    return {
      dir: this.#dir,
      keys: this.#set.byFingerprint.size,
      ...(this.#lastReloadAt ? { lastReloadAt: this.#lastReloadAt } : {}),
      ...(this.#lastReload ? { lastReload: this.#lastReload } : {}),
      reloads: this.#reloads,
    };
  }

  onReload(listener: (reload: AllowlistReload) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  keys(): AllowedHostKey[] {
    return this.#keys.map((key) => ({ ...key, blob: Buffer.from(key.blob) }));
  }

  reload(): Promise<AllowlistReload> {
    if (this.#closed) {
      return Promise.reject(new Error("allowlist policy is closed"));
    }
    return this.#reload("watch");
  }

  async close(): Promise<void> {
    if (this.#closed) {
      return;
    }
    this.#closed = true;
    clearTimeout(this.#retryTimer);
    clearInterval(this.#periodTimer);
    const watcher = this.#watcher;
    this.#watcher = undefined;
    try {
      await watcher?.close();
    } catch (error) {
      this.#logger.warn(
        { err: errorFields(error) },
        "closing the allowlist watcher failed",
      );
    }
    await this.#running?.catch(() => undefined);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  async #warnIfFile(): Promise<void> {
    const stats = await stat(this.#dir).catch(() => undefined);
    if (stats?.isFile() === true) {
      this.#logger.error(
        {},
        "SSH_HOST_KEY_ALLOWLIST_DIR is a single file (a Secret key mounted with subPath?): it is not read and never updates; mount the Secret as a directory",
      );
    }
  }

  async #watch(): Promise<void> {
    // atomic: false, so that a swap is seen at once and not 100 ms later;
    // depth 1 also sees a timestamped dir's content behind `..data`.
    const watcher = watch(this.#dir, {
      ignoreInitial: true,
      followSymlinks: true,
      atomic: false,
      depth: 1,
    });
    this.#watcher = watcher;
    watcher.on("all", () => this.#request("watch"));
    watcher.on("error", (error) => {
      this.#logger.warn(
        { err: errorFields(error) },
        "allowlist watcher error; the periodic re-read still runs",
      );
    });
    await new Promise<void>((resolve) => watcher.once("ready", resolve));
  }

  /** Asks for a reload; events during a running one coalesce into one more. */
  #request(trigger: AllowlistReloadTrigger): void {
    if (this.#closed) {
      return;
    }
    if (this.#running !== undefined) {
      this.#pending ??= trigger;
      return;
    }
    void this.#reload(trigger);
  }

  #reload(trigger: AllowlistReloadTrigger): Promise<AllowlistReload> {
    if (this.#running !== undefined) {
      this.#pending ??= trigger;
      // The caller waits for the queued reload, which sees its change.
      return this.#running.then(() => this.#running ?? this.#reload(trigger));
    }
    const running = this.#readAndSwap(trigger).finally(() => {
      this.#running = undefined;
      const next = this.#pending;
      this.#pending = undefined;
      if (next !== undefined && !this.#closed) {
        void this.#reload(next);
      }
    });
    this.#running = running;
    return running;
  }

  async #readAndSwap(
    trigger: AllowlistReloadTrigger,
  ): Promise<AllowlistReload> {
    const started = Date.now();
    const read = await readAllowlistDir(this.#dir);
    const before = new Set(this.#set.byFingerprint.keys());

    // An incomplete read must not replace a good set; on the first read
    // there is no good set, and an incomplete one stays refused below.
    const ok = read.complete;
    if (ok) {
      this.#swap(read);
      this.#lastReloadAt = new Date();
      this.#retryAttempt = 0;
      clearTimeout(this.#retryTimer);
      this.#retryTimer = undefined;
    } else {
      if (this.#lastReloadAt === undefined) {
        this.#set = { ...this.#set, emptyReason: read.problems[0] };
      }
      this.#scheduleRetry();
    }

    const after = this.#set.byFingerprint;
    const reload: AllowlistReload = {
      ok,
      keys: after.size,
      added: [...after.keys()].filter((print) => !before.has(print)),
      removed: [...before].filter((print) => !after.has(print)),
      skipped: read.skipped.length,
      problems: read.problems,
      trigger,
      at: new Date(),
      durationMs: Date.now() - started,
    };
    this.#reloads += 1;
    this.#lastReload = reload;
    this.#report(reload, read);
    return reload;
  }

  #swap(read: AllowlistReadResult): void {
    const byFingerprint = new Map(
      read.keys.map((key) => [key.fingerprint, key] as const),
    );
    const types = new Set(read.keys.map((key) => key.type));
    const algorithms = typePreference
      .filter((type) => types.has(type))
      .flatMap((type) => algorithmsByType[type] ?? []);
    this.#keys = read.keys;
    this.#set = {
      byFingerprint,
      algorithms: algorithms.length === 0 ? undefined : algorithms,
      emptyReason:
        byFingerprint.size === 0
          ? (read.problems[0] ?? `allowlist ${this.#dir} holds no keys`)
          : undefined,
    };
  }

  #scheduleRetry(): void {
    if (this.#closed || this.#retryTimer !== undefined) {
      return;
    }
    const delayMs = Math.min(
      this.#retryDelayMs * 2 ** this.#retryAttempt,
      maxRetryDelayMs,
    );
    this.#retryAttempt += 1;
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = undefined;
      this.#request("retry");
    }, delayMs);
    this.#retryTimer.unref();
  }

  #report(reload: AllowlistReload, read: AllowlistReadResult): void {
    const fields = {
      trigger: reload.trigger,
      keys: reload.keys,
      added: reload.added,
      removed: reload.removed,
      skipped: reload.skipped,
      durationMs: reload.durationMs,
    };
    const changed = reload.added.length > 0 || reload.removed.length > 0;
    if (!reload.ok) {
      this.#logger.warn(
        { ...fields, problems: read.problems },
        "allowlist read failed midway; keeping the last good key set and retrying",
      );
    } else if (reload.keys === 0) {
      this.#logger.error(
        { ...fields, problems: read.problems },
        "allowlist holds no keys: every VM is refused",
      );
    } else if (changed || reload.trigger === "start") {
      this.#logger.info(fields, "allowlist reloaded");
    } else {
      this.#logger.debug(fields, "allowlist re-read; unchanged");
    }
    if (changed || reload.trigger === "start") {
      for (const line of read.skipped) {
        this.#logger.warn(line, "allowlist line skipped");
      }
      for (const warning of read.warnings) {
        this.#logger.warn({ warning }, "allowlist mount");
      }
    }

    for (const listener of this.#listeners) {
      try {
        listener(reload);
      } catch (error) {
        this.#logger.warn(
          { err: errorFields(error) },
          "allowlist onReload listener threw",
        );
      }
    }
  }
}
