import { writeFile } from "node:fs/promises";

import type { Command } from "commander";

import { ConfigError } from "../../errors/index.js";
import {
  createSealingKeyPair,
  loadSealingSeeds,
  sealingPublicKeyOf,
} from "../../sealing/index.js";
import { failWith } from "../runtime.js";

/**
 * Adds `byom keys sealing generate|public`: the key pair that seals
 * user-data end to end (docs/sealing.md). The seed is written to a file
 * (0600) and never printed unless asked for with `--out -`.
 */
export function registerKeysCommands(program: Command): void {
  const keys = program.command("keys").description("manage byom keys");
  const sealing = keys
    .command("sealing")
    .description(
      "the xkey (curve25519) pair that seals user-data: publishers hold the public key, agents the seed",
    );

  sealing
    .command("generate")
    .description(
      "make a new sealing key pair: print the public key, write the seed to a file (0600)",
    )
    .option(
      "--out <file>",
      'seed file to create (refuses to overwrite); "-" prints the seed on stdout',
      "sealing.seed",
    )
    .option("--json", "print JSON")
    .action(async (options: { out: string; json?: boolean }) => {
      const json = options.json === true;
      try {
        const pair = createSealingKeyPair();
        if (options.out !== "-") {
          await writeSeed(options.out, pair.seed);
        }
        if (json) {
          console.log(
            JSON.stringify({
              publicKey: pair.publicKey,
              ...(options.out === "-"
                ? { seed: pair.seed }
                : { seedFile: options.out }),
            }),
          );
          return;
        }
        if (options.out === "-") {
          console.log(pair.seed);
          console.error(`public key: ${pair.publicKey}`);
          return;
        }
        console.log(pair.publicKey);
        console.error(
          `seed written to ${options.out} (mode 0600); give agents BYOM_SEALING_SEED_FILE, publishers BYOM_SEALING_PUBLIC_KEY=${pair.publicKey}`,
        );
      } catch (error) {
        failWith(error, json);
      }
    });

  sealing
    .command("public")
    .description("print the public key of a seed file")
    .requiredOption("--seed-file <file>", "file holding the SX... seed")
    .option("--json", "print JSON")
    .action(async (options: { seedFile: string; json?: boolean }) => {
      const json = options.json === true;
      try {
        const [seed] = await loadSealingSeeds(options.seedFile);
        const publicKey = sealingPublicKeyOf(seed ?? "");
        console.log(json ? JSON.stringify({ publicKey }) : publicKey);
      } catch (error) {
        failWith(error, json);
      }
    });
}

async function writeSeed(path: string, seed: string): Promise<void> {
  try {
    await writeFile(path, `${seed}\n`, { mode: 0o600, flag: "wx" });
  } catch (error) {
    const reason = (error as NodeJS.ErrnoException).code ?? String(error);
    throw new ConfigError(
      `--out "${path}" cannot be created: ${reason}${reason === "EEXIST" ? " (refusing to overwrite a seed)" : ""}`,
      { cause: error },
    );
  }
}
