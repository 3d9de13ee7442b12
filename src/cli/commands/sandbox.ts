import { spawn } from "node:child_process";
import {
  mkdir,
  open,
  readFile,
  rename,
  rm,
  rmdir,
  writeFile,
} from "node:fs/promises";
import path from "node:path";
import { setTimeout as delay } from "node:timers/promises";

import { InvalidArgumentError, type Command } from "commander";
import { pino } from "pino";

import {
  ByomError,
  InternalError,
  InvalidRequestError,
  isErrorCode,
} from "../../errors/index.js";
import {
  checkSandboxPrerequisites,
  createSandbox,
  generateClientKey,
  prepareSandboxStateDir,
  removeSandboxLeftovers,
  sandboxAddresses,
  type Sandbox,
  type SandboxVmStatus,
} from "../../sandbox/index.js";

const defaultStateDir = "/var/lib/byom-sandbox";
const stateFileName = "sandbox.json";
const logFileName = "supervisor.log";
const clientDirName = "client";

/** What `<stateDir>/sandbox.json` holds; written by the supervisor. */
interface StateFile {
  version: 1;
  state: "starting" | "ready" | "failed";
  supervisorPid: number;
  stateDir: string;
  /** State dir components `up` created; `down` removes them when empty. */
  createdDirs: string[];
  /** Private key made by `up` when no --authorized-key was given. */
  clientKey?: string;
  updatedAt: string;
  error?: { code: string; message: string };
  vms: SandboxVmStatus[];
}

interface UpOptions {
  vms: number;
  firstIp: string;
  port: number;
  stateDir: string;
  authorizedKey?: string;
  json?: boolean;
}

interface SuperviseOptions {
  vms: number;
  firstIp: string;
  port: number;
  stateDir: string;
  authorizedKey: string;
  clientKey?: string;
  createdDirs: string;
}

function integer(min: number, max: number) {
  return (value: string): number => {
    const number = Number(value);
    if (!Number.isInteger(number) || number < min || number > max) {
      throw new InvalidArgumentError(
        `must be an integer from ${min} to ${max}`,
      );
    }
    return number;
  };
}

/** Adds `byom sandbox up|status|down` (and the hidden supervisor). */
export function registerSandboxCommands(program: Command): void {
  const sandbox = program
    .command("sandbox")
    .description(
      "local pod VMs (OpenSSH sshd on 127.x.y.z addresses) for demos, tests and benchmarks; needs root and openssh-server",
    );

  sandbox
    .command("up")
    .description(
      "start pod VMs in a background supervisor and print their status",
    )
    .requiredOption("--vms <n>", "number of pod VMs (1-200)", integer(1, 200))
    .option(
      "--first-ip <ip>",
      "address of the first VM; the next ones follow (inside 127.0.0.0/8)",
      "127.0.0.2",
    )
    .option("--port <port>", "sshd port on each VM", integer(1, 65535), 22)
    .option(
      "--state-dir <dir>",
      "root-owned folder for the VMs (not under /tmp)",
      defaultStateDir,
    )
    .option(
      "--authorized-key <file>",
      "public key file the VMs accept for peerpod; default: make a client key pair in <state-dir>/client/",
    )
    .option("--json", "print the status as JSON")
    .action((options: UpOptions) => up(options));

  sandbox
    .command("status")
    .description(
      "show each VM: address, cidata path, applied files, host keys, boots",
    )
    .option("--state-dir <dir>", "the sandbox's state folder", defaultStateDir)
    .option("--json", "print JSON")
    .action((options: { stateDir: string; json?: boolean }) => status(options));

  sandbox
    .command("down")
    .description("stop the sandbox and remove every file it made")
    .option("--state-dir <dir>", "the sandbox's state folder", defaultStateDir)
    .action((options: { stateDir: string }) => down(options));

  sandbox
    .command("supervise", { hidden: true })
    .description("run the VMs in the foreground (started by `sandbox up`)")
    .requiredOption("--vms <n>", "number of pod VMs", integer(1, 200))
    .requiredOption("--first-ip <ip>", "address of the first VM")
    .requiredOption("--port <port>", "sshd port", integer(1, 65535))
    .requiredOption("--state-dir <dir>", "state folder")
    .requiredOption("--authorized-key <file>", "public key file")
    .option("--client-key <file>", "private key path to report")
    .option("--created-dirs <json>", "dirs `up` created", "[]")
    .action((options: SuperviseOptions) => supervise(options));
}

