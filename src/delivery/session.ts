/**
 * One SSH connection to a pod VM with its SFTP channel: connect with the
 * host-key policy in the handshake, classify what fails, and give promise
 * versions of the few SFTP calls delivery needs.
 */
import ssh2 from "ssh2";
import type {
  Client,
  ConnectConfig,
  OpenMode,
  SFTPWrapper,
  ServerHostKeyAlgorithm,
  Stats,
} from "ssh2";

import { DeliveryFailedError, type ByomError } from "../errors/index.js";
import {
  hostKeyFromBlob,
  type HostKey,
  type HostKeyPolicy,
} from "../hostkeys/index.js";
import {
  classifyConnectError,
  classifySftpError,
  type ConnectFailureContext,
} from "./classify.js";

/** Everything needed to open one session. */
export interface SessionParams {
  /** Host key algorithms to offer instead of the policy's. */
  hostKeyAlgorithms?: string[];
  ip: string;
  port: number;
  username: string;
  privateKey: Buffer | string;
  passphrase?: string;
  clientKey?: { type: string; fingerprint: string };
  policy: HostKeyPolicy;
  pinnedFingerprint?: string;
  /** Limit for TCP connect + handshake + login, in ms. */
  connectTimeoutMs: number;
  /** Hard limit for the whole session, in ms from now; it is destroyed then. */
  lifetimeMs: number;
  signal: AbortSignal;
  /** Called once the client exists, so the owner can end it on close(). */
  track(client: Client): () => void;
}

/** An open session; `end()` is idempotent. */
export interface Session {
  readonly hostKey: HostKey;
  readonly sftp: SFTPWrapper;
  /** True once the connection is gone (closed, dropped or destroyed). */
  lost(): boolean;
  /** Wraps an SFTP failure with the step name, as DeliveryFailed or, when the connection dropped, VmUnreachable. */
  fail(step: string, error: unknown): ByomError;
  end(): void;
}

/**
 * Connects, verifies the host key (pin first, then the policy), logs in,
 * opens SFTP. Rejects with a classified ByomError; the client is always
 * ended on failure.
 */
export function openSession(params: SessionParams): Promise<Session> {
  return new Promise<Session>((resolve, reject) => {
    const client = new ssh2.Client();
    const untrack = params.track(client);
    const offered = params.hostKeyAlgorithms ?? params.policy.algorithms();
    const context: ConnectFailureContext = {
      ip: params.ip,
      port: params.port,
      username: params.username,
      timeoutMs: params.connectTimeoutMs,
      ...(offered === undefined ? {} : { offeredHostKeyAlgorithms: offered }),
      ...(params.clientKey === undefined
        ? {}
        : { clientKey: params.clientKey }),
    };
    let hostKey: HostKey | undefined;
    let settled = false;
    let closed = false;
    let lifetimeExpired = false;

    const lifetimeTimer = setTimeout(() => {
      lifetimeExpired = true;
      client.destroy();
    }, params.lifetimeMs);
    const onAbort = (): void => {
      client.destroy();
      fail(params.signal.reason);
    };

    const cleanup = (): void => {
      clearTimeout(lifetimeTimer);
      params.signal.removeEventListener("abort", onAbort);
      untrack();
    };
    const end = (): void => {
      cleanup();
      client.end();
      // end() waits for the server; destroy frees the socket now.
      setImmediate(() => client.destroy());
    };
    // ssh2 may emit several errors for one failure (a ready timeout emits
    // two): the first decides, the rest are dropped.
    function fail(error: unknown): void {
      if (settled) {
        return;
      }
      settled = true;
      end();
      reject(
        params.signal.aborted
          ? abortError(params.ip, params.signal.reason)
          : classifyConnectError(error, context),
      );
    }

    client.on("error", fail);
    client.on("close", () => {
      closed = true;
      cleanup();
      fail(
        Object.assign(
          new Error("connection closed before the session was ready"),
          {
            level: lifetimeExpired ? "client-timeout" : "protocol",
          },
        ),
      );
    });
    client.on("ready", () => {
      client.sftp((error, sftp) => {
        if (error !== undefined && error !== null) {
          settled = true;
          end();
          reject(
            classifySftpError(error, {
              ip: params.ip,
              step: "subsystem start",
              connectionLost: closed,
            }),
          );
          return;
        }
        if (settled || hostKey === undefined) {
          end();
          return;
        }
        settled = true;
        const seenKey = hostKey;
        resolve({
          hostKey: seenKey,
          sftp,
          lost: () => closed,
          fail: (step, cause) =>
            lifetimeExpired
              ? classifyConnectError(
                  Object.assign(new Error(`${step} did not finish in time`), {
                    level: "client-timeout",
                    cause,
                  }),
                  { ...context, timeoutMs: params.lifetimeMs },
                )
              : classifySftpError(cause, {
                  ip: params.ip,
                  step,
                  connectionLost: closed,
                }),
          end,
        });
      });
    });

    if (params.signal.aborted) {
      fail(params.signal.reason);
      return;
    }
    params.signal.addEventListener("abort", onAbort, { once: true });

    const verify = (blob: Buffer): boolean => {
      let key: HostKey;
      try {
        key = hostKeyFromBlob(blob);
      } catch (error) {
        context.rejection = { reason: (error as Error).message };
        return false;
      }
      hostKey = key;
      const rejected = (reason: string): false => {
        context.rejection = {
          keyType: key.type,
          fingerprint: key.fingerprint,
          reason,
        };
        return false;
      };
      if (
        params.pinnedFingerprint !== undefined &&
        key.fingerprint !== params.pinnedFingerprint
      ) {
        return rejected(
          `the lease pinned ${params.pinnedFingerprint}, the vm presented another key`,
        );
      }
      let decision;
      try {
        decision = params.policy.check(params.ip, key);
      } catch (error) {
        return rejected(
          `policy ${params.policy.mode} failed: ${String(error)}`,
        );
      }
      return decision.ok ? true : rejected(decision.reason);
    };

    const config: ConnectConfig = {
      host: params.ip,
      port: params.port,
      username: params.username,
      privateKey: params.privateKey,
      readyTimeout: params.connectTimeoutMs,
      hostVerifier: verify,
      // One key, one method: no password or keyboard-interactive fallback.
      tryKeyboard: false,
      ...(params.passphrase === undefined
        ? {}
        : { passphrase: params.passphrase }),
      ...(offered === undefined
        ? {}
        : {
            algorithms: {
              serverHostKey: offered as ServerHostKeyAlgorithm[],
            },
          }),
    };
    try {
      client.connect(config);
    } catch (error) {
      // ssh2 throws synchronously on a bad key or config.
      fail(error);
    }
  });
}

