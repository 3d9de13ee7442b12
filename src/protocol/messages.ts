import { createHash } from "node:crypto";

import type { ErrorCode } from "../errors/index.js";
import { LeaseKeyPrefix, RequestKind } from "./names.js";
import { canonicalIp, encodeIpKey } from "./ip.js";

/** Ask for a pod VM. allocation id = `<podName>-<sandboxId>`. */
export interface CreateRequest {
  v: 1;
  kind: "create";
  requestId: string;
  podName: string;
  podNamespace: string;
  sandboxId: string;
  requestingNode: string;
  /** RFC 3339 time after which the request must not start. */
  deadline: string;
  /** cloud-init `#cloud-config` document, UTF-8; or give `userDataSealed`. */
  userData?: string;
  /** `userData` sealed to the agents' xkey; exactly one of the two is set. */
  userDataSealed?: SealedUserData;
}

/**
 * User-data sealed to the agents' curve25519 (xkey) public key with a
 * fresh sender key per message, so the broker never holds it in clear.
 */
export interface SealedUserData {
  alg: "x25519-xsalsa20-poly1305";
  /** Ephemeral xkey public key (`X...`) of the sender. */
  sender: string;
  /** Base64 of the sealed bytes as `@nats-io/nkeys` writes them. */
  box: string;
}

/** Give a pod VM back. */
export interface DeleteRequest {
  v: 1;
  kind: "delete";
  requestId: string;
  /** The IP returned as instance id by create. */
  instanceId: string;
  /** When given, the delete is refused unless this allocation owns the IP. */
  allocationId?: string;
  requestingNode: string;
  deadline: string;
}

export type Request = CreateRequest | DeleteRequest;

export interface Instance {
  id: string;
  name: string;
  ips: string[];
}

export interface HostKeySeen {
  type: string;
  fingerprint: string;
}

export interface ResultError {
  code: ErrorCode;
  message: string;
  retryable: boolean;
}

export interface SuccessResult {
  v: 1;
  requestId: string;
  ok: true;
  kind: "create" | "delete";
  instance?: Instance;
  allocationId?: string;
  hostKey?: HostKeySeen;
  /** Set by delete: what became of the VM. */
  release?: { state: string; reason?: string };
  /** {@link requestDigest} of the request answered. */
  requestDigest?: string;
  agent: string;
  finishedAt: string;
}

export interface FailureResult {
  v: 1;
  requestId: string;
  ok: false;
  kind?: "create" | "delete";
  error: ResultError;
  /** {@link requestDigest} of the request answered, when it was readable. */
  requestDigest?: string;
  agent?: string;
  finishedAt: string;
}

export type Result = SuccessResult | FailureResult;

/**
 * What a request is about, as a sha256 (hex): kind and pod for a create,
 * kind, IP and allocation for a delete. Not the deadline (a retry sets a
 * new one) nor the user-data (a sealed retry differs in every byte). A
 * result carries the digest of the request it answered, so a request id
 * used again for another request is told apart from a retry.
 */
export function requestDigest(request: Request): string {
  const identity =
    request.kind === RequestKind.Create
      ? [request.kind, request.podNamespace, request.podName, request.sandboxId]
      : [
          request.kind,
          canonicalIp(request.instanceId) ?? request.instanceId,
          request.allocationId ?? "",
        ];
  return createHash("sha256").update(JSON.stringify(identity)).digest("hex");
}

/** The allocation id of a pod, as upstream builds it. */
export function allocationIdOf(podName: string, sandboxId: string): string {
  return `${podName}-${sandboxId}`;
}

/** The instance a lease on `ip` stands for. */
export function instanceOf(ip: string): Instance {
  return { id: ip, name: `byom-${ip}`, ips: [ip] };
}

/** KV key of the lease on a canonical IP. */
export function leaseKey(ip: string): string {
  return `${LeaseKeyPrefix.Ip}${encodeIpKey(ip)}`;
}

/** KV key of the index entry of an allocation id (validated chars only). */
export function allocationKey(allocationId: string): string {
  return `${LeaseKeyPrefix.Allocation}${allocationId}`;
}

/**
 * The upstream first pick: MD5 of the allocation id, first four bytes as a
 * big-endian unsigned integer, modulo the number of free IPs.
 */
export function preferredIndex(
  allocationId: string,
  freeCount: number,
): number {
  if (freeCount <= 0) {
    return -1;
  }
  const digest = createHash("md5").update(allocationId, "utf8").digest();
  return digest.readUInt32BE(0) % freeCount;
}
