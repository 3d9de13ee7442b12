import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { loadConfig } from "../../../src/config/index.js";
import { ConfigError } from "../../../src/errors/index.js";

/** Node files are never read from the machine in these tests. */
const noFiles = (): string => {
  throw new Error("ENOENT");
};

describe("config file errors never echo the file's text", () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "byom-config-errors-"));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  /** Writes `text`, loads it, and returns the ConfigError's message. */
  async function failureOf(name: string, text: string): Promise<string> {
    const file = join(dir, name);
    await writeFile(file, text);
    let caught: unknown;
    try {
      loadConfig({ env: {}, file, readFile: noFiles });
    } catch (error) {
      caught = error;
    }
    assert.ok(caught instanceof ConfigError, String(caught));
    assert.ok(caught.message.includes(file), caught.message);
    assert.equal(caught.cause, undefined, "a parser error is chained");
    return caught.message;
  }

  function assertHidden(message: string, ...secrets: string[]): void {
    for (const secret of secrets) {
      assert.ok(!message.includes(secret), `message shows ${secret}`);
    }
  }

  it("names line, column and code of an unclosed quote, not the line", async () => {
    const message = await failureOf(
      "unclosed.yaml",
      'natsUser: byom\nnatsPassword: "CFGSECRET\n',
    );
    assert.match(
      message,
      /at line 3, column 1: MISSING_CHAR \(a closing quote or bracket is missing\)/,
    );
    assertHidden(message, "CFGSECRET", "natsPassword");
  });

  it("names line, column and code of a mapping nested on one line", async () => {
    const message = await failureOf(
      "compact.yaml",
      "natsUser: byom\nnatsPassword: CFGSECRET3: x\n",
    );
    assert.match(message, /at line 2, column 15: BLOCK_AS_IMPLICIT_KEY/);
    assertHidden(message, "CFGSECRET3", "natsPassword");
  });

  it("does the same for JSON", async () => {
    const message = await failureOf(
      "broken.json",
      '{\n  "natsUser": "byom",\n  "natsPassword": "CFGSECRET4\n}\n',
    );
    assert.match(message, /at line \d+, column \d+: MISSING_CHAR/);
    assertHidden(message, "CFGSECRET4", "natsPassword");
  });

  it("refuses, without the text, what the parser only warns about", async () => {
    const message = await failureOf(
      "tag.yaml",
      "natsUser: byom\nnatsPassword: !secret CFGSECRET5\n",
    );
    assert.match(message, /at line 2, column 15: TAG_RESOLVE_FAILED/);
    assertHidden(message, "CFGSECRET5", "!secret");
  });

  it("does not name an alias that resolves to nothing", async () => {
    const message = await failureOf(
      "alias.yaml",
      "natsUser: byom\nnatsPassword: *CFGSECRET6\n",
    );
    assert.match(message, /an alias cannot be resolved/);
    assertHidden(message, "CFGSECRET6");
  });

  it("hides a secret setting given as a list or mapping", async () => {
    const message = await failureOf(
      "nested.yaml",
      "natsUser: byom\nnatsPassword:\n  - CFGSECRET7\n",
    );
    assert.match(message, /^NATS_PASSWORD=\[redacted\] \(natsPassword, from /);
    assertHidden(message, "CFGSECRET7");
  });
});
