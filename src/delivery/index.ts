/**
 * Delivery: SSH/SFTP to pod VMs. Writes cloud-init user-data atomically,
 * triggers the reboot that gives a VM back, and watches it reset.
 *
 * Every connection checks the VM's host key in the handshake: first
 * against the lease's pinned fingerprint, then against the host-key policy.
 */
import { createHash, randomBytes } from "node:crypto";
import { Socket } from "node:net";

import ssh2 from "ssh2";
import type { Client } from "ssh2";

import {
  AuthFailedError,
  ConfigError,
  HostKeyRejectedError,
  DeliveryFailedError,
  ExpiredError,
  VmUnreachableError,
  type ByomError,
} from "../errors/index.js";
import { fingerprintOf, type HostKeyPolicy } from "../hostkeys/index.js";
import { errorFields, silentLogger, type Logger } from "../logging/index.js";
import { RemotePath } from "../protocol/index.js";
import {
  backoffDelayMs,
  pause,
  resolveBackoff,
  type BackoffSettings,
} from "./backoff.js";
import { openSession, sftpCalls, type Session } from "./session.js";
import { KeyRefusedError } from "./classify.js";
import { describeParseError } from "./keys.js";

export { loadPrivateKey, type LoadedPrivateKey } from "./keys.js";

/** Options of {@link createDelivery}. */
export interface DeliveryOptions {
  /** SSH user on the VM; default "peerpod". */
  username?: string;
  /** The agent's private key, already loaded (see loadPrivateKey). */
  privateKey: Buffer | string;
  passphrase?: string;
  /** SSH port of the VMs; default 22. */
  port?: number;
  /** Limit per attempt for TCP connect + handshake + login, in ms. */
  connectTimeoutMs: number;
  /** Decides which host keys are acceptable. */
  policy: HostKeyPolicy;
  /** Silent by default. */
  logger?: Logger;
  /** Pauses between attempts: full jitter, capped; defaults 200 / 5000 ms. */
  backoff?: { initialMs?: number; maxMs?: number };
}

/** The host key a VM presented, without the blob. */
export interface HostKeySeen {
  type: string;
  fingerprint: string;
}

/** Result of a delivery: the key seen and what was written. */
export interface DeliveryResult {
  hostKey: HostKeySeen;
  /** Bytes written to cidata/user-data. */
  bytes: number;
  /** sha256 of the bytes written, lower-case hex. */
  sha256: string;
  /** Phases of the attempt that succeeded, in milliseconds. */
  timingsMs: { sshConnect: number; upload: number };
}

/**
 * A VM that still holds user-data when a fresh claim expected an empty
 * cidata/: it never reset. Nothing was written.
 */
export class VmNotCleanError extends DeliveryFailedError {
  constructor(message: string) {
    super(message, { retryable: false });
    this.name = "VmNotCleanError";
  }
}

/** SSH/SFTP access to pod VMs. */
export interface Delivery {
  /**
   * Opens a TCP connection to the VM's SSH port and closes it again.
   * Resolves when it connects. `timeoutMs` defaults to connectTimeoutMs.
   *
   * @throws VmUnreachableError (VM_UNREACHABLE) when refused, unroutable or
   *   timed out.
   */
  probe(ip: string, options?: { timeoutMs?: number }): Promise<void>;

  /**
   * Writes `data` to cidata/user-data so that the file appears whole at
   * once: a uniquely named temp file in cidata/, written, fsynced,
   * renamed with posix-rename@openssh.com onto cidata/user-data, then its
   * size checked. The temp file is removed on failure (best effort).
   *
   * Retries refused, timed-out and dropped connections with backoff until
   * `deadline`; host-key and auth failures are not retried. Never logs the
   * contents, only size and sha256.
   *
   * @throws HostKeyRejectedError (HOST_KEY_REJECTED) when the key differs
   *   from `pinnedFingerprint` or the policy refuses it;
   *   AuthFailedError (AUTH_FAILED); VmUnreachableError (VM_UNREACHABLE)
   *   when no attempt got through by the deadline; DeliveryFailedError
   *   (DELIVERY_FAILED) when an SFTP step fails or `signal` aborts;
   *   ExpiredError (EXPIRED) when the deadline passed before the first try;
   *   VmNotCleanError (DELIVERY_FAILED) when `requireClean` is set and
   *   cidata/ already holds user-data (checked on the same connection)
   *   other than `data` itself when `ownEarlierWrite` is set.
   */
  deliver(
    ip: string,
    data: Buffer,
    options: {
      deadline: Date;
      pinnedFingerprint?: string;
      signal?: AbortSignal;
      /** Refuse a VM whose cidata/ still holds user-data. */
      requireClean?: boolean;
      /**
       * With `requireClean`: user-data equal to `data` is this lease's own
       * earlier write (a request served again), not a VM that never reset.
       */
      ownEarlierWrite?: boolean;
      /**
       * Runs on each attempt's connection just before user-data is
       * written; a throw ends the delivery (not retried) with nothing
       * written. For checking that the lease is still this request's.
       */
      beforeWrite?: () => Promise<void>;
    },
  ): Promise<DeliveryResult>;