function abortError(ip: string, reason: unknown): ByomError {
  return new DeliveryFailedError(`ssh session to vm ${ip} aborted`, {
    cause: reason,
  });
}

/** Promise versions of the SFTP calls delivery uses. */
export const sftpCalls = {
  open(sftp: SFTPWrapper, path: string, flags: OpenMode, mode: number) {
    return new Promise<Buffer>((resolve, reject) => {
      sftp.open(path, flags, { mode }, (error, handle) =>
        error ? reject(error) : resolve(handle),
      );
    });
  },
  write(sftp: SFTPWrapper, handle: Buffer, data: Buffer) {
    // ssh2 splits a large write into packets the server accepts.
    return new Promise<void>((resolve, reject) => {
      sftp.write(handle, data, 0, data.length, 0, (error) =>
        error ? reject(error) : resolve(),
      );
    });
  },
  fsync(sftp: SFTPWrapper, handle: Buffer) {
    return new Promise<void>((resolve, reject) => {
      // Throws synchronously when fsync@openssh.com is not advertised;
      // inside the executor that becomes a rejection.
      sftp.ext_openssh_fsync(handle, (error) =>
        error ? reject(error) : resolve(),
      );
    });
  },
  close(sftp: SFTPWrapper, handle: Buffer) {
    return new Promise<void>((resolve, reject) => {
      sftp.close(handle, (error) => (error ? reject(error) : resolve()));
    });
  },
  posixRename(sftp: SFTPWrapper, from: string, to: string) {
    return new Promise<void>((resolve, reject) => {
      sftp.ext_openssh_rename(from, to, (error) =>
        error ? reject(error) : resolve(),
      );
    });
  },
  stat(sftp: SFTPWrapper, path: string) {
    return new Promise<Stats>((resolve, reject) => {
      sftp.stat(path, (error, stats) =>
        error ? reject(error) : resolve(stats),
      );
    });
  },
  readFile(sftp: SFTPWrapper, path: string) {
    return new Promise<Buffer>((resolve, reject) => {
      sftp.readFile(path, (error: Error | undefined, data: Buffer) =>
        error ? reject(error) : resolve(data),
      );
    });
  },
  unlink(sftp: SFTPWrapper, path: string) {
    return new Promise<void>((resolve, reject) => {
      sftp.unlink(path, (error) => (error ? reject(error) : resolve()));
    });
  },
  readdir(sftp: SFTPWrapper, path: string) {
    return new Promise<string[]>((resolve, reject) => {
      // ssh2 leaves out "." and ".." by default.
      sftp.readdir(path, (error, list) =>
        error ? reject(error) : resolve(list.map((entry) => entry.filename)),
      );
    });
  },
  /** Whether the server advertised an SFTP extension (e.g. "fsync@openssh.com"). */
  supports(sftp: SFTPWrapper, extension: string): boolean {
    // ssh2 keeps the server's extension list on an undocumented field; its
    // extension calls throw when an entry is missing.
    const extensions = (
      sftp as unknown as { _extensions?: Record<string, string> }
    )._extensions;
    return extensions?.[extension] === "1";
  },
};
