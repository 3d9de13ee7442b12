/** Protocol major version spoken by this build. */
export const PROTOCOL_VERSION = 1 as const;

/** Default names of the NATS resources; all of them can be overridden. */
export const DefaultNames = {
  subjectPrefix: "byom.v1.requests",
  stream: "BYOM_REQUESTS",
  consumer: "byom-agents",
  leaseBucket: "byom-leases",
  resultBucket: "byom-results",
} as const;

/** The NATS resource names one deployment uses. */
export interface ResourceNames {
  readonly subjectPrefix: string;
  readonly stream: string;
  readonly consumer: string;
  readonly leaseBucket: string;
  readonly resultBucket: string;
}

/** Request kinds; each has its own subject under the prefix. */
export const RequestKind = {
  Create: "create",
  Delete: "delete",
} as const;
export type RequestKind = (typeof RequestKind)[keyof typeof RequestKind];

/** Header names used on request messages. */
export const Header = {
  /** JetStream de-duplication; always the request id. */
  MsgId: "Nats-Msg-Id",
  /** Subject the agent publishes the result to. */
  ReplyTo: "Byom-Reply-To",
} as const;
export type Header = (typeof Header)[keyof typeof Header];

/** Header names on lease-bucket writes; see docs/protocol.md. */
export const LeaseWriteHeader = {
  /** KV operation marker (`DEL`), as nats.js writes it. */
  Operation: "KV-Operation",
} as const;
export type LeaseWriteHeader =
  (typeof LeaseWriteHeader)[keyof typeof LeaseWriteHeader];

/** Lease states; see DESIGN §5. */
export const LeaseState = {
  Free: "free",
  Claimed: "claimed",
  Ready: "ready",
  Releasing: "releasing",
  Quarantined: "quarantined",
} as const;
export type LeaseState = (typeof LeaseState)[keyof typeof LeaseState];

/** KV key prefixes inside the lease bucket. */
export const LeaseKeyPrefix = {
  Ip: "ip.",
  Allocation: "alloc.",
} as const;

/** Resource names with a prefix applied, for side-by-side deployments and tests. */
export function resourceNames(
  overrides: Partial<ResourceNames> = {},
): ResourceNames {
  return Object.freeze({ ...DefaultNames, ...overrides });
}

export function requestSubject(
  names: ResourceNames,
  kind: RequestKind,
): string {
  return `${names.subjectPrefix}.${kind}`;
}

export function requestWildcard(names: ResourceNames): string {
  return `${names.subjectPrefix}.>`;
}

/** Remote paths, relative to the peerpod user's chroot. */
export const RemotePath = {
  cidataDir: "cidata",
  userData: "cidata/user-data",
  reboot: "cidata/reboot",
} as const;