  /**
   * Connects once (no retry) and lists cidata/ (names without "." and
   * "..", sorted). `timeoutMs` defaults to connectTimeoutMs and bounds the
   * whole call.
   *
   * @throws the same classified errors as deliver, from a single attempt.
   */
  inspect(
    ip: string,
    options?: { pinnedFingerprint?: string; timeoutMs?: number },
  ): Promise<{ hostKey: HostKeySeen; cidataEntries: string[] }>;

  /**
   * Creates cidata/reboot (content "reboot\n"), which makes the VM reboot.
   * Pass the lease's `pinnedFingerprint` when it is known. Once the file
   * was created, a connection drop counts as success (the VM is already
   * going down). When the connection drops before the VM answered, the
   * retry treats a changed host key as the reboot having happened and
   * resolves with the old key. Retries like deliver until `deadline`.
   *
   * @throws as deliver.
   */
  triggerReboot(
    ip: string,
    options: { deadline: Date; pinnedFingerprint?: string },
  ): Promise<{ hostKey: HostKeySeen }>;

  /**
   * Polls until the VM has reset after a reboot trigger and resolves with
   * its new host key. Reset means: first evidence that the old system went
   * away (the port stopped answering, the host key changed from
   * `previousFingerprint`, or, without `previousFingerprint`, the `reboot`
   * marker was seen and then gone), then a successful login with an empty
   * cidata/. Pass `previousFingerprint` whenever it is known. Unanswered connections
   * and SFTP errors while the VM boots count as "not yet".
   *
   * @throws DeliveryFailedError (DELIVERY_FAILED) when the deadline passes
   *   first; HostKeyRejectedError / AuthFailedError at once when the reset
   *   VM refuses us or we refuse it.
   */
  waitForReset(
    ip: string,
    options: { deadline: Date; previousFingerprint?: string },
  ): Promise<{ hostKey: HostKeySeen }>;

  /** Ends open connections and stops waiting calls; safe to call twice. */
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

const defaultUsername = "peerpod";
const defaultPort = 22;
const fileMode = 0o644;
const rebootContent = Buffer.from("reboot\n");
/** An attempt with less time left than this cannot connect; stop instead. */
const minAttemptMs = 50;

/**
 * Creates the delivery handle. Nothing connects until a method is called.
 *
 * @throws ConfigError when the private key cannot be parsed (use
 *   loadPrivateKey to get a precise message first) or a setting is invalid.
 */
export function createDelivery(options: DeliveryOptions): Delivery {
  return new SshDelivery(options);
}

/** One connection attempt's open session, for the VM at `ip`. */
interface Attempt {
  ip: string;
  session: Session;
  /** How long the SSH connection (TCP, handshake, auth) took. */
  connectMs: number;
}

const userDataName = RemotePath.userData.slice(RemotePath.cidataDir.length + 1);
const tempPrefix = ".user-data.";
const tempSuffix = ".tmp";

function isTempName(name: string): boolean {
  return name.startsWith(tempPrefix) && name.endsWith(tempSuffix);
}

class SshDelivery implements Delivery {
  readonly #username: string;
  readonly #port: number;
  readonly #privateKey: Buffer | string;
  readonly #passphrase: string | undefined;
  readonly #clientKey: { type: string; fingerprint: string };
  readonly #connectTimeoutMs: number;
  readonly #policy: HostKeyPolicy;
  readonly #backoff: BackoffSettings;
  readonly #logger: Logger;
  readonly #clients = new Set<Client>();
  readonly #closing = new AbortController();

