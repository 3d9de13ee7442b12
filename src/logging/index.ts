import { pino, type Logger } from "pino";

export type { Logger } from "pino";

/** A logger that drops everything: the default for library code. */
export function silentLogger(): Logger {
  return pino({ level: "silent" });
}

/**
 * Serialises an error for logs without its stack's secrets: name, code,
 * message and the cause chain's messages.
 */
export function errorFields(error: unknown): Record<string, unknown> {
  if (!(error instanceof Error)) {
    return { message: String(error) };
  }
  const fields: Record<string, unknown> = {
    type: error.name,
    message: error.message,
  };
  const code = (error as { code?: unknown }).code;
  if (code !== undefined) {
    fields.code = code;
  }
  if (error.cause !== undefined) {
    fields.cause = errorFields(error.cause);
  }
  return fields;
}
