import type { Command } from "commander";

/** Adds every sub-command to the program. */
export function registerCommands(program: Command): void {
  void program;
}
