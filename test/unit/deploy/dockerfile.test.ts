import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { describe, it } from "node:test";

import { DockerfileParser, type Instruction } from "dockerfile-ast";
import { validate } from "dockerfile-utils";

const dockerfilePath = new URL("../../../Dockerfile", import.meta.url);
const text = await readFile(dockerfilePath, "utf8");
const dockerfile = DockerfileParser.parse(text);
const instructions = dockerfile.getInstructions();

const keyword = (instruction: Instruction): string => instruction.getKeyword();
const args = (instruction: Instruction): string =>
  instruction.getArgumentsContent() ?? "";
const stages = (): Instruction[][] => {
  const list: Instruction[][] = [];
  for (const instruction of instructions) {
    if (keyword(instruction) === "FROM") {
      list.push([]);
    }
    list.at(-1)?.push(instruction);
  }
  return list;
};

describe("Dockerfile", () => {
  it("has no problem the Dockerfile linter reports", () => {
    const problems = validate(text).map(
      (problem) => `line ${problem.range.start.line + 1}: ${problem.message}`,
    );
    assert.deepEqual(problems, []);
  });

  it("builds on an exactly pinned Node 20 bookworm-slim image", () => {
    const arg = instructions.find(
      (instruction) =>
        keyword(instruction) === "ARG" &&
        args(instruction).startsWith("NODE_IMAGE="),
    );
    assert.ok(arg, "ARG NODE_IMAGE=...");
    assert.match(
      args(arg),
      /^NODE_IMAGE=node:20\.\d+\.\d+-bookworm-slim(@sha256:[0-9a-f]{64})?$/,
    );
    for (const stage of stages()) {
      assert.match(args(stage[0]!), /^\$\{NODE_IMAGE\} AS \w+$/);
    }
  });

  it("is multi-stage and installs production dependencies only in the image", () => {
    const all = stages();
    assert.ok(all.length >= 2, "at least two stages");
    const runs = instructions
      .filter((instruction) => keyword(instruction) === "RUN")
      .map(args);
    assert.ok(runs.some((run) => /npm ci --omit=dev/.test(run)));

    const final = all.at(-1)!;
    const copies = final
      .filter((instruction) => keyword(instruction) === "COPY")
      .map((instruction) => instruction.getTextContent());
    assert.ok(
      copies.some((copy) => /--from=deps \S*node_modules/.test(copy)),
      "node_modules come from the production-only stage",
    );
    assert.ok(
      final.every(
        (instruction) =>
          keyword(instruction) !== "RUN" ||
          !/npm (ci|install)/.test(args(instruction)),
      ),
    );
  });

  it("runs as a numeric non-root user with byom as the entrypoint", () => {
    const final = stages().at(-1)!;
    const user = final
      .filter((instruction) => keyword(instruction) === "USER")
      .at(-1);
    assert.ok(user, "USER in the final stage");
    const [uid] = args(user).split(":");
    assert.match(uid ?? "", /^\d+$/);
    assert.notEqual(Number(uid), 0);

    const entrypoint = final.find(
      (instruction) => keyword(instruction) === "ENTRYPOINT",
    );
    assert.ok(entrypoint);
    assert.deepEqual(JSON.parse(args(entrypoint)), ["byom"]);
  });
});
