/**
 * Local pod VMs for demos, tests and benchmarks: each a real OpenSSH sshd
 * on its own 127.x.y.z address, chrooted SFTP for one user, with a watcher
 * that acts on `cidata/user-data` and `cidata/reboot` as a pod VM does.
 */
import { chmod, mkdir, open, readFile, rm, rmdir } from "node:fs/promises";
import path from "node:path";

import {
  ConfigError,
  InternalError,
  InvalidRequestError,
  UnavailableError,
} from "../errors/index.js";
import { silentLogger, type Logger } from "../logging/index.js";
import { vmAddresses } from "./addresses.js";
import { assertPortFree, isAlive, killTree, type HostKeyType } from "./sshd.js";
import {
  checkChrootPath,
  checkPrerequisites,
  ensurePrivsepDir,
  ensureUser,
  userIds,
} from "./system.js";
import { SandboxVm } from "./vm.js";

export type { HostKeyType } from "./sshd.js";
export { generateClientKey, type ClientKeyPair } from "./system.js";

/** Options of {@link createSandbox}; only `vms` and `authorizedKeys` are required. */
export interface SandboxOptions {
  /** Number of pod VMs, 1 to 200. */
  vms: number;
  /**
   * Address of the first VM; VM n gets firstIp + n, walking across octets.
   * Every address must lie inside 127.0.0.0/8. Default "127.0.0.2".
   */
  firstIp?: string;
  /** sshd port on each VM's own address. Default 22. */
  port?: number;
  /**
   * Folder for the VMs. Every path component must be root-owned and not
   * group- or world-writable (sshd's ChrootDirectory rule), so never under
   * /tmp. Missing components are created 0755. Default
   * "/var/lib/byom-sandbox".
   */
  stateDir?: string;
  /** The SFTP-only user; created as a system user if missing. Default "peerpod". */
  username?: string;
  /** OpenSSH public key line(s) the VMs accept for that user. */
  authorizedKeys: string;
  /** Host key types made at each boot. Default ["ed25519", "ecdsa"]. */
  hostKeyTypes?: HostKeyType[];
  /** Silent by default. */
  logger?: Logger;
  /**
   * Called after every change of any VM's status (boot, user-data applied
   * or refused, reboot, stop, start). A listener that throws is logged and
   * ignored.
   */
  onChange?: () => void;
}

/** What one VM looks like now; a copy, safe to keep. */
export interface SandboxVmStatus {
  /** `vm-<ip>`. */
  name: string;
  ip: string;
  port: number;
  /** Host folder of this VM. */
  dir: string;
  /** Host path of its cidata/ (inside the chroot). */
  cidataDir: string;
  /** Applied files go to `<appliedDir>/<absolute path from user-data>`. */
  appliedDir: string;
  /** Host paths of the files applied from the current user-data. */
  appliedFiles: string[];
  /** Why the current user-data was refused, if it was. */
  userDataError?: string;
  /** Current host keys: type as in the .pub file, `SHA256:` fingerprint as `ssh-keygen -l` prints. */
  hostKeys: Array<{ type: string; fingerprint: string }>;
  /** 1 after start, +1 per reboot; stopVm/startVm do not count. */
  boots: number;
  state: "running" | "rebooting" | "stopped";
  /** sshd pid while it runs. */
  pid?: number;
}

