import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  loadConfig,
  NodeNameFiles,
  resolveNodeName,
} from "../../../src/config/index.js";

/** A file reader over an in-memory map; a missing file throws, as fs does. */
function files(contents: Record<string, string>): (path: string) => string {
  return (path) => {
    const content = contents[path];
    if (content === undefined) {
      throw new Error(`ENOENT: ${path}`);
    }
    return content;
  };
}

const hostname = (): string => "os-host";

describe("resolveNodeName", () => {
  const both = files({
    [NodeNameFiles.podinfo]: "from-podinfo\n",
    [NodeNameFiles.hostname]: "from-hostname\n",
  });

  it("takes NODE_NAME first, trimmed", () => {
    const name = resolveNodeName({
      env: { NODE_NAME: "  worker-1 \n" },
      readFile: both,
      hostname,
    });
    assert.equal(name, "worker-1");
  });

  it("treats a blank NODE_NAME as unset and reads the downward API file", () => {
    const name = resolveNodeName({
      env: { NODE_NAME: "   " },
      readFile: both,
      hostname,
    });
    assert.equal(name, "from-podinfo");
  });

  it("reads /etc/hostname when the downward API file is missing or blank", () => {
    const hostOnly = files({ [NodeNameFiles.hostname]: "\n  host-b\nextra\n" });
    assert.equal(
      resolveNodeName({ env: {}, readFile: hostOnly, hostname }),
      "host-b",
    );
    const blankPodinfo = files({
      [NodeNameFiles.podinfo]: " \n",
      [NodeNameFiles.hostname]: "host-c",
    });
    assert.equal(
      resolveNodeName({ env: {}, readFile: blankPodinfo, hostname }),
      "host-c",
    );
  });

  it("falls back to the operating system's host name", () => {
    assert.equal(
      resolveNodeName({ env: {}, readFile: files({}), hostname }),
      "os-host",
    );
  });

  it("gives loadConfig's node from nodeName or the files", () => {
    const fromEnv = loadConfig({ env: { NODE_NAME: "n-env" }, readFile: both });
    assert.equal(fromEnv.node, "n-env");
    assert.equal(fromEnv.nodeName, "n-env");
    const fromFiles = loadConfig({ env: {}, readFile: both });
    assert.equal(fromFiles.node, "from-podinfo");
    assert.equal(fromFiles.nodeName, "");
  });
});
