/**
 * JSON Schemas (draft 2020-12) of the v1 wire messages. They are the
 * contract for other clients; `docs/schemas/` holds the same text.
 */

/** Limits that the schemas and the agent enforce. */
export const Limits = {
  requestIdMaxLength: 64,
  podNameMaxLength: 253,
  namespaceMaxLength: 63,
  sandboxIdMaxLength: 128,
  nodeNameMaxLength: 253,
  /** Upper bound of user-data whatever the server allows: 4 MiB. */
  userDataMaxBytes: 4 * 1024 * 1024,
  /** Base64 length of a sealed box of the largest user-data. */
  sealedBoxMaxLength: Math.ceil((4 * 1024 * 1024 + 64) / 3) * 4,
} as const;

/** The one algorithm of sealed user-data (NaCl box with an ephemeral sender). */
export const SealedAlgorithm = "x25519-xsalsa20-poly1305" as const;

/** An xkey (curve25519) public key: base32, 56 characters, starting with X. */
export const xkeyPublicPattern = "^X[A-Z2-7]{55}$";

const requestId = {
  type: "string",
  minLength: 1,
  maxLength: Limits.requestIdMaxLength,
  pattern: "^[A-Za-z0-9_-]+$",
  description: "Unique per request; also the Nats-Msg-Id header.",
} as const;

const dnsSubdomain = {
  type: "string",
  minLength: 1,
  maxLength: Limits.podNameMaxLength,
  pattern: "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
} as const;

const dnsLabel = {
  type: "string",
  minLength: 1,
  maxLength: Limits.namespaceMaxLength,
  pattern: "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
} as const;

const deadline = {
  type: "string",
  format: "date-time",
  description: "RFC 3339 time after which the request is answered EXPIRED.",
} as const;

const nodeName = {
  type: "string",
  minLength: 1,
  maxLength: Limits.nodeNameMaxLength,
  pattern: "^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
} as const;

export const createRequestSchema = {
  $schema: "https://json-schema.org/draft/2020-12/schema",
  $id: "https://byom-nats.dev/schemas/v1/create-request.json",
  title: "CreateRequest",
  type: "object",
  required: [
    "v",
    "kind",
    "requestId",
    "podName",
    "podNamespace",
    "sandboxId",
    "requestingNode",
    "deadline",
  ],
  oneOf: [{ required: ["userData"] }, { required: ["userDataSealed"] }],
  properties: {
    v: { const: 1 },
    kind: { const: "create" },
    requestId,
    podName: dnsSubdomain,
    podNamespace: dnsLabel,
    sandboxId: {
      type: "string",
      minLength: 1,
      maxLength: Limits.sandboxIdMaxLength,
      pattern: "^[A-Za-z0-9_-]+$",
    },
    requestingNode: nodeName,
    deadline,
    userData: {
      type: "string",
      minLength: 1,
      maxLength: Limits.userDataMaxBytes,
      description: "cloud-init #cloud-config document with write_files only.",
    },
    userDataSealed: {
      type: "object",
      required: ["alg", "sender", "box"],
      description:
        "userData sealed to the agents' xkey: give this or userData, not both.",
      properties: {
        alg: { const: SealedAlgorithm },
        sender: {
          type: "string",
          pattern: xkeyPublicPattern,
          description: "Ephemeral xkey public key of the sender.",
        },
        box: {
          type: "string",
          minLength: 1,
          maxLength: Limits.sealedBoxMaxLength,
          pattern: "^[A-Za-z0-9+/]+={0,2}$",
          description: "Base64 of the sealed bytes (xkv1 header, nonce, box).",
        },
      },
    },
  },
} as const;

export const deleteRequestSchema = {
  $schema: "https://json-schema.org/draft/2020-12/schema",
  $id: "https://byom-nats.dev/schemas/v1/delete-request.json",
  title: "DeleteRequest",
  type: "object",
  required: [
    "v",
    "kind",
    "requestId",
    "instanceId",
    "requestingNode",
    "deadline",
  ],
  properties: {
    v: { const: 1 },
    kind: { const: "delete" },
    requestId,
    instanceId: {
      type: "string",
      minLength: 1,
      maxLength: 64,
      pattern: "^[0-9A-Fa-f.:]+$",
      description: "The VM's IP address, as returned by create.",
    },
    allocationId: {
      type: "string",
      minLength: 1,
      maxLength: Limits.podNameMaxLength + Limits.sandboxIdMaxLength + 1,
      pattern: "^[A-Za-z0-9_.-]+$",
    },
    requestingNode: nodeName,
    deadline,
  },
} as const;

const errorCodes = [
  "INVALID_REQUEST",
  "PAYLOAD_TOO_LARGE",
  "POOL_EXHAUSTED",
  "VM_UNREACHABLE",
  "HOST_KEY_REJECTED",
  "AUTH_FAILED",
  "DELIVERY_FAILED",
  "NOT_OWNER",
  "EXPIRED",
  "UNAVAILABLE",
  "INTERNAL",
] as const;

export const resultSchema = {
  $schema: "https://json-schema.org/draft/2020-12/schema",
  $id: "https://byom-nats.dev/schemas/v1/result.json",
  title: "Result",
  type: "object",
  required: ["v", "requestId", "ok", "finishedAt"],
  properties: {
    v: { const: 1 },
    requestId: { type: "string" },
    ok: { type: "boolean" },
    kind: { enum: ["create", "delete"] },
    allocationId: { type: "string" },
    instance: {
      type: "object",
      required: ["id", "name", "ips"],
      properties: {
        id: { type: "string" },
        name: { type: "string" },
        ips: { type: "array", items: { type: "string" } },
      },
    },
    hostKey: {
      type: "object",
      required: ["type", "fingerprint"],
      properties: {
        type: { type: "string" },
        fingerprint: { type: "string", pattern: "^SHA256:" },
      },
    },
    release: {
      type: "object",
      required: ["state"],
      properties: { state: { type: "string" }, reason: { type: "string" } },
    },
    error: {
      type: "object",
      required: ["code", "message", "retryable"],
      properties: {
        code: { enum: errorCodes },
        message: { type: "string" },
        retryable: { type: "boolean" },
      },
    },
    requestDigest: {
      description:
        "sha256 (hex) of what the answered request is about: a publisher that finds another digest under its request id was answered for another request",
      type: "string",
      pattern: "^[0-9a-f]{64}$",
    },
    agent: { type: "string" },
    finishedAt: { type: "string", format: "date-time" },
  },
  if: { properties: { ok: { const: false } } },
  then: { required: ["error"] },
  else: { required: ["kind"] },
} as const;

/** Every wire schema by file name, as written to `docs/schemas/`. */
export const wireSchemas = {
  "create-request": createRequestSchema,
  "delete-request": deleteRequestSchema,
  result: resultSchema,
} as const;
