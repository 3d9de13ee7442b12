import type { Command } from "commander";

import { registerAgentCommand } from "./agent.js";
import { registerAllowlistCommands } from "./allowlist.js";
import { registerConfigCommands } from "./config.js";
import { registerDemoCommand } from "./demo.js";
import { registerKeysCommands } from "./keys.js";
import { registerPoolCommands } from "./pool.js";
import { registerPublishCommands } from "./publish.js";
import { registerSandboxCommands } from "./sandbox.js";

/** Adds every sub-command to the program. */
export function registerCommands(program: Command): void {
  registerDemoCommand(program);
  registerAgentCommand(program);
  registerPublishCommands(program);
  registerPoolCommands(program);
  registerConfigCommands(program);
  registerKeysCommands(program);
  registerSandboxCommands(program);
  registerAllowlistCommands(program);
}