  constructor(options: DeliveryOptions) {
    if (!(options.connectTimeoutMs > 0)) {
      throw new ConfigError(
        `delivery connectTimeoutMs must be > 0, got ${options.connectTimeoutMs}`,
      );
    }
    this.#username = options.username ?? defaultUsername;
    this.#port = options.port ?? defaultPort;
    this.#privateKey = options.privateKey;
    this.#passphrase = options.passphrase;
    this.#connectTimeoutMs = options.connectTimeoutMs;
    this.#policy = options.policy;
    this.#logger = componentLogger(options.logger, "delivery");
    try {
      this.#backoff = resolveBackoff(options.backoff);
    } catch (error) {
      throw new ConfigError(`delivery ${(error as Error).message}`);
    }
    this.#clientKey = describeClientKey(options.privateKey, options.passphrase);
  }

  async probe(ip: string, options: { timeoutMs?: number } = {}): Promise<void> {
    this.#assertOpen();
    const timeoutMs = options.timeoutMs ?? this.#connectTimeoutMs;
    const port = this.#port;
    await new Promise<void>((resolve, reject) => {
      const socket = new Socket();
      const finish = (error?: Error): void => {
        socket.destroy();
        this.#closing.signal.removeEventListener("abort", onClose);
        if (error === undefined) {
          resolve();
          return;
        }
        reject(
          new VmUnreachableError(
            `vm ${ip}:${port} unreachable: ${(error as NodeJS.ErrnoException).code ?? error.message}`,
            { cause: error },
          ),
        );
      };
      const onClose = (): void => finish(new Error("delivery closed"));
      this.#closing.signal.addEventListener("abort", onClose, { once: true });
      socket.setTimeout(timeoutMs, () =>
        finish(
          Object.assign(new Error(`no answer within ${timeoutMs} ms`), {
            code: "ETIMEDOUT",
          }),
        ),
      );
      socket.once("connect", () => finish());
      socket.once("error", finish);
      socket.connect({ host: ip, port });
    });
  }

  async deliver(
    ip: string,
    data: Buffer,
    options: {
      deadline: Date;
      pinnedFingerprint?: string;
      signal?: AbortSignal;
      requireClean?: boolean;
      ownEarlierWrite?: boolean;
      beforeWrite?: () => Promise<void>;
    },
  ): Promise<DeliveryResult> {
    this.#assertOpen();
    const log = this.#logger.child({ ip });
    const sha256 = createHash("sha256").update(data).digest("hex");
    const started = Date.now();

    const { value: written, attempts } = await this.#withRetries(
      ip,
      "delivery",
      options,
      async (attempt) => {
        const uploadStarted = performance.now();
        await this.#prepareCidata(
          attempt,
          options.requireClean === true,
          options.ownEarlierWrite === true ? { data, sha256 } : undefined,
        );
        await options.beforeWrite?.();
        const key = await this.#writeUserData(attempt, data);
        return {
          key,
          timingsMs: {
            sshConnect: attempt.connectMs,
            upload: performance.now() - uploadStarted,
          },
        };
      },
    );
    const hostKey = written.key;

