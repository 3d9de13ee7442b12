import { ByomError, ErrorCode } from "../errors/index.js";

/** Process exit codes by error class; documented in the README. */
export const ExitCode = {
  Ok: 0,
  Internal: 1,
  Invalid: 2,
  PoolExhausted: 3,
  VmFailure: 4,
  TrustFailure: 5,
  NotOwner: 6,
  Unavailable: 7,
} as const;
export type ExitCode = (typeof ExitCode)[keyof typeof ExitCode];

const byCode: Record<ErrorCode, ExitCode> = {
  [ErrorCode.InvalidRequest]: ExitCode.Invalid,
  [ErrorCode.PayloadTooLarge]: ExitCode.Invalid,
  [ErrorCode.PoolExhausted]: ExitCode.PoolExhausted,
  [ErrorCode.VmUnreachable]: ExitCode.VmFailure,
  [ErrorCode.DeliveryFailed]: ExitCode.VmFailure,
  [ErrorCode.HostKeyRejected]: ExitCode.TrustFailure,
  [ErrorCode.AuthFailed]: ExitCode.TrustFailure,
  [ErrorCode.NotOwner]: ExitCode.NotOwner,
  [ErrorCode.Expired]: ExitCode.Unavailable,
  [ErrorCode.Unavailable]: ExitCode.Unavailable,
  [ErrorCode.Internal]: ExitCode.Internal,
};

export function exitCodeOf(code: ErrorCode): ExitCode {
  return byCode[code];
}

/** Thrown by commands to end the process with a code after printing. */
export class CliExit extends Error {
  constructor(readonly exitCode: number) {
    super(`exit ${exitCode}`);
    this.name = "CliExit";
  }
}

export function exitCodeOfError(error: unknown): number {
  if (error instanceof CliExit) {
    return error.exitCode;
  }
  if (error instanceof ByomError) {
    return exitCodeOf(error.code);
  }
  return ExitCode.Internal;
}