/** A running sandbox; close it (or `await using`) to remove everything. */
export interface Sandbox {
  /** Every VM, in address order. */
  status(): SandboxVmStatus[];
  /** One VM; throws InvalidRequestError for an ip that is not in the sandbox. */
  vm(ip: string): SandboxVmStatus;
  /** Kills the VM's sshd and its connections (a VM that went down); keeps cidata and keys. */
  stopVm(ip: string): Promise<void>;
  /** Starts a stopped VM's sshd again with the same host keys; no-op when running. */
  startVm(ip: string): Promise<void>;
  /** Reboots as when the VM sees cidata/reboot: wipes cidata and applied files, new host keys. */
  reboot(ip: string): Promise<void>;
  /** Stops every sshd and removes every file the sandbox made; safe to call twice. */
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

const defaults = {
  firstIp: "127.0.0.2",
  port: 22,
  stateDir: "/var/lib/byom-sandbox",
  username: "peerpod",
  hostKeyTypes: ["ed25519", "ecdsa"] as HostKeyType[],
} as const;

/** VMs booted at once; each boot spawns ssh-keygen per key type and sshd. */
const bootConcurrency = 16;

const lockName = "sandbox.lock";

/**
 * Throws UnavailableError when the process is not root or when sshd or
 * ssh-keygen is missing (the message says how to install openssh-server).
 */
export function checkSandboxPrerequisites(): Promise<void> {
  return checkPrerequisites();
}

/**
 * Checks a state dir against sshd's ChrootDirectory rule and creates its
 * missing components (root, 0755). Returns the components it created,
 * outermost first. Throws ConfigError naming the offending component.
 */
export async function prepareSandboxStateDir(
  stateDir: string,
): Promise<string[]> {
  const missing = await checkChrootPath(stateDir);
  for (const dir of missing) {
    await mkdir(dir, { mode: 0o755 });
    await chmod(dir, 0o755);
  }
  return missing;
}

/**
 * Cleans up after a sandbox whose process died without `close()`: kills
 * each listed sshd that still runs with its config in the VM's dir (and
 * its connections), removes the VM dirs that lie inside `stateDir`, and
 * the state dir's lock when its owner is gone. Safe when nothing is left.
 */
export async function removeSandboxLeftovers(
  stateDir: string,
  vms: ReadonlyArray<Pick<SandboxVmStatus, "dir" | "pid">>,
): Promise<void> {
  const root = path.resolve(stateDir);
  for (const vm of vms) {
    const dir = path.resolve(vm.dir);
    if (!dir.startsWith(`${root}${path.sep}`)) {
      throw new ConfigError(`VM dir ${dir} is outside state dir ${root}`);
    }
    if (vm.pid !== undefined && (await commandLine(vm.pid)).includes(dir)) {
      await killTree(vm.pid);
    }
    await rm(dir, { recursive: true, force: true });
  }

  const lock = path.join(root, lockName);
  const owner = Number((await readFile(lock, "utf8").catch(() => "")).trim());
  if (!(Number.isInteger(owner) && owner > 0 && isAlive(owner))) {
    await rm(lock, { force: true });
  }
}

async function commandLine(pid: number): Promise<string> {
  const text = await readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "");
  return text.split("\0").join(" ");
}

/** The IP addresses a sandbox with these options would use. */
export function sandboxAddresses(
  vms: number,
  firstIp: string = defaults.firstIp,
): string[] {
  return vmAddresses(firstIp, vms);
}

/**
 * Starts `options.vms` pod VMs and resolves once every sshd answers.
 * Throws ConfigError or InvalidRequestError for bad options,
 * UnavailableError when not root, OpenSSH is missing, an address and port
 * is taken or the state dir is in use; on failure nothing is left behind.
 */
export async function createSandbox(options: SandboxOptions): Promise<Sandbox> {
  const settings = validate(options);
  await checkPrerequisites();
  const addresses = vmAddresses(settings.firstIp, settings.vms);
  await Promise.all(addresses.map((ip) => assertPortFree(ip, settings.port)));

  const sandbox = new LocalSandbox(settings);
  try {
    await sandbox.start(addresses);
  } catch (error) {
    await sandbox.close().catch(() => undefined);
    throw error;
  }
  return sandbox;
}

interface Settings {
  vms: number;
  firstIp: string;
  port: number;
  stateDir: string;
  username: string;
  authorizedKeys: string;
  hostKeyTypes: HostKeyType[];
  logger: Logger;
  onChange: () => void;
}

function validate(options: SandboxOptions): Settings {
  const port = options.port ?? defaults.port;
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new ConfigError(
      `option "port" must be an integer from 1 to 65535 (got ${port})`,
    );
  }
  const hostKeyTypes = [...(options.hostKeyTypes ?? defaults.hostKeyTypes)];
  const known: readonly string[] = ["ed25519", "ecdsa", "rsa"];
  if (
    hostKeyTypes.length === 0 ||
    new Set(hostKeyTypes).size !== hostKeyTypes.length ||
    hostKeyTypes.some((type) => !known.includes(type))
  ) {
    throw new ConfigError(
      `option "hostKeyTypes" must list distinct types among ${known.join(", ")} (got ${JSON.stringify(hostKeyTypes)})`,
    );
  }
  const keyLines = options.authorizedKeys
    .split("\n")
    .map((line) => line.trim())
    .filter((line) => line !== "" && !line.startsWith("#"));
  if (
    keyLines.length === 0 ||
    keyLines.some(
      (line) => !/^(ssh-|ecdsa-|sk-)\S+ [A-Za-z0-9+/]+=* ?/.test(line),
    )
  ) {
    throw new ConfigError(
      'option "authorizedKeys" must hold OpenSSH public key lines ("type base64 [comment]")',
    );
  }

  return {
    vms: options.vms,
    firstIp: options.firstIp ?? defaults.firstIp,
    port,
    stateDir: path.resolve(options.stateDir ?? defaults.stateDir),
    username: options.username ?? defaults.username,
    authorizedKeys: `${keyLines.join("\n")}\n`,
    hostKeyTypes,
    logger: (options.logger ?? silentLogger()).child({ component: "sandbox" }),
    onChange: options.onChange ?? (() => undefined),
  };
}

