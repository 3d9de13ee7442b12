import {
  Ajv2020,
  type ErrorObject,
  type ValidateFunction,
} from "ajv/dist/2020.js";

import { InvalidRequestError } from "../errors/index.js";
import type {
  CreateRequest,
  DeleteRequest,
  Request,
  Result,
} from "./messages.js";
import { canonicalIp } from "./ip.js";
import { PROTOCOL_VERSION, RequestKind } from "./names.js";
import {
  createRequestSchema,
  deleteRequestSchema,
  resultSchema,
} from "./schemas.js";

let compiled:
  | {
      create: ValidateFunction<CreateRequest>;
      delete: ValidateFunction<DeleteRequest>;
      result: ValidateFunction<Result>;
    }
  | undefined;

function validators(): NonNullable<typeof compiled> {
  if (compiled === undefined) {
    const ajv = new Ajv2020({
      allErrors: false,
      strict: true,
      strictRequired: false,
    });
    ajv.addFormat("date-time", isRfc3339);
    compiled = {
      create: ajv.compile<CreateRequest>(createRequestSchema),
      delete: ajv.compile<DeleteRequest>(deleteRequestSchema),
      result: ajv.compile<Result>(resultSchema),
    };
  }
  return compiled;
}

const rfc3339 =
  /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/i;

