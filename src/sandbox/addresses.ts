import { isIPv4 } from "node:net";

import { InvalidRequestError } from "../errors/index.js";

/** Most pod VMs one sandbox runs. */
export const maxVms = 200;

function toNumber(ip: string): number {
  return ip.split(".").reduce((value, octet) => value * 256 + Number(octet), 0);
}

function toAddress(value: number): string {
  return [24, 16, 8, 0].map((shift) => (value >>> shift) & 255).join(".");
}

/**
 * The addresses of `count` VMs from `firstIp` on, walking across octets.
 * Every one must be a usable host address inside 127.0.0.0/8, so the
 * sandbox never binds anything reachable from outside the machine.
 */
export function vmAddresses(firstIp: string, count: number): string[] {
  if (!Number.isInteger(count) || count < 1 || count > maxVms) {
    throw new InvalidRequestError(
      `option "vms" must be an integer from 1 to ${maxVms} (got ${count})`,
    );
  }
  if (!isIPv4(firstIp) || !firstIp.startsWith("127.")) {
    throw new InvalidRequestError(
      `option "firstIp" must be an IPv4 address inside 127.0.0.0/8 (got ${JSON.stringify(firstIp)})`,
    );
  }

  const first = toNumber(firstIp);
  const last = first + count - 1;
  const lowest = toNumber("127.0.0.1");
  const highest = toNumber("127.255.255.254");
  if (first < lowest || last > highest) {
    throw new InvalidRequestError(
      `option "firstIp" ${firstIp} with ${count} VMs leaves 127.0.0.1-127.255.255.254 (last would be ${toAddress(last)})`,
    );
  }

  return Array.from({ length: count }, (_, index) => toAddress(first + index));
}
