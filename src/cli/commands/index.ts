import type { Command } from "commander";

import { registerConfigCommands } from "./config.js";

/** Adds every sub-command to the program. */
export function registerCommands(program: Command): void {
  void program;
  registerConfigCommands(program);
}
