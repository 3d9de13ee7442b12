import { isIPv4, isIPv6 } from "node:net";

/** An IP address as a family and a big integer, for ordering and ranges. */
export interface IpAddress {
  readonly family: 4 | 6;
  readonly value: bigint;
}

const maxValue = { 4: (1n << 32n) - 1n, 6: (1n << 128n) - 1n } as const;

/**
 * Parses an IPv4 or IPv6 address (no zone, no prefix length). Returns
 * undefined for anything else; callers turn that into an error naming the
 * field.
 */
export function parseIp(text: string): IpAddress | undefined {
  if (isIPv4(text)) {
    return { family: 4, value: ipv4ToBigInt(text) };
  }
  if (text.includes("%") || !isIPv6(text)) {
    return undefined;
  }
  return { family: 6, value: ipv6ToBigInt(text) };
}

/** The canonical text of an address: dotted quad, or RFC 5952 for IPv6. */
export function formatIp(address: IpAddress): string {
  return address.family === 4
    ? formatIpv4(address.value)
    : formatIpv6(address.value);
}

/** Canonical text of `text`, or undefined when it is not an address. */
export function canonicalIp(text: string): string | undefined {
  const address = parseIp(text.trim());
  return address === undefined ? undefined : formatIp(address);
}

/** The address after `address`, or undefined past the end of its space. */
export function nextIp(address: IpAddress): IpAddress | undefined {
  if (address.value >= maxValue[address.family]) {
    return undefined;
  }
  return { family: address.family, value: address.value + 1n };
}

export function compareIp(left: IpAddress, right: IpAddress): number {
  if (left.family !== right.family) {
    return left.family - right.family;
  }
  return left.value < right.value ? -1 : left.value > right.value ? 1 : 0;
}

function ipv4ToBigInt(text: string): bigint {
  return text
    .split(".")
    .reduce((total, part) => (total << 8n) | BigInt(Number(part)), 0n);
}

function formatIpv4(value: bigint): string {
  const parts: number[] = [];
  for (let shift = 24n; shift >= 0n; shift -= 8n) {
    parts.push(Number((value >> shift) & 0xffn));
  }
  return parts.join(".");
}

function ipv6ToBigInt(text: string): bigint {
  let head = text;
  let tailGroups: number[] = [];
  // An embedded IPv4 tail (::ffff:1.2.3.4) counts as two groups.
  const lastColon = head.lastIndexOf(":");
  const last = head.slice(lastColon + 1);
  if (last.includes(".")) {
    const v4 = ipv4ToBigInt(last);
    tailGroups = [Number(v4 >> 16n), Number(v4 & 0xffffn)];
    head = head.slice(0, lastColon + 1) + "0";
  }

  const [left = "", right] = head.split("::");
  const leftGroups = left === "" ? [] : left.split(":");
  const rightGroups =
    right === undefined || right === "" ? [] : right.split(":");
  if (tailGroups.length > 0) {
    (right === undefined ? leftGroups : rightGroups).pop();
  }
  const known = leftGroups.length + rightGroups.length + tailGroups.length;
  const zeros = right === undefined ? 0 : 8 - known;
  const groups = [
    ...leftGroups.map((group) => parseInt(group, 16)),
    ...Array<number>(zeros).fill(0),
    ...rightGroups.map((group) => parseInt(group, 16)),
    ...tailGroups,
  ];
  return groups.reduce((total, group) => (total << 16n) | BigInt(group), 0n);
}

function formatIpv6(value: bigint): string {
  const groups: number[] = [];
  for (let shift = 112n; shift >= 0n; shift -= 16n) {
    groups.push(Number((value >> shift) & 0xffffn));
  }

  // RFC 5952: IPv4-mapped addresses keep the dotted tail.
  if (
    groups.slice(0, 5).every((group) => group === 0) &&
    groups[5] === 0xffff
  ) {
    return `::ffff:${formatIpv4(value & 0xffffffffn)}`;
  }

  // RFC 5952: compress the longest run of two or more zero groups, the
  // first one on a tie.
  let bestStart = -1;
  let bestLength = 0;
  for (let start = 0; start < 8;) {
    if (groups[start] !== 0) {
      start += 1;
      continue;
    }
    let end = start;
    while (end < 8 && groups[end] === 0) {
      end += 1;
    }
    if (end - start > bestLength && end - start >= 2) {
      bestStart = start;
      bestLength = end - start;
    }
    start = end;
  }

  const hex = groups.map((group) => group.toString(16));
  if (bestStart < 0) {
    return hex.join(":");
  }
  const before = hex.slice(0, bestStart).join(":");
  const after = hex.slice(bestStart + bestLength).join(":");
  return `${before}::${after}`;
}

/**
 * KV key part for a canonical IP. KV keys allow `A-Za-z0-9_-/=.`, so the
 * colons of IPv6 become underscores; canonical text has no underscore, so
 * the mapping is reversible.
 */
export function encodeIpKey(canonical: string): string {
  return canonical.replaceAll(":", "_");
}

export function decodeIpKey(encoded: string): string {
  return encoded.replaceAll("_", ":");
}