class LocalSandbox implements Sandbox {
  private readonly vms = new Map<string, SandboxVm>();
  private createdDirs: string[] = [];
  private locked = false;
  private closing: Promise<void> | undefined;

  constructor(private readonly settings: Settings) {}

  async start(addresses: string[]): Promise<void> {
    const { stateDir, username, logger } = this.settings;
    this.createdDirs = await prepareSandboxStateDir(stateDir);
    await this.lock();
    await ensureUser(username);
    await ensurePrivsepDir();
    const { uid, gid } = await userIds(username);

    // All VMs first, so status() lists them in address order.
    for (const ip of addresses) {
      const name = `vm-${ip}`;
      const dir = path.join(stateDir, name);
      this.vms.set(
        ip,
        new SandboxVm({ ...this.settings, name, ip, dir, uid, gid, logger }),
      );
    }
    const pending = [...this.vms.values()];
    const boot = async (): Promise<void> => {
      for (let vm = pending.shift(); vm !== undefined; vm = pending.shift()) {
        await rm(vm.snapshot().dir, { recursive: true, force: true });
        await vm.boot();
      }
    };
    await Promise.all(Array.from({ length: bootConcurrency }, boot));
    logger.info({ vms: addresses.length, stateDir }, "sandbox up");
  }

  status(): SandboxVmStatus[] {
    return [...this.vms.values()].map((vm) => vm.snapshot());
  }

  vm(ip: string): SandboxVmStatus {
    return this.find(ip).snapshot();
  }

  stopVm(ip: string): Promise<void> {
    return this.act(ip, (vm) => vm.stop());
  }

  startVm(ip: string): Promise<void> {
    return this.act(ip, (vm) => vm.start());
  }

  reboot(ip: string): Promise<void> {
    return this.act(ip, (vm) => vm.reboot());
  }

  close(): Promise<void> {
    this.closing ??= this.release();
    return this.closing;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  private find(ip: string): SandboxVm {
    const vm = this.vms.get(ip);
    if (vm === undefined) {
      throw new InvalidRequestError(
        `no sandbox VM has ip ${JSON.stringify(ip)}`,
      );
    }
    return vm;
  }

  private async act(
    ip: string,
    action: (vm: SandboxVm) => Promise<void>,
  ): Promise<void> {
    if (this.closing !== undefined) {
      throw new UnavailableError("the sandbox is closed");
    }
    return action(this.find(ip));
  }

  /** Takes `<stateDir>/sandbox.lock`, taking over one whose owner died. */
  private async lock(): Promise<void> {
    const file = path.join(this.settings.stateDir, lockName);
    for (let attempt = 0; attempt < 2; attempt += 1) {
      try {
        const handle = await open(file, "wx", 0o644);
        await handle.writeFile(`${process.pid}\n`);
        await handle.close();
        this.locked = true;
        return;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== "EEXIST") {
          throw error;
        }
      }
      const owner = Number(
        (await readFile(file, "utf8").catch(() => "")).trim(),
      );
      if (Number.isInteger(owner) && owner > 0 && isAlive(owner)) {
        throw new UnavailableError(
          `state dir ${this.settings.stateDir} is in use by sandbox process ${owner}; close it or pick another stateDir`,
        );
      }
      await rm(file, { force: true });
    }
    throw new UnavailableError(
      `cannot lock state dir ${this.settings.stateDir}`,
    );
  }

  /** Reverse order of start: VMs, their folders, the lock, created dirs. */
  private async release(): Promise<void> {
    const failures: unknown[] = [];
    const attempt = async (step: () => Promise<unknown>): Promise<void> => {
      try {
        await step();
      } catch (error) {
        failures.push(error);
      }
    };

    const vms = [...this.vms.values()].reverse();
    await Promise.all(vms.map((vm) => attempt(() => vm.close())));
    for (const vm of vms) {
      await attempt(() =>
        rm(vm.snapshot().dir, { recursive: true, force: true }),
      );
    }
    if (this.locked) {
      await attempt(() =>
        rm(path.join(this.settings.stateDir, lockName), { force: true }),
      );
    }
    for (const dir of [...this.createdDirs].reverse()) {
      // Someone else's files (the CLI's) may remain: leave the dir then.
      const removed = await rmdir(dir).then(
        () => true,
        () => false,
      );
      if (!removed) {
        break;
      }
    }

    this.settings.logger.info({ failures: failures.length }, "sandbox closed");
    if (failures.length > 0) {
      throw new InternalError(
        `sandbox close failed in ${failures.length} step(s): ${failures
          .map((error) =>
            error instanceof Error ? error.message : String(error),
          )
          .join("; ")}`,
        { cause: new AggregateError(failures) },
      );
    }
  }
}