/** RFC 3339 date-time, as JSON Schema's "date-time" format. */
function isRfc3339(text: string): boolean {
  return rfc3339.test(text) && !Number.isNaN(Date.parse(text));
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** Shows a value in an error message: JSON, cut to 80 characters. */
export function showValue(value: unknown): string {
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}

function fieldOf(error: ErrorObject): string {
  const path = error.instancePath.replace(/^\//, "").replaceAll("/", ".");
  if (error.keyword === "required") {
    const missing = (error.params as { missingProperty: string })
      .missingProperty;
    return path === "" ? missing : `${path}.${missing}`;
  }
  return path === "" ? "(message)" : path;
}

/** Pattern rules said in words, by field. */
const patternRules: Record<string, string> = {
  instanceId: "must be an IP address",
  "userDataSealed.sender":
    "must be an xkey public key (X followed by 55 base32 characters)",
  "userDataSealed.box": "must be base64",
};

function ruleOf(error: ErrorObject, field: string): string {
  const params = error.params as Record<string, unknown>;
  switch (error.keyword) {
    case "required":
      return "is required";
    case "pattern":
      return patternRules[field] ?? `must match ${String(params.pattern)}`;
    case "const":
      return `must be ${showValue(params.allowedValue)}`;
    case "type":
      return `must be ${String(params.type)}`;
    case "minLength":
      return params.limit === 1
        ? "must not be empty"
        : `must be at least ${String(params.limit)} characters`;
    case "maxLength":
      return `must be at most ${String(params.limit)} characters`;
    default:
      return error.message ?? error.keyword;
  }
}

/** Fields whose value is never repeated in a message: user-data is secret. */
function isSecretField(field: string): boolean {
  return field === "userData" || field === "userDataSealed.box";
}

/** A value for a message; a secret one only by type and length. */
function showField(field: string, value: unknown): string {
  if (!isSecretField(field)) {
    return showValue(value);
  }
  return typeof value === "string"
    ? `a string of ${value.length} characters`
    : `a value of type ${value === null ? "null" : typeof value}`;
}

/** The message of a failed `oneOf` between userData and userDataSealed. */
function describeUserDataChoice(message: Record<string, unknown>): string {
  return "userData" in message && "userDataSealed" in message
    ? 'fields "userData" and "userDataSealed" are exclusive: give exactly one'
    : 'field "userData" is required (or "userDataSealed" when sealed)';
}

function describe(
  error: ErrorObject,
  message: Record<string, unknown>,
): string {
  if (error.schemaPath.startsWith("#/oneOf")) {
    return describeUserDataChoice(message);
  }
  const field = fieldOf(error);
  const rule = ruleOf(error, field);
  if (error.keyword === "required") {
    return `field "${field}" ${rule}`;
  }
  const value = error.instancePath
    .split("/")
    .slice(1)
    .reduce<unknown>(
      (node, part) =>
        node !== null && typeof node === "object"
          ? (node as Record<string, unknown>)[part]
          : undefined,
      message,
    );
  return `field "${field}" ${rule} (got ${showField(field, value)})`;
}

/**
 * Parses the bytes of a message as UTF-8 JSON object. Throws
 * InvalidRequestError naming the problem.
 */
export function parseMessage(bytes: Uint8Array): Record<string, unknown> {
  let text: string;
  try {
    text = utf8.decode(bytes);
  } catch (error) {
    throw new InvalidRequestError("message is not valid UTF-8", {
      cause: error,
    });
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    throw new InvalidRequestError(`message is not valid JSON: ${reason}`, {
      cause: error,
    });
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw new InvalidRequestError(
      `message must be a JSON object (got ${showValue(parsed)})`,
    );
  }
  return parsed as Record<string, unknown>;
}

function checkVersion(message: Record<string, unknown>): void {
  const version = message.v;
  if (version === undefined) {
    throw new InvalidRequestError('field "v" is required (protocol version)');
  }
  if (typeof version !== "number" || !Number.isInteger(version)) {
    throw new InvalidRequestError(
      `field "v" must be an integer protocol version (got ${showValue(version)})`,
    );
  }
  if (version !== PROTOCOL_VERSION) {
    throw new InvalidRequestError(
      `field "v" names unsupported protocol version ${version}; this agent speaks ${PROTOCOL_VERSION}`,
    );
  }
}

/**
 * Decodes and validates a request. The `kind` comes from the subject and
 * must agree with the message's own `kind`. Unknown extra fields are
 * ignored. Throws InvalidRequestError naming the field, value and rule.
 */
export function decodeRequest(bytes: Uint8Array, kind?: RequestKind): Request {
  const message = parseMessage(bytes);
  checkVersion(message);

  const messageKind = message.kind;
  if (
    messageKind !== RequestKind.Create &&
    messageKind !== RequestKind.Delete
  ) {
    throw new InvalidRequestError(
      `field "kind" must be "create" or "delete" (got ${showValue(messageKind)})`,
    );
  }
  if (kind !== undefined && messageKind !== kind) {
    throw new InvalidRequestError(
      `field "kind" must match the subject's kind "${kind}" (got ${showValue(messageKind)})`,
    );
  }
  return validateRequest(message);
}

/** Validates an already parsed request object. */
export function validateRequest(message: Record<string, unknown>): Request {
  const validate =
    message.kind === RequestKind.Create
      ? validators().create
      : validators().delete;
  if (!validate(message)) {
    const first = firstError(validate, message);
    throw new InvalidRequestError(
      first === undefined ? "request is invalid" : describe(first, message),
    );
  }
  if (
    message.kind === RequestKind.Delete &&
    canonicalIp(String(message.instanceId)) === undefined
  ) {
    throw new InvalidRequestError(
      `field "instanceId" must be an IP address (got ${showValue(message.instanceId)})`,
    );
  }
  return message as unknown as Request;
}

/**
 * The error to report. Ajv checks `oneOf` (userData or userDataSealed)
 * before `required`; a missing podName is the clearer message, so the
 * user-data choice is reported only when everything else is right.
 */
function firstError(
  validate: ValidateFunction,
  message: Record<string, unknown>,
): ErrorObject | undefined {
  const first = validate.errors?.[0];
  if (first === undefined || !first.schemaPath.startsWith("#/oneOf")) {
    return first;
  }
  const rest = Object.fromEntries(
    Object.entries(message).filter(
      ([key]) => key !== "userData" && key !== "userDataSealed",
    ),
  );
  if (!validate({ ...rest, userData: "#cloud-config" })) {
    return validate.errors?.[0] ?? first;
  }
  return first;
}

/** Decodes a result; throws InvalidRequestError when it breaks the schema. */
export function decodeResult(bytes: Uint8Array): Result {
  const message = parseMessage(bytes);
  checkVersion(message);
  const validate = validators().result;
  if (!validate(message)) {
    const first = validate.errors?.[0];
    throw new InvalidRequestError(
      `result is invalid: ${first === undefined ? "unknown" : describe(first, message)}`,
    );
  }
  return message as unknown as Result;
}

/** A best-effort request id from an undecodable message, for its error result. */
export function requestIdHint(bytes: Uint8Array): string | undefined {
  try {
    const id = parseMessage(bytes).requestId;
    return typeof id === "string" && /^[A-Za-z0-9_-]{1,64}$/.test(id)
      ? id
      : undefined;
  } catch {
    return undefined;
  }
}