async function up(options: UpOptions): Promise<void> {
  await checkSandboxPrerequisites();
  sandboxAddresses(options.vms, options.firstIp);
  const stateDir = path.resolve(options.stateDir);

  const existing = await readState(stateDir);
  if (existing !== undefined && (await isSupervisor(existing))) {
    throw new InvalidRequestError(
      `a sandbox is already up in ${stateDir} (supervisor pid ${existing.supervisorPid}); run: byom sandbox down --state-dir ${stateDir}`,
    );
  }
  if (existing !== undefined) {
    await cleanUp(stateDir, existing);
  }

  const createdDirs = await prepareSandboxStateDir(stateDir);
  const keys = await authorizedKey(stateDir, options.authorizedKey);
  const supervisorPid = await spawnSupervisor(options, stateDir, {
    ...keys,
    createdDirs,
  });
  const ready = await waitUntilReady(stateDir, supervisorPid, options.vms);

  if (options.json === true) {
    console.log(JSON.stringify(publicState(ready), null, 2));
    return;
  }
  printStatus(ready);
}

/** The key file to authorize, making a client key pair when none is given. */
async function authorizedKey(
  stateDir: string,
  given: string | undefined,
): Promise<{ authorizedKey: string; clientKey?: string }> {
  if (given !== undefined) {
    const file = path.resolve(given);
    const text = await readFile(file, "utf8").catch((error: unknown) => {
      throw new InternalError(`cannot read --authorized-key ${file}`, {
        cause: error,
      });
    });
    if (text.trim() === "") {
      throw new InvalidRequestError(`--authorized-key ${file} is empty`);
    }
    return { authorizedKey: file };
  }

  const clientDir = path.join(stateDir, clientDirName);
  await rm(clientDir, { recursive: true, force: true });
  await mkdir(clientDir, { mode: 0o700 });
  const clientKey = path.join(clientDir, "id_ed25519");
  await generateClientKey(clientKey);
  return { authorizedKey: `${clientKey}.pub`, clientKey };
}

/** Re-enters this CLI as a detached `sandbox supervise`, logging to a file. */
async function spawnSupervisor(
  options: UpOptions,
  stateDir: string,
  extra: { authorizedKey: string; clientKey?: string; createdDirs: string[] },
): Promise<number> {
  const script = process.argv[1];
  if (script === undefined) {
    throw new InternalError("cannot tell which script runs this CLI");
  }
  const args = [
    ...process.execArgv.filter((arg) => !arg.startsWith("--inspect")),
    script,
    "sandbox",
    "supervise",
    "--vms",
    String(options.vms),
    "--first-ip",
    options.firstIp,
    "--port",
    String(options.port),
    "--state-dir",
    stateDir,
    "--authorized-key",
    extra.authorizedKey,
    "--created-dirs",
    JSON.stringify(extra.createdDirs),
    ...(extra.clientKey === undefined ? [] : ["--client-key", extra.clientKey]),
  ];

  const log = await open(path.join(stateDir, logFileName), "w", 0o600);
  try {
    const child = spawn(process.execPath, args, {
      detached: true,
      stdio: ["ignore", log.fd, log.fd],
    });
    if (child.pid === undefined) {
      throw new InternalError("the sandbox supervisor did not start");
    }
    child.unref();
    return child.pid;
  } finally {
    await log.close();
  }
}

