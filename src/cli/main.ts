import { Command, CommanderError } from "commander";

import { ByomError } from "../errors/index.js";
import { registerCommands } from "./commands/index.js";
import { CliExit, ExitCode, exitCodeOfError } from "./exit.js";

/** Builds the `byom` program; exported for tests. */
export function buildProgram(): Command {
  const program = new Command("byom")
    .description(
      "Peer-pod VMs for Confidential Containers from a pool of pre-created VMs, over NATS JetStream",
    )
    .version("0.1.0")
    .showHelpAfterError("(run with --help for usage)")
    .exitOverride();
  registerCommands(program);
  return program;
}

async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return ExitCode.Ok;
  } catch (error) {
    if (error instanceof CommanderError) {
      return error.exitCode === 0 ? ExitCode.Ok : ExitCode.Invalid;
    }
    if (!(error instanceof CliExit)) {
      const label = error instanceof ByomError ? error.code : "error";
      const message = error instanceof Error ? error.message : String(error);
      console.error(`byom: ${label}: ${message}`);
    }
    return exitCodeOfError(error);
  }
}

// A reader that went away (`byom pool list | head`) is not an error.
for (const stream of [process.stdout, process.stderr]) {
  stream.on("error", (error: NodeJS.ErrnoException) => {
    if (error.code === "EPIPE") {
      process.exit(process.exitCode ?? 0);
    }
    throw error;
  });
}

process.exitCode = await main(process.argv);
// The command has finished and closed what it opened. A handle it could
// not close (a NATS connection whose connect timed out can complete later
// and stay open) must not keep the process, and its exit code, from the
// caller: flush the output, then exit.
for (const stream of [process.stdout, process.stderr]) {
  await new Promise<void>((resolve) => stream.write("", () => resolve()));
}
process.exit();
