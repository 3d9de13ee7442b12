import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { describe, it } from "node:test";

import {
  configurationDocPath,
  renderConfigurationDoc,
} from "../../../scripts/docs-config.js";
import { describeConfigSchema } from "../../../src/config/index.js";

describe("docs/configuration.md", () => {
  it("is what npm run docs:config makes from the config schema", async () => {
    const committed = await readFile(configurationDocPath, "utf8");
    assert.equal(
      committed,
      await renderConfigurationDoc(),
      "docs/configuration.md drifted from src/config: run npm run docs:config",
    );
  });

  it("names every key and env variable of the schema", async () => {
    const committed = await readFile(configurationDocPath, "utf8");
    for (const entry of describeConfigSchema()) {
      assert.ok(committed.includes(`\`${entry.env}\``), entry.env);
      assert.ok(committed.includes(`\`${entry.key}\``), entry.key);
    }
  });
});