async function waitUntilReady(
  stateDir: string,
  supervisorPid: number,
  vms: number,
): Promise<StateFile> {
  const timeoutMs = 30_000 + 500 * vms;
  const until = Date.now() + timeoutMs;
  for (;;) {
    const state = await readState(stateDir);
    if (state?.supervisorPid === supervisorPid && state.state === "ready") {
      return state;
    }
    const failed = state?.state === "failed" ? state.error : undefined;
    const exited = !isAlive(supervisorPid);
    if (failed !== undefined || exited || Date.now() > until) {
      const log = await readFile(path.join(stateDir, logFileName), "utf8")
        .then((text) => text.trim().split("\n").slice(-5).join("\n"))
        .catch(() => "");
      await stopAndClean(stateDir, state);
      if (failed !== undefined) {
        throw isErrorCode(failed.code)
          ? new ByomError(failed.code, failed.message)
          : new InternalError(failed.message);
      }
      throw new InternalError(
        exited
          ? `the sandbox supervisor exited before it was ready; its last log lines:\n${log}`
          : `the sandbox was not ready within ${timeoutMs} ms`,
      );
    }
    await delay(100);
  }
}

async function supervise(options: SuperviseOptions): Promise<void> {
  const root = pino({
    base: { service: "byom" },
    timestamp: pino.stdTimeFunctions.isoTime,
  });
  const logger = root.child({ component: "sandbox-supervisor" });
  const stateDir = path.resolve(options.stateDir);
  const state: StateFile = {
    version: 1,
    state: "starting",
    supervisorPid: process.pid,
    stateDir,
    createdDirs: JSON.parse(options.createdDirs) as string[],
    ...(options.clientKey === undefined
      ? {}
      : { clientKey: options.clientKey }),
    updatedAt: new Date().toISOString(),
    vms: [],
  };
  const writer = stateWriter(stateDir, state, logger);
  await writer.write();

  let sandbox: Sandbox | undefined;
  const stop = untilStopSignal();
  try {
    sandbox = await createSandbox({
      vms: options.vms,
      firstIp: options.firstIp,
      port: options.port,
      stateDir,
      authorizedKeys: await readFile(options.authorizedKey, "utf8"),
      logger: root,
      onChange: () => {
        state.vms = sandbox?.status() ?? state.vms;
        writer.schedule();
      },
    });
  } catch (error) {
    const failure =
      error instanceof ByomError
        ? error
        : new InternalError(String(error), { cause: error });
    state.state = "failed";
    state.error = { code: failure.code, message: failure.message };
    await writer.write();
    throw failure;
  }

  state.vms = sandbox.status();
  state.state = "ready";
  await writer.write();
  logger.info({ vms: options.vms, stateDir }, "sandbox ready");

  const signal = await stop;
  logger.info({ signal }, "stopping the sandbox");
  await sandbox.close();
  await writer.idle();
  logger.info("sandbox stopped");
}

function untilStopSignal(): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    process.once("SIGTERM", resolve);
    process.once("SIGINT", resolve);
  });
}

/** Writes the state file atomically; coalesces bursts of changes. */
function stateWriter(
  stateDir: string,
  state: StateFile,
  logger: pino.Logger,
): { write(): Promise<void>; schedule(): void; idle(): Promise<void> } {
  const file = path.join(stateDir, stateFileName);
  let running: Promise<void> = Promise.resolve();
  let pending = false;

  const writeNow = async (): Promise<void> => {
    state.updatedAt = new Date().toISOString();
    const temp = `${file}.${process.pid}.tmp`;
    await writeFile(temp, `${JSON.stringify(state, null, 2)}\n`, {
      mode: 0o644,
    });
    await rename(temp, file);
  };
  const write = (): Promise<void> => {
    running = running.then(writeNow, writeNow);
    return running;
  };
  const schedule = (): void => {
    if (pending) {
      return;
    }
    pending = true;
    running = running
      .then(() => {
        pending = false;
        return writeNow();
      })
      .catch((error: unknown) => {
        logger.warn({ err: error }, "cannot write the sandbox state file");
      });
  };
  return { write, schedule, idle: () => running.catch(() => undefined) };
}

async function status(options: {
  stateDir: string;
  json?: boolean;
}): Promise<void> {
  const stateDir = path.resolve(options.stateDir);
  const state = await readState(stateDir);
  if (
    state === undefined ||
    state.state !== "ready" ||
    !(await isSupervisor(state))
  ) {
    throw new InvalidRequestError(
      `no sandbox is up in ${stateDir} (start one with: byom sandbox up --vms N --state-dir ${stateDir})`,
    );
  }
  if (options.json === true) {
    console.log(JSON.stringify(publicState(state), null, 2));
    return;
  }
  printStatus(state);
}

