/**
 * Maps ssh2 failures to the byom error hierarchy. ssh2 tells its failures
 * apart by an `err.level` string and socket errors by `err.code`; only the
 * handshake's host-key case needs context we record ourselves.
 */
import {
  AuthFailedError,
  DeliveryFailedError,
  HostKeyRejectedError,
  VmUnreachableError,
  type ByomError,
} from "../errors/index.js";

/** Socket error codes that mean "not there (yet)": worth another try. */
const unreachableSocketCodes: ReadonlySet<string> = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "EHOSTUNREACH",
  "EHOSTDOWN",
  "ENETUNREACH",
  "ETIMEDOUT",
  "EPIPE",
  "EADDRNOTAVAIL",
]);

/** What the connecting side knows when a connection attempt fails. */
export interface ConnectFailureContext {
  ip: string;
  port: number;
  username: string;
  /** Per-attempt limit that was in force, in ms. */
  timeoutMs: number;
  /** Set when our host verifier refused the key. */
  rejection?: { keyType?: string; fingerprint?: string; reason: string };
  /** Server host key algorithms we restricted the offer to, if any. */
  offeredHostKeyAlgorithms?: string[];
  /** The client key, for auth failure messages (never the key itself). */
  clientKey?: { type: string; fingerprint: string };
}

interface Ssh2ErrorShape {
  message: string;
  level?: unknown;
  code?: unknown;
}

function shape(error: unknown): Ssh2ErrorShape {
  if (error instanceof Error) {
    const { level, code } = error as Error & {
      level?: unknown;
      code?: unknown;
    };
    return { message: error.message, level, code };
  }
  return { message: String(error) };
}

/**
 * Classifies an error raised before the SSH session became ready:
 * host-key refusal, auth failure, unreachable (refused, timeout, dropped:
 * retryable) or a non-retryable handshake failure. The ssh2 error becomes
 * the `cause`.
 */
/** A host key the VM presented and the policy or the pin refused. */
export class KeyRefusedError extends HostKeyRejectedError {
  constructor(
    message: string,
    /** Type of the refused key (`ssh-ed25519`, ...), when it could be read. */
    readonly keyType: string | undefined,
    options: { cause?: unknown },
  ) {
    super(message, options);
    this.name = "KeyRefusedError";
  }
}

export function classifyConnectError(
  error: unknown,
  context: ConnectFailureContext,
): ByomError {
  const { ip, port } = context;
  const { message, level, code } = shape(error);
  const options = { cause: error };

  if (context.rejection !== undefined) {
    const { keyType, fingerprint, reason } = context.rejection;
    const key =
      keyType === undefined ? "" : ` ${keyType} ${fingerprint ?? ""}`.trimEnd();
    return new KeyRefusedError(
      `host key of vm ${ip} refused:${key}: ${reason}`,
      keyType,
      options,
    );
  }

  if (level === "client-authentication") {
    const clientKey =
      context.clientKey === undefined
        ? "the agent's key"
        : `the agent's key ${context.clientKey.type} ${context.clientKey.fingerprint}`;
    return new AuthFailedError(
      `vm ${ip} refused ssh login as ${context.username} with ${clientKey}: ${message}`,
      options,
    );
  }

  if (level === "client-timeout") {
    return new VmUnreachableError(
      `vm ${ip}:${port} did not complete ssh connect, handshake and login within ${context.timeoutMs} ms`,
      options,
    );
  }

  if (level === "client-socket") {
    const reason =
      typeof code === "string" && unreachableSocketCodes.has(code)
        ? code
        : message;
    return new VmUnreachableError(
      `vm ${ip}:${port} unreachable: ${reason}`,
      options,
    );
  }

  if (level === "handshake") {
    return classifyHandshakeError(message, context, options);
  }

  // A server DISCONNECT carries a numeric reason code; a lost connection
  // before the banner shows up as a protocol-level error. Both are what a
  // VM does while booting or restarting sshd.
  if (typeof code === "number" || level === "protocol") {
    return new VmUnreachableError(
      `vm ${ip}:${port} closed the ssh connection: ${message}`,
      options,
    );
  }

  return new DeliveryFailedError(
    `ssh connection to vm ${ip}:${port} failed: ${message}`,
    { ...options, retryable: false },
  );
}

function classifyHandshakeError(
  message: string,
  context: ConnectFailureContext,
  options: { cause: unknown },
): ByomError {
  const { ip, port } = context;
  // ssh2 says "no matching host key format" when the VM offers none of the
  // algorithms we restricted the offer to: the policy cannot accept it.
  if (
    context.offeredHostKeyAlgorithms !== undefined &&
    /host key/i.test(message)
  ) {
    return new HostKeyRejectedError(
      `host key of vm ${ip} refused: the vm offers no host key of the allowed types (${context.offeredHostKeyAlgorithms.join(", ")}): ${message}`,
      options,
    );
  }
  return new DeliveryFailedError(
    `ssh handshake with vm ${ip}:${port} failed: ${message}`,
    { ...options, retryable: false },
  );
}

/**
 * Classifies an error raised by an SFTP step after login. When the
 * connection went away underneath, the step is retryable (VmUnreachable);
 * otherwise it is an SFTP failure (DeliveryFailed).
 */
export function classifySftpError(
  error: unknown,
  context: { ip: string; step: string; connectionLost: boolean },
): ByomError {
  const { message } = shape(error);
  if (context.connectionLost) {
    return new VmUnreachableError(
      `connection to vm ${context.ip} lost during ${context.step}: ${message}`,
      { cause: error },
    );
  }
  return new DeliveryFailedError(
    `sftp ${context.step} on vm ${context.ip} failed: ${message}`,
    { cause: error },
  );
}
