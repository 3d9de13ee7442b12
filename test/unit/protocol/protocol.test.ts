import assert from "node:assert/strict";
import { readFile, readdir } from "node:fs/promises";
import { describe, it } from "node:test";

import {
  canonicalIp,
  decodeIpKey,
  decodeRequest,
  encodeIpKey,
  leaseKey,
  parseUserData,
  preferredIndex,
  wireSchemas,
} from "../../../src/protocol/index.js";

const fixtures = new URL("../../fixtures/userdata/", import.meta.url);
const encode = (value: unknown): Uint8Array =>
  new TextEncoder().encode(JSON.stringify(value));

const create = {
  v: 1,
  kind: "create",
  requestId: "req-1",
  podName: "web-7d9c6b5f4-x2klm",
  podNamespace: "default",
  sandboxId: "0123abcd",
  requestingNode: "worker-1",
  deadline: "2026-12-03T18:00:00Z",
  userData: "#cloud-config\nwrite_files: []\n",
};

describe("protocol: requests", () => {
  it("accepts a valid create and ignores unknown extra fields", () => {
    const request = decodeRequest(
      encode({ ...create, futureField: true }),
      "create",
    );
    assert.equal(request.requestId, "req-1");
  });

  it("rejects an unknown major version naming the field", () => {
    assert.throws(
      () => decodeRequest(encode({ ...create, v: 2 })),
      /field "v" names unsupported protocol version 2/,
    );
  });

  it("rejects a kind that disagrees with the subject", () => {
    assert.throws(
      () => decodeRequest(encode(create), "delete"),
      /field "kind" must match the subject's kind "delete"/,
    );
  });

  it("names the field, the value and the rule", () => {
    assert.throws(
      () => decodeRequest(encode({ ...create, podName: "a/../b" })),
      /field "podName" must match .* \(got "a\/\.\.\/b"\)/,
    );
    assert.throws(
      () => decodeRequest(encode({ ...create, requestId: 7 })),
      /field "requestId" must be string \(got 7\)/,
    );
    assert.throws(
      () => decodeRequest(encode({ ...create, deadline: "tomorrow" })),
      /field "deadline" must match format "date-time"/,
    );
  });

  it("rejects bytes that are not UTF-8 or not JSON", () => {
    assert.throws(
      () => decodeRequest(new Uint8Array([0xff, 0xfe])),
      /not valid UTF-8/,
    );
    assert.throws(
      () => decodeRequest(new TextEncoder().encode("{")),
      /not valid JSON/,
    );
  });
});

describe("protocol: user-data", () => {
  it("parses every valid fixture into its files", async () => {
    const counts: Record<string, number> = {};
    for (const name of [
      "pod-basic.yaml",
      "pod-initdata.yaml",
      "pod-large-policy.yaml",
    ]) {
      counts[name] = parseUserData(
        await readFile(new URL(name, fixtures), "utf8"),
        { requireHeader: true },
      ).length;
    }
    assert.deepEqual(counts, {
      "pod-basic.yaml": 2,
      "pod-initdata.yaml": 3,
      "pod-large-policy.yaml": 1,
    });
  });

  it("refuses every invalid fixture with a rule naming the problem", async () => {
    const expected: Record<string, RegExp> = {
      "broken-yaml.yaml": /not valid YAML at line 7/,
      "empty.yaml": /must not be empty/,
      "no-header.yaml": /must start with a "#cloud-config" line/,
      "not-utf8.yaml": /valid UTF-8/,
      "tab-indent.yaml": /TAB_AS_INDENT/,
      "unknown-key.yaml": /top-level key "runcmd"/,
    };
    const names = (await readdir(new URL("invalid/", fixtures))).sort();
    assert.deepEqual(names, Object.keys(expected).sort());
    for (const name of names) {
      const text = await readFile(new URL(`invalid/${name}`, fixtures), "utf8");
      assert.throws(
        () => parseUserData(text, { requireHeader: true }),
        expected[name]!,
        name,
      );
    }
  });

  it("lets the VM parse user-data without the header, as the pod VM does", async () => {
    const text = await readFile(
      new URL("invalid/no-header.yaml", fixtures),
      "utf8",
    );
    assert.equal(parseUserData(text).length, 1);
  });

  it("refuses paths that climb out or carry control characters", () => {
    for (const path of [
      "run/x",
      "/run/../etc/shadow",
      "/run/./x",
      "/run/\u0007x",
    ]) {
      const text = `#cloud-config\nwrite_files:\n  - path: ${JSON.stringify(path)}\n    content: x\n`;
      assert.throws(
        () => parseUserData(text),
        /must be an absolute path/,
        path,
      );
    }
  });
});

describe("protocol: addresses and keys", () => {
  it("makes IPv6 canonical (RFC 5952) and refuses zones", () => {
    assert.equal(canonicalIp("2001:DB8:0:0:0:0:0:1"), "2001:db8::1");
    assert.equal(canonicalIp("2001:db8:0:0:1:0:0:1"), "2001:db8::1:0:0:1");
    assert.equal(canonicalIp("::ffff:0102:0304"), "::ffff:1.2.3.4");
    assert.equal(canonicalIp("fe80::1%eth0"), undefined);
    assert.equal(canonicalIp("10.0.0.256"), undefined);
  });

  it("encodes IPs into KV keys reversibly", () => {
    for (const ip of ["10.0.0.1", "2001:db8::1", "::", "::ffff:1.2.3.4"]) {
      assert.match(leaseKey(ip), /^[A-Za-z0-9_\-/=.]+$/);
      assert.equal(decodeIpKey(encodeIpKey(ip)), ip);
    }
  });

  it("picks like upstream: pod-1..pod-5 on .10-.15 get .13 .12 .11 .15 .10", () => {
    const free = [10, 11, 12, 13, 14, 15];
    const picked: number[] = [];
    for (let pod = 1; pod <= 5; pod += 1) {
      const [ip] = free.splice(preferredIndex(`pod-${pod}`, free.length), 1);
      picked.push(ip!);
    }
    assert.deepEqual(picked, [13, 12, 11, 15, 10]);
  });
});

describe("protocol: published schemas", () => {
  it("docs/schemas matches the schemas in the code (npm run schemas)", async () => {
    for (const [name, schema] of Object.entries(wireSchemas)) {
      const text = await readFile(
        new URL(`../../../docs/schemas/${name}.json`, import.meta.url),
        "utf8",
      );
      assert.deepEqual(
        JSON.parse(text),
        JSON.parse(JSON.stringify(schema)),
        name,
      );
    }
  });
});