    log.info(
      {
        bytes: data.length,
        sha256,
        keyType: hostKey.type,
        fingerprint: hostKey.fingerprint,
        attempts,
        durationMs: Date.now() - started,
      },
      "delivered user-data",
    );
    return {
      hostKey,
      bytes: data.length,
      sha256,
      timingsMs: written.timingsMs,
    };
  }

  /**
   * Lists cidata/ on the delivery connection: removes temp files an
   * interrupted earlier attempt left, and (when `requireClean`) refuses a
   * VM that still holds user-data (it never reset), unless that user-data
   * is `own` (this lease's earlier write: same size and sha256).
   */
  async #prepareCidata(
    { ip, session }: Attempt,
    requireClean: boolean,
    own: { data: Buffer; sha256: string } | undefined,
  ): Promise<void> {
    const entries = await sftpCalls
      .readdir(session.sftp, RemotePath.cidataDir)
      .catch((error: unknown) => {
        throw session.fail(`list ${RemotePath.cidataDir}`, error);
      });
    if (
      requireClean &&
      entries.includes(userDataName) &&
      !(own !== undefined && (await holdsOwn(session, own)))
    ) {
      throw new VmNotCleanError(
        `vm ${ip} still holds ${RemotePath.userData} from an earlier pod: it never reset`,
      );
    }
    for (const leftover of entries.filter(isTempName)) {
      await sftpCalls
        .unlink(session.sftp, `${RemotePath.cidataDir}/${leftover}`)
        .catch((error: unknown) => {
          throw session.fail(`remove leftover ${leftover}`, error);
        });
      this.#logger.info(
        { ip, file: leftover },
        "removed a temp file left by an interrupted delivery",
      );
    }
  }

  async inspect(
    ip: string,
    options: { pinnedFingerprint?: string; timeoutMs?: number } = {},
  ): Promise<{ hostKey: HostKeySeen; cidataEntries: string[] }> {
    this.#assertOpen();
    const timeoutMs = options.timeoutMs ?? this.#connectTimeoutMs;
    const session = await this.#open(ip, {
      connectTimeoutMs: timeoutMs,
      lifetimeMs: timeoutMs,
      pinnedFingerprint: options.pinnedFingerprint,
      signal: this.#closing.signal,
    });
    try {
      const entries = await sftpCalls
        .readdir(session.sftp, RemotePath.cidataDir)
        .catch((error: unknown) => {
          throw session.fail(`list ${RemotePath.cidataDir}`, error);
        });
      return { hostKey: seen(session), cidataEntries: entries.sort() };
    } finally {
      session.end();
    }
  }

  async triggerReboot(
    ip: string,
    options: { deadline: Date; pinnedFingerprint?: string },
  ): Promise<{ hostKey: HostKeySeen }> {
    this.#assertOpen();
    // The key of an attempt whose connection dropped after the marker was
    // requested: the VM may have acted on it and be rebooting already.
    let unanswered: HostKeySeen | undefined;
    const { value: hostKey } = await this.#withRetries(
      ip,
      "reboot trigger",
      {
        deadline: options.deadline,
        // After an unanswered attempt, retries connect without the pin:
        // they only compare keys and write nothing to a VM with another one.
        pinnedFingerprint: () =>
          unanswered === undefined ? options.pinnedFingerprint : undefined,
      },
      async (attempt) => {
        if (unanswered !== undefined) {
          const expected = options.pinnedFingerprint ?? unanswered.fingerprint;
          if (attempt.session.hostKey.fingerprint !== expected) {
            this.#logger.info(
              { ip, fingerprint: attempt.session.hostKey.fingerprint },
              "host key changed after an unanswered reboot trigger: the vm reset",
            );
            return unanswered;
          }
        }
        return this.#writeRebootMarker(attempt, (key) => {
          unanswered = key;
        });
      },
    );
    this.#logger.info(
      { ip, keyType: hostKey.type, fingerprint: hostKey.fingerprint },
      "triggered reboot",
    );
    return { hostKey };
  }

  async waitForReset(
    ip: string,
    options: { deadline: Date; previousFingerprint?: string },
  ): Promise<{ hostKey: HostKeySeen }> {
    this.#assertOpen();
    const log = this.#logger.child({ ip });
    const deadlineMs = options.deadline.getTime();
    let wentAway = false;
    let sawMarker = false;
    let lastState = "no answer yet";

    for (let attempt = 0; ; attempt++) {
      const remainingMs = deadlineMs - Date.now();
      if (remainingMs < minAttemptMs) {
        throw new DeliveryFailedError(
          `vm ${ip} did not reset before the deadline ${options.deadline.toISOString()}: ${lastState}`,
        );
      }

      try {
        const { hostKey, cidataEntries } = await this.inspect(ip, {
          timeoutMs: Math.min(this.#connectTimeoutMs, remainingMs),
        });
        const previous = options.previousFingerprint;
        if (previous !== undefined && hostKey.fingerprint !== previous) {
          wentAway = true;
        }
        // With a known old key, an emptied cidata/ under that key is no
        // proof: a connection accepted just before the old system went
        // down can still show it. Without one, it is the best evidence.
        const hasMarker = cidataEntries.includes("reboot");
        if (previous === undefined && sawMarker && !hasMarker) {
          wentAway = true;
        }
        sawMarker ||= hasMarker;
        if (wentAway && cidataEntries.length === 0) {
          log.info(
            { keyType: hostKey.type, fingerprint: hostKey.fingerprint },
            "vm reset",
          );
          return { hostKey };
        }
        lastState = wentAway
          ? `cidata/ still holds ${cidataEntries.length} entries after the reset`
          : `still up with host key ${hostKey.fingerprint}`;
      } catch (error) {
        // A refused key or login will not fix itself; anything else (no
        // answer, an sftp error while the VM boots) means "not yet".
        if (
          error instanceof HostKeyRejectedError ||
          error instanceof AuthFailedError ||
          this.#closed()
        ) {
          throw error;
        }
        if (error instanceof VmUnreachableError) {
          wentAway = true;
        }
        lastState = error instanceof Error ? error.message : String(error);
      }

      const delayMs = Math.min(
        backoffDelayMs(attempt, this.#backoff),
        Math.max(0, deadlineMs - Date.now() - minAttemptMs),
      );
      await this.#pause(ip, delayMs, undefined);
    }
  }

  async close(): Promise<void> {
    if (this.#closing.signal.aborted) {
      return;
    }
    this.#closing.abort(
      new DeliveryFailedError("delivery closed", { retryable: true }),
    );
    for (const client of this.#clients) {
      try {
        client.destroy();
      } catch (error) {
        this.#logger.warn(
          { err: errorFields(error) },
          "closing ssh client failed",
        );
      }
    }
    this.#clients.clear();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** Temp file, write, fsync, posix-rename, stat; temp removed on failure. */
  async #writeUserData(attempt: Attempt, data: Buffer): Promise<HostKeySeen> {
    const { session } = attempt;
    const { sftp } = session;
    const temp = `${RemotePath.cidataDir}/${tempPrefix}${randomBytes(8).toString("hex")}${tempSuffix}`;
    let handle: Buffer | undefined;
    let step = "open temp file";
    try {
      handle = await sftpCalls.open(sftp, temp, "wx", fileMode);
      step = "write temp file";
      await sftpCalls.write(sftp, handle, data);
      step = "fsync temp file";
      await this.#fsync(attempt, handle);
      step = "close temp file";
      const closing = handle;
      handle = undefined;
      await sftpCalls.close(sftp, closing);
      step = `rename onto ${RemotePath.userData}`;
      if (!sftpCalls.supports(sftp, "posix-rename@openssh.com")) {
        throw new DeliveryFailedError(
          "the vm's sftp server lacks posix-rename@openssh.com, needed to replace user-data atomically",
          { retryable: false },
        );
      }
      await sftpCalls.posixRename(sftp, temp, RemotePath.userData);
      step = `stat ${RemotePath.userData}`;
      const stats = await sftpCalls.stat(sftp, RemotePath.userData);
      if (stats.size !== data.length) {
        throw new DeliveryFailedError(
          `${RemotePath.userData} on vm holds ${stats.size} bytes after the rename, expected ${data.length}`,
        );
      }
      return seen(session);
    } catch (error) {
      await this.#discard(session, handle, temp);
      if (error instanceof DeliveryFailedError && !session.lost()) {
        throw error;
      }
      throw session.fail(step, error);
    }
  }

  async #fsync({ ip, session }: Attempt, handle: Buffer): Promise<void> {
    // cidata/ is a tmpfs on the VM, so fsync adds no durability there; it
    // is skipped, not fatal, on a server without the extension.
    if (!sftpCalls.supports(session.sftp, "fsync@openssh.com")) {
      this.#logger.warn(
        { ip },
        "sftp server lacks fsync@openssh.com; writing without fsync",
      );
      return;
    }
    await sftpCalls.fsync(session.sftp, handle);
  }

  async #discard(
    session: Session,
    handle: Buffer | undefined,
    temp: string,
  ): Promise<void> {
    if (session.lost()) {
      return;
    }
    if (handle !== undefined) {
      await sftpCalls.close(session.sftp, handle).catch(() => undefined);
    }
    await sftpCalls.unlink(session.sftp, temp).catch(() => undefined);
  }

  async #writeRebootMarker(
    attempt: Attempt,
    onUnanswered: (key: HostKeySeen) => void,
  ): Promise<HostKeySeen> {
    const { session } = attempt;
    const { sftp } = session;
    let created = false;
    try {
      const handle = await sftpCalls.open(
        sftp,
        RemotePath.reboot,
        "w",
        fileMode,
      );
      created = true;
      await sftpCalls.write(sftp, handle, rebootContent);
      await sftpCalls.close(sftp, handle);
      return seen(session);
    } catch (error) {
      // The marker's existence is the trigger; the VM may go down before
      // the write or close is answered.
      if (created && session.lost()) {
        return seen(session);
      }
      if (session.lost()) {
        // The open may have reached the VM; only a later look can tell.
        onUnanswered(seen(session));
      }
      throw session.fail(`write ${RemotePath.reboot}`, error);
    }
  }

  /**
   * Runs `act` on a fresh session per attempt until it succeeds, a
   * non-retryable error occurs, or the deadline passes.
   */
  async #withRetries<T>(
    ip: string,
    what: string,
    options: {
      deadline: Date;
      /** A fixed pin, or one chosen per attempt. */
      pinnedFingerprint?: string | (() => string | undefined);
      signal?: AbortSignal;
    },
    act: (attempt: Attempt) => Promise<T>,
  ): Promise<{ value: T; attempts: number }> {
    const deadlineMs = options.deadline.getTime();
    const signal =
      options.signal === undefined
        ? this.#closing.signal
        : AbortSignal.any([this.#closing.signal, options.signal]);
    const log = this.#logger.child({ ip });
    let lastError: ByomError | undefined;

    for (let attempt = 0; ; attempt++) {
      const remainingMs = deadlineMs - Date.now();
      if (remainingMs < minAttemptMs) {
        throw lastError === undefined
          ? new ExpiredError(
              `${what} to vm ${ip} not started: the deadline ${options.deadline.toISOString()} has passed`,
            )
          : new VmUnreachableError(
              `${what} to vm ${ip} gave up at the deadline after ${attempt} attempts: ${lastError.message}`,
              { cause: lastError },
            );
      }

      try {
        const connectStarted = performance.now();
        const session = await this.#open(ip, {
          connectTimeoutMs: Math.min(this.#connectTimeoutMs, remainingMs),
          lifetimeMs: remainingMs,
          pinnedFingerprint:
            typeof options.pinnedFingerprint === "function"
              ? options.pinnedFingerprint()
              : options.pinnedFingerprint,
          signal,
        });
        try {
          const connectMs = performance.now() - connectStarted;
          const value = await act({ ip, session, connectMs });
          return { value, attempts: attempt + 1 };
        } finally {
          session.end();
        }
      } catch (error) {
        if (!(error instanceof VmUnreachableError) || signal.aborted) {
          log.warn(
            { err: errorFields(error), attempt: attempt + 1 },
            `${what} failed`,
          );
          throw signal.aborted ? this.#abortError(ip, what, signal) : error;
        }
        lastError = error;
      }

      const delayMs = Math.min(
        backoffDelayMs(attempt, this.#backoff),
        Math.max(0, deadlineMs - Date.now() - minAttemptMs),
      );
      log.debug(
        { err: errorFields(lastError), attempt: attempt + 1, delayMs },
        `${what} attempt failed; retrying`,
      );
      await this.#pause(ip, delayMs, signal);
    }
  }

  /**
   * Opens a session. With an allowlist of several key types, a VM whose
   * preferred type is not listed is asked again offering the remaining
   * types, so a VM listed by any one of its keys negotiates that one.
   */
  async #open(
    ip: string,
    limits: {
      connectTimeoutMs: number;
      lifetimeMs: number;
      pinnedFingerprint: string | undefined;
      signal: AbortSignal;
    },
  ): Promise<Session> {
    let offered = this.#policy.algorithms();
    for (;;) {
      try {
        return await this.#openOnce(ip, limits, offered);
      } catch (error) {
        const remaining = withoutKeyType(offered, error);
        if (
          this.#policy.mode !== "allowlist" ||
          limits.pinnedFingerprint !== undefined ||
          remaining === undefined ||
          remaining.length === 0
        ) {
          throw error;
        }
        offered = remaining;
      }
    }
  }

  #openOnce(
    ip: string,
    limits: {
      connectTimeoutMs: number;
      lifetimeMs: number;
      pinnedFingerprint: string | undefined;
      signal: AbortSignal;
    },
    offered: string[] | undefined,
  ): Promise<Session> {
    return openSession({
      ...(offered === undefined ? {} : { hostKeyAlgorithms: offered }),
      ip,
      port: this.#port,
      username: this.#username,
      privateKey: this.#privateKey,
      ...(this.#passphrase === undefined
        ? {}
        : { passphrase: this.#passphrase }),
      clientKey: this.#clientKey,
      policy: this.#policy,
      ...(limits.pinnedFingerprint === undefined
        ? {}
        : { pinnedFingerprint: limits.pinnedFingerprint }),
      connectTimeoutMs: limits.connectTimeoutMs,
      lifetimeMs: limits.lifetimeMs,
      signal: limits.signal,
      track: (client) => {
        this.#clients.add(client);
        return () => this.#clients.delete(client);
      },
    });
  }

  async #pause(
    ip: string,
    delayMs: number,
    signal: AbortSignal | undefined,
  ): Promise<void> {
    const effective = signal ?? this.#closing.signal;
    try {
      await pause(delayMs, effective);
    } catch {
      throw this.#abortError(ip, "wait", effective);
    }
  }

  #abortError(ip: string, what: string, signal: AbortSignal): ByomError {
    return new DeliveryFailedError(
      this.#closed()
        ? `${what} to vm ${ip} stopped: delivery closed`
        : `${what} to vm ${ip} aborted`,
      { cause: signal.reason },
    );
  }

  #closed(): boolean {
    return this.#closing.signal.aborted;
  }

  #assertOpen(): void {
    if (this.#closed()) {
      throw new DeliveryFailedError("delivery is closed", { retryable: false });
    }
  }
}

