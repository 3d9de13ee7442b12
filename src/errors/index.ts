/**
 * The one error hierarchy of byom-nats. Every error carries a stable string
 * `code` from the wire protocol and says whether retrying can help.
 */

/** Stable error codes; they travel on the wire in results. */
export const ErrorCode = {
  InvalidRequest: "INVALID_REQUEST",
  PayloadTooLarge: "PAYLOAD_TOO_LARGE",
  PoolExhausted: "POOL_EXHAUSTED",
  VmUnreachable: "VM_UNREACHABLE",
  HostKeyRejected: "HOST_KEY_REJECTED",
  AuthFailed: "AUTH_FAILED",
  DeliveryFailed: "DELIVERY_FAILED",
  NotOwner: "NOT_OWNER",
  Expired: "EXPIRED",
  Unavailable: "UNAVAILABLE",
  Internal: "INTERNAL",
} as const;
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

/** Codes whose failure may pass on a later try. */
const retryableCodes: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  ErrorCode.PoolExhausted,
  ErrorCode.VmUnreachable,
  ErrorCode.DeliveryFailed,
  ErrorCode.Unavailable,
  // A new request may be served in time (allocation ids keep it safe).
  ErrorCode.Expired,
]);

export function isRetryableCode(code: ErrorCode): boolean {
  return retryableCodes.has(code);
}

export function isErrorCode(value: unknown): value is ErrorCode {
  return (
    typeof value === "string" &&
    (Object.values(ErrorCode) as string[]).includes(value)
  );
}

export interface ByomErrorOptions {
  cause?: unknown;
  retryable?: boolean;
}

/** Base class: a readonly protocol `code` and a `retryable` flag. */
export class ByomError extends Error {
  readonly code: ErrorCode;
  readonly retryable: boolean;

  constructor(
    code: ErrorCode,
    message: string,
    options: ByomErrorOptions = {},
  ) {
    super(message, options.cause === undefined ? {} : { cause: options.cause });
    this.name = "ByomError";
    this.code = code;
    this.retryable = options.retryable ?? isRetryableCode(code);
  }
}

/** A request or a setting broke a rule; the message names field and rule. */
export class InvalidRequestError extends ByomError {
  constructor(message: string, options: ByomErrorOptions = {}) {
    super(ErrorCode.InvalidRequest, message, options);
    this.name = "InvalidRequestError";
  }
}

/** A configuration value broke a rule; stops start-up. */
export class ConfigError extends ByomError {
  constructor(message: string, options: ByomErrorOptions = {}) {
    super(ErrorCode.InvalidRequest, message, { ...options, retryable: false });
    this.name = "ConfigError";
  }
}

export class PayloadTooLargeError extends ByomError {
  constructor(message: string, options: ByomErrorOptions = {}) {
    super(ErrorCode.PayloadTooLarge, message, options);
    this.name = "PayloadTooLargeError";
  }
}

export class PoolExhaustedError extends ByomError {
  constructor(message: string, options: ByomErrorOptions = {}) {
    super(ErrorCode.PoolExhausted, message, options);
    this.name = "PoolExhaustedError";
  }
}

export class VmUnreachableError extends ByomError {
  constructor(message: string, options: ByomErrorOptions = {}) {
    super(ErrorCode.VmUnreachable, message, options);
    this.name = "VmUnreachableError";
  }
}

export class HostKeyRejectedError extends ByomError {
  constructor(message: string, options: ByomErrorOptions = {}) {
    super(ErrorCode.HostKeyRejected, message, options);
    this.name = "HostKeyRejectedError";
  }
}

export class AuthFailedError extends ByomError {
  constructor(message: string, options: ByomErrorOptions = {}) {
    super(ErrorCode.AuthFailed, message, options);
    this.name = "AuthFailedError";
  }
}

export class DeliveryFailedError extends ByomError {
  constructor(message: string, options: ByomErrorOptions = {}) {
    super(ErrorCode.DeliveryFailed, message, options);
    this.name = "DeliveryFailedError";
  }
}

export class NotOwnerError extends ByomError {
  constructor(message: string, options: ByomErrorOptions = {}) {
    super(ErrorCode.NotOwner, message, options);
    this.name = "NotOwnerError";
  }
}

export class ExpiredError extends ByomError {
  constructor(message: string, options: ByomErrorOptions = {}) {
    super(ErrorCode.Expired, message, options);
    this.name = "ExpiredError";
  }
}

export class UnavailableError extends ByomError {
  constructor(message: string, options: ByomErrorOptions = {}) {
    super(ErrorCode.Unavailable, message, options);
    this.name = "UnavailableError";
  }
}

export class InternalError extends ByomError {
  constructor(message: string, options: ByomErrorOptions = {}) {
    super(ErrorCode.Internal, message, options);
    this.name = "InternalError";
  }
}

/** Wraps anything thrown into a ByomError, keeping a ByomError as it is. */
export function toByomError(error: unknown): ByomError {
  if (error instanceof ByomError) {
    return error;
  }
  const message = error instanceof Error ? error.message : String(error);
  return new InternalError(`unexpected error: ${message}`, { cause: error });
}
