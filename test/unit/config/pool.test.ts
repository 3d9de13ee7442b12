import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { parsePoolIps } from "../../../src/config/index.js";
import { ConfigError } from "../../../src/errors/index.js";

function expand(text: string, maxRangeIps = 100) {
  return parsePoolIps(text, { maxRangeIps });
}

/** Asserts a ConfigError naming the entry and the rule. */
function assertRefused(text: string, entry: string, rule: RegExp): void {
  assert.throws(
    () => expand(text),
    (error: unknown) => {
      assert.ok(error instanceof ConfigError, String(error));
      assert.ok(
        error.message.startsWith(`VM_POOL_IPS entry "${entry}": `),
        error.message,
      );
      assert.match(error.message, rule);
      return true;
    },
  );
}

describe("parsePoolIps", () => {
  it("keeps singles and ranges in pool order, trimmed, skipping empty entries", () => {
    const pool = expand(" 10.0.0.9 ,, 10.0.0.1-10.0.0.3 ,");
    assert.deepEqual(pool.ips, [
      "10.0.0.9",
      "10.0.0.1",
      "10.0.0.2",
      "10.0.0.3",
    ]);
    assert.deepEqual(pool.warnings, []);
  });

  it("returns an empty pool for empty text", () => {
    assert.deepEqual(expand(""), { ips: [], warnings: [] });
    assert.deepEqual(expand(" , ,"), { ips: [], warnings: [] });
  });

  it("walks a range across octet boundaries", () => {
    assert.deepEqual(expand("10.0.2.254-10.0.3.1").ips, [
      "10.0.2.254",
      "10.0.2.255",
      "10.0.3.0",
      "10.0.3.1",
    ]);
  });

  it("walks an IPv6 range across group boundaries, in RFC 5952 form", () => {
    assert.deepEqual(expand("FD00::FFFE-fd00:0:0:0:0:0:1:1").ips, [
      "fd00::fffe",
      "fd00::ffff",
      "fd00::1:0",
      "fd00::1:1",
    ]);
  });

  it("accepts mixed IPv4 and IPv6 lists", () => {
    assert.deepEqual(expand("10.0.0.1, ::1, 10.0.0.2").ips, [
      "10.0.0.1",
      "::1",
      "10.0.0.2",
    ]);
  });

  it("removes duplicates after canonicalising, keeping the first place", () => {
    const pool = expand(
      "2001:DB8::1, 10.0.0.1, 2001:db8:0:0:0:0:0:1, 10.0.0.1",
    );
    assert.deepEqual(pool.ips, ["2001:db8::1", "10.0.0.1"]);
    assert.equal(pool.warnings.length, 1);
    assert.match(pool.warnings[0] ?? "", /2 addresses more than once/);
  });

  it("removes duplicates from overlapping ranges", () => {
    const pool = expand("10.0.0.3, 10.0.0.1-10.0.0.4");
    assert.deepEqual(pool.ips, [
      "10.0.0.3",
      "10.0.0.1",
      "10.0.0.2",
      "10.0.0.4",
    ]);
  });

  it("caps a range at maxRangeIps and warns naming the range and the dropped count", () => {
    const warned: string[] = [];
    const pool = parsePoolIps("10.0.0.1-10.0.0.10, 10.0.1.1", {
      maxRangeIps: 3,
      warn: (message) => warned.push(message),
    });
    assert.deepEqual(pool.ips, [
      "10.0.0.1",
      "10.0.0.2",
      "10.0.0.3",
      "10.0.1.1",
    ]);
    assert.equal(pool.warnings.length, 1);
    assert.deepEqual(warned, pool.warnings);
    assert.match(pool.warnings[0] ?? "", /"10\.0\.0\.1-10\.0\.0\.10"/);
    assert.match(pool.warnings[0] ?? "", /dropping 7\b/);
    assert.match(pool.warnings[0] ?? "", /MAX_RANGE_IPS=3/);
  });

  it("caps a huge IPv6 range without walking it", () => {
    const pool = expand("fd00::-fd00::ffff:ffff:ffff:ffff", 2);
    assert.deepEqual(pool.ips, ["fd00::", "fd00::1"]);
    assert.match(pool.warnings[0] ?? "", /dropping 18446744073709551614\b/);
  });

  it("takes a range that ends at the last address of the space", () => {
    assert.deepEqual(expand("255.255.255.254-255.255.255.255").ips, [
      "255.255.255.254",
      "255.255.255.255",
    ]);
    assert.deepEqual(
      expand(
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
      ).ips,
      [
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
      ],
    );
  });

  it("does not step past the end of the space when a range is capped exactly there", () => {
    assert.deepEqual(expand("255.255.255.253-255.255.255.255", 3).ips, [
      "255.255.255.253",
      "255.255.255.254",
      "255.255.255.255",
    ]);
    const pool = expand(
      "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffd-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
      2,
    );
    assert.deepEqual(pool.ips, [
      "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffd",
      "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe",
    ]);
    assert.match(pool.warnings[0] ?? "", /dropping 1\b/);
  });

  it("refuses a reversed range", () => {
    assertRefused(
      "10.0.0.1, 10.0.0.9-10.0.0.2",
      "10.0.0.9-10.0.0.2",
      /start is above its end/,
    );
  });

  it("refuses a range whose ends are the same address", () => {
    assertRefused("10.0.0.5-10.0.0.5", "10.0.0.5-10.0.0.5", /same address/);
    assertRefused("fd00::1-FD00:0::1", "fd00::1-FD00:0::1", /same address/);
  });

  it("refuses an invalid address naming it", () => {
    assertRefused(
      "10.0.0.1, 10.0.0.256",
      "10.0.0.256",
      /"10\.0\.0\.256" is not an IP address/,
    );
    assertRefused("vm-1.example", "vm-1.example", /is not an IP address/);
    assertRefused("10.0.0.1-", "10.0.0.1-", /range end is empty/);
  });

  it("refuses an IPv6 spelling with nine groups", () => {
    // "::" stands for at least one zero group, so "::" and eight more
    // groups is not an address.
    const entry =
      "::ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe-::ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    assertRefused(entry, entry, /range start ".*" is not an IP address/);
  });

  it("refuses CIDR prefixes", () => {
    assertRefused("10.0.0.0/24", "10.0.0.0/24", /CIDR/);
  });

  it("refuses zone-scoped IPv6 addresses", () => {
    assertRefused("fe80::1%eth0", "fe80::1%eth0", /zone/);
    assertRefused("fe80::1-fe80::5%eth0", "fe80::1-fe80::5%eth0", /zone/);
  });

  it("refuses a range whose ends are of different families", () => {
    assertRefused("10.0.0.1-::5", "10.0.0.1-::5", /different families/);
  });

  it("refuses an entry with more than one dash", () => {
    assertRefused(
      "10.0.0.1-10.0.0.2-10.0.0.3",
      "10.0.0.1-10.0.0.2-10.0.0.3",
      /exactly one "-"/,
    );
  });

  it("refuses a maxRangeIps below 1", () => {
    assert.throws(() => expand("10.0.0.1", 0), /MAX_RANGE_IPS=0/);
  });
});