async function down(options: { stateDir: string }): Promise<void> {
  const stateDir = path.resolve(options.stateDir);
  const state = await readState(stateDir);
  if (state === undefined) {
    console.log(`no sandbox is up in ${stateDir}; nothing to do`);
    return;
  }
  await stopAndClean(stateDir, state);
  console.log(`sandbox in ${stateDir} is down`);
}

/** SIGTERM the supervisor, wait, then remove whatever is left. */
async function stopAndClean(
  stateDir: string,
  state: StateFile | undefined,
): Promise<void> {
  if (state !== undefined && (await isSupervisor(state))) {
    process.kill(state.supervisorPid, "SIGTERM");
    const until = Date.now() + 20_000;
    while (isAlive(state.supervisorPid) && Date.now() < until) {
      await delay(50);
    }
    if (isAlive(state.supervisorPid)) {
      process.kill(state.supervisorPid, "SIGKILL");
    }
  }
  await cleanUp(stateDir, state);
}

/** Removes the VMs' leftovers and the CLI's own files. */
async function cleanUp(
  stateDir: string,
  state: StateFile | undefined,
): Promise<void> {
  await removeSandboxLeftovers(stateDir, state?.vms ?? []);
  for (const name of [stateFileName, logFileName, clientDirName]) {
    await rm(path.join(stateDir, name), { recursive: true, force: true });
  }
  for (const dir of [...(state?.createdDirs ?? [])].reverse()) {
    const removed = await rmdir(dir).then(
      () => true,
      () => false,
    );
    if (!removed) {
      break;
    }
  }
}

async function readState(stateDir: string): Promise<StateFile | undefined> {
  let text: string;
  try {
    text = await readFile(path.join(stateDir, stateFileName), "utf8");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") {
      return undefined;
    }
    throw error;
  }
  const state = JSON.parse(text) as StateFile;
  if (state.version !== 1) {
    throw new InternalError(
      `${path.join(stateDir, stateFileName)} has version ${String(state.version)}; this byom reads version 1`,
    );
  }
  return state;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** True when the recorded pid still is this state dir's supervisor. */
async function isSupervisor(state: StateFile): Promise<boolean> {
  const commandLine = await readFile(
    `/proc/${state.supervisorPid}/cmdline`,
    "utf8",
  ).catch(() => "");
  const args = commandLine.split("\0");
  return args.includes("supervise") && args.includes(state.stateDir);
}

function publicState(state: StateFile): Record<string, unknown> {
  return {
    stateDir: state.stateDir,
    supervisorPid: state.supervisorPid,
    ...(state.clientKey === undefined ? {} : { clientKey: state.clientKey }),
    vms: state.vms,
  };
}

function printStatus(state: StateFile): void {
  const rows = state.vms.map((vm) => [
    vm.ip,
    String(vm.port),
    vm.state,
    String(vm.boots),
    vm.pid === undefined ? "-" : String(vm.pid),
    vm.userDataError === undefined
      ? `${vm.appliedFiles.length} applied`
      : "user-data refused",
  ]);
  const header = ["IP", "PORT", "STATE", "BOOTS", "PID", "USER-DATA"];
  const widths = header.map((title, column) =>
    Math.max(title.length, ...rows.map((row) => row[column]?.length ?? 0)),
  );
  const line = (cells: string[]): string =>
    cells
      .map((cell, column) => cell.padEnd(widths[column] ?? 0))
      .join("  ")
      .trimEnd();

  console.log(
    `sandbox in ${state.stateDir} (supervisor pid ${state.supervisorPid})`,
  );
  if (state.clientKey !== undefined) {
    console.log(`client key: ${state.clientKey}`);
  }
  console.log("");
  console.log(line(header));
  state.vms.forEach((vm, index) => {
    console.log(line(rows[index] ?? []));
    console.log(`    cidata: ${vm.cidataDir}`);
    for (const key of vm.hostKeys) {
      console.log(`    host key: ${key.type} ${key.fingerprint}`);
    }
    for (const file of vm.appliedFiles) {
      console.log(`    applied: ${file}`);
    }
    if (vm.userDataError !== undefined) {
      console.log(`    user-data error: ${vm.userDataError}`);
    }
  });
}