/** Host key algorithms that sign with each key type. */
const algorithmsOfKeyType: Record<string, readonly string[]> = {
  "ssh-rsa": ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"],
};

/**
 * `offered` without the algorithms of the key type `error` refused, or
 * undefined when the error is not such a refusal.
 */
function withoutKeyType(
  offered: string[] | undefined,
  error: unknown,
): string[] | undefined {
  if (
    offered === undefined ||
    !(error instanceof KeyRefusedError) ||
    error.keyType === undefined
  ) {
    return undefined;
  }
  const refused = algorithmsOfKeyType[error.keyType] ?? [error.keyType];
  return offered.filter((algorithm) => !refused.includes(algorithm));
}

/** A child logger for `component`, unless the caller already bound one. */
function componentLogger(
  logger: Logger | undefined,
  component: string,
): Logger {
  const base = logger ?? silentLogger();
  return base.bindings().component === undefined
    ? base.child({ component })
    : base;
}

function seen(session: Session): HostKeySeen {
  return {
    type: session.hostKey.type,
    fingerprint: session.hostKey.fingerprint,
  };
}

function describeClientKey(
  privateKey: Buffer | string,
  passphrase: string | undefined,
): { type: string; fingerprint: string } {
  const parsed = ssh2.utils.parseKey(privateKey, passphrase);
  const key = Array.isArray(parsed) ? parsed[0] : parsed;
  if (key === undefined || key instanceof Error || !key.isPrivateKey()) {
    throw new ConfigError(
      `delivery privateKey ${key instanceof Error ? describeParseError(key) : "holds no private key"}; check it with loadPrivateKey`,
    );
  }
  return { type: key.type, fingerprint: fingerprintOf(key.getPublicSSH()) };
}

/**
 * Whether cidata/user-data is `own`: same size (from a stat), then the
 * same sha256 (read only when the sizes match).
 */
async function holdsOwn(
  session: Session,
  own: { data: Buffer; sha256: string },
): Promise<boolean> {
  const stats = await sftpCalls
    .stat(session.sftp, RemotePath.userData)
    .catch((error: unknown) => {
      throw session.fail(`stat ${RemotePath.userData}`, error);
    });
  if (stats.size !== own.data.length) {
    return false;
  }
  const held = await sftpCalls
    .readFile(session.sftp, RemotePath.userData)
    .catch((error: unknown) => {
      throw session.fail(`read ${RemotePath.userData}`, error);
    });
  return createHash("sha256").update(held).digest("hex") === own.sha256;
}
