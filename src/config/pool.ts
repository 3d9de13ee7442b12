import { ConfigError } from "../errors/index.js";
import {
  compareIp,
  formatIp,
  nextIp,
  parseIp,
  type IpAddress,
} from "../protocol/index.js";

/** Options of {@link parsePoolIps}. */
export interface ParsePoolOptions {
  /** Most addresses taken from one range; the rest is dropped with a warning. */
  maxRangeIps: number;
  /** Called with each warning as it is found (they are also returned). */
  warn?: (message: string) => void;
}

/** The expanded pool. */
export interface ParsedPool {
  /** Canonical addresses (RFC 5952 for IPv6), in pool order, each once. */
  ips: string[];
  /** Capped ranges and duplicates, in words for an operator. */
  warnings: string[];
}

/**
 * Expands a `VM_POOL_IPS` value: comma-separated addresses and `start-end`
 * ranges, IPv4 and IPv6 mixed. Entries are trimmed and empty ones skipped;
 * a range walks across octet boundaries and keeps at most `maxRangeIps`
 * addresses; duplicates (after canonicalising) keep their first place.
 *
 * @throws ConfigError (`INVALID_REQUEST`) `VM_POOL_IPS entry "<entry>": <rule>`
 *   for an invalid address, a zone-scoped IPv6 address, a CIDR prefix, a
 *   range with more than one `-`, with ends of different families, with
 *   equal or reversed ends.
 */
export function parsePoolIps(
  text: string,
  options: ParsePoolOptions,
): ParsedPool {
  const maxRangeIps = options.maxRangeIps;
  if (!Number.isSafeInteger(maxRangeIps) || maxRangeIps < 1) {
    throw new ConfigError(
      `MAX_RANGE_IPS=${String(maxRangeIps)} (maxRangeIps): must be a positive integer`,
    );
  }

  const warnings: string[] = [];
  const report = (message: string): void => {
    warnings.push(message);
    options.warn?.(message);
  };

  const seen = new Set<string>();
  const ips: string[] = [];
  const duplicates: string[] = [];
  for (const part of text.split(",")) {
    const entry = part.trim();
    if (entry === "") {
      continue;
    }
    for (const address of expandEntry(entry, maxRangeIps, report)) {
      const canonical = formatIp(address);
      if (seen.has(canonical)) {
        duplicates.push(canonical);
        continue;
      }
      seen.add(canonical);
      ips.push(canonical);
    }
  }

  if (duplicates.length > 0) {
    const count = new Set(duplicates).size;
    report(
      `VM_POOL_IPS lists ${count} address${count === 1 ? "" : "es"} more than once (first: ${duplicates[0]}); each is used once, at its first place`,
    );
  }
  return { ips, warnings };
}

function invalid(entry: string, rule: string): never {
  throw new ConfigError(`VM_POOL_IPS entry "${entry}": ${rule}`);
}

function expandEntry(
  entry: string,
  maxRangeIps: number,
  report: (message: string) => void,
): IpAddress[] {
  const ends = entry.split("-");
  if (ends.length === 1) {
    return [parseEnd(entry, entry, "")];
  }
  if (ends.length > 2) {
    invalid(entry, 'a range has exactly one "-" between two addresses');
  }

  const start = parseEnd(entry, ends[0] ?? "", "range start ");
  const end = parseEnd(entry, ends[1] ?? "", "range end ");
  if (start.family !== end.family) {
    invalid(entry, "range ends are of different families (IPv4 and IPv6)");
  }
  const order = compareIp(start, end);
  if (order === 0) {
    invalid(
      entry,
      'range start and end are the same address; list a single address without "-"',
    );
  }
  if (order > 0) {
    invalid(entry, "range start is above its end");
  }

  return walkRange(entry, start, end, maxRangeIps, report);
}

function parseEnd(entry: string, text: string, label: string): IpAddress {
  const part = text.trim();
  if (part === "") {
    invalid(entry, `${label}is empty`);
  }
  if (part.includes("%")) {
    invalid(
      entry,
      `${label}"${part}" has a zone; zone-scoped IPv6 addresses are not supported`,
    );
  }
  if (part.includes("/")) {
    invalid(
      entry,
      `${label}"${part}" is not an IP address (CIDR prefixes are not supported; use a start-end range)`,
    );
  }
  const address = parseIp(part);
  if (address === undefined) {
    invalid(entry, `${label}"${part}" is not an IP address`);
  }
  return address;
}

/** The first `maxRangeIps` addresses of start..end, never stepping past end. */
function walkRange(
  entry: string,
  start: IpAddress,
  end: IpAddress,
  maxRangeIps: number,
  report: (message: string) => void,
): IpAddress[] {
  const size = end.value - start.value + 1n;
  const take = size > BigInt(maxRangeIps) ? maxRangeIps : Number(size);

  const addresses: IpAddress[] = [start];
  let current = start;
  while (addresses.length < take) {
    const next = nextIp(current);
    if (next === undefined) {
      invalid(
        entry,
        `range runs past the end of the IPv${start.family} address space`,
      );
    }
    addresses.push(next);
    current = next;
  }

  if (size > BigInt(take)) {
    report(
      `VM_POOL_IPS range "${entry}" holds ${size} addresses, more than MAX_RANGE_IPS=${maxRangeIps}: using ${formatIp(start)} to ${formatIp(current)} and dropping ${size - BigInt(take)}`,
    );
  }
  return addresses;
}
