// Writes the wire schemas from src/protocol to docs/schemas/*.json.
// A unit test fails when the committed files drift from the code.
import { writeFile } from "node:fs/promises";

import { wireSchemas } from "../src/protocol/index.js";

for (const [name, schema] of Object.entries(wireSchemas)) {
  const path = new URL(`../docs/schemas/${name}.json`, import.meta.url);
  await writeFile(path, `${JSON.stringify(schema, null, 2)}\n`);
  console.log(`wrote docs/schemas/${name}.json`);
}
