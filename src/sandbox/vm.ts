import { createHash } from "node:crypto";
import { watch, constants, type FSWatcher } from "node:fs";
import {
  chmod,
  chown,
  lstat,
  mkdir,
  open,
  readdir,
  rm,
  writeFile,
} from "node:fs/promises";
import path from "node:path";

import { InternalError } from "../errors/index.js";
import type { Logger } from "../logging/index.js";
import { errorFields } from "../logging/index.js";
import { parseUserData, type UserDataFile } from "../protocol/index.js";
import {
  generateHostKeys,
  killTree,
  sshdConfig,
  startSshd,
  type HostKeyInfo,
  type HostKeyType,
  type StartedSshd,
  assertPortFree,
} from "./sshd.js";

/** Names the VM acts on inside cidata/; anything else is ignored. */
const userDataName = "user-data";
const rebootName = "reboot";

/** Largest user-data the VM reads; a larger file is refused. */
const maxUserDataBytes = 16 * 1024 * 1024;

/**
 * fs.watch (inotify) on the one flat cidata/ directory sees the renames
 * and writes that sshd's SFTP process makes; the periodic re-check covers
 * events the kernel coalesced or dropped (queue overflow when benchmarks
 * hit many VMs). chokidar would add nothing for a single directory.
 */
const recheckIntervalMs = 300;

export type VmState = "running" | "rebooting" | "stopped";

export interface VmSnapshot {
  name: string;
  ip: string;
  port: number;
  dir: string;
  cidataDir: string;
  appliedDir: string;
  appliedFiles: string[];
  userDataError?: string;
  hostKeys: HostKeyInfo[];
  boots: number;
  state: VmState;
  pid?: number;
}

export interface VmOptions {
  name: string;
  ip: string;
  port: number;
  dir: string;
  username: string;
  uid: number;
  gid: number;
  authorizedKeys: string;
  hostKeyTypes: readonly HostKeyType[];
  logger: Logger;
  onChange: () => void;
}

/** One pod VM: an sshd child process plus a watcher acting like the VM. */
export class SandboxVm {
  readonly cidataDir: string;
  readonly appliedDir: string;
  private readonly chrootDir: string;
  private readonly configFile: string;
  private readonly log: Logger;

  private appliedFiles: string[] = [];
  private userDataError: string | undefined;
  private hostKeys: HostKeyInfo[] = [];
  private boots = 0;
  private state: VmState = "stopped";
  private sshd: StartedSshd | undefined;

  private queue: Promise<void> = Promise.resolve();
  private checkPending = false;
  private seenUserData: string | undefined;
  private userDataDigest: string | undefined;
  private watcher: FSWatcher | undefined;
  private timer: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(private readonly options: VmOptions) {
    this.chrootDir = path.join(options.dir, "media");
    this.cidataDir = path.join(this.chrootDir, "cidata");
    this.appliedDir = path.join(options.dir, "applied");
    this.configFile = path.join(options.dir, "sshd_config");
    this.log = options.logger.child({ ip: options.ip });
  }

  snapshot(): VmSnapshot {
    const { name, ip, port, dir } = this.options;
    return {
      name,
      ip,
      port,
      dir,
      cidataDir: this.cidataDir,
      appliedDir: this.appliedDir,
      appliedFiles: [...this.appliedFiles],
      ...(this.userDataError === undefined
        ? {}
        : { userDataError: this.userDataError }),
      hostKeys: this.hostKeys.map((key) => ({ ...key })),
      boots: this.boots,
      state: this.state,
      ...(this.sshd === undefined ? {} : { pid: this.sshd.pid }),
    };
  }

  /** Lays out the VM folder, makes host keys, starts sshd and the watcher. */
  async boot(): Promise<void> {
    const { dir, uid, gid } = this.options;
    for (const folder of [dir, this.chrootDir, this.appliedDir]) {
      await mkdir(folder, { mode: 0o755 });
      await chmod(folder, 0o755);
    }
    await mkdir(this.cidataDir, { mode: 0o700 });
    await chmod(this.cidataDir, 0o700);
    await chown(this.cidataDir, uid, gid);

    const authorizedKeysFile = path.join(dir, "authorized_keys");
    await writeFile(authorizedKeysFile, this.options.authorizedKeys, {
      mode: 0o644,
    });
    await writeFile(
      this.configFile,
      sshdConfig({
        ...this.options,
        authorizedKeysFile,
        chrootDir: this.chrootDir,
      }),
      { mode: 0o644 },
    );

    this.hostKeys = await generateHostKeys(dir, this.options.hostKeyTypes);
    await this.spawnSshd();
    this.boots = 1;
    this.startWatcher();
    this.changed();
  }

  stop(): Promise<void> {
    return this.enqueue(async () => {
      await this.killSshd();
      this.state = "stopped";
      this.changed();
    });
  }

  start(): Promise<void> {
    return this.enqueue(async () => {
      if (this.sshd !== undefined) {
        return;
      }
      await assertPortFree(this.options.ip, this.options.port);
      await this.spawnSshd();
      this.changed();
    });
  }

  reboot(): Promise<void> {
    return this.enqueue(() => this.doReboot());
  }

  /** Stops the watcher and sshd; leaves the files to the caller. */
  async close(): Promise<void> {
    this.closed = true;
    this.watcher?.close();
    clearInterval(this.timer);
    // A reboot in flight would start a new sshd after the kill below.
    await this.queue;
    await this.killSshd();
    this.state = "stopped";
  }

  private enqueue(task: () => Promise<void>): Promise<void> {
    const result = this.queue.then(() => {
      if (this.closed) {
        throw new InternalError(`sandbox VM ${this.options.ip} is closed`);
      }
      return task();
    });
    this.queue = result.catch(() => undefined);
    return result;
  }

  private changed(): void {
    try {
      this.options.onChange();
    } catch (error) {
      this.log.warn({ err: errorFields(error) }, "change listener failed");
    }
  }

  private startWatcher(): void {
    this.watcher = watch(this.cidataDir, () => this.scheduleCheck());
    this.watcher.on("error", (error) => {
      this.log.warn({ err: errorFields(error) }, "cidata watch failed");
    });
    this.timer = setInterval(() => this.scheduleCheck(), recheckIntervalMs);
    this.timer.unref();
  }

  private scheduleCheck(): void {
    if (this.checkPending || this.closed) {
      return;
    }
    this.checkPending = true;
    this.enqueue(async () => {
      this.checkPending = false;
      await this.check();
    }).catch((error: unknown) => {
      if (!this.closed) {
        this.log.error({ err: errorFields(error) }, "cidata check failed");
      }
    });
  }

  private async check(): Promise<void> {
    const userData = await lstatOrUndefined(
      path.join(this.cidataDir, userDataName),
    );
    const signature =
      userData === undefined
        ? undefined
        : `${userData.ino}:${userData.size}:${userData.mtimeMs}:${userData.ctimeMs}`;
    if (signature === undefined) {
      this.seenUserData = undefined;
    } else if (signature !== this.seenUserData) {
      this.seenUserData = signature;
      await this.applyUserData();
    }

    if (
      (await lstatOrUndefined(path.join(this.cidataDir, rebootName))) !==
      undefined
    ) {
      await this.doReboot();
    }
  }

  /**
   * Acts on the current user-data as the VM would on every change. A
   * writer that does not rename into place may be seen half-done, as on a
   * real VM; a change that leaves the same bytes is ignored.
   */
  private async applyUserData(): Promise<void> {
    let text: string;
    try {
      text = await readRegularFile(path.join(this.cidataDir, userDataName));
    } catch (error) {
      await this.refuseUserData(error, undefined);
      return;
    }
    const digest = createHash("sha256").update(text).digest("hex");
    if (digest === this.userDataDigest) {
      return;
    }

    let files: UserDataFile[];
    try {
      files = parseUserData(text, { requireHeader: false });
    } catch (error) {
      await this.refuseUserData(error, digest);
      return;
    }

    this.appliedFiles = [];
    this.userDataError = undefined;
    await emptyDir(this.appliedDir);
    const written: string[] = [];
    for (const file of files) {
      const target = path.join(this.appliedDir, file.path);
      if (!target.startsWith(`${this.appliedDir}${path.sep}`)) {
        continue;
      }
      await mkdir(path.dirname(target), { recursive: true, mode: 0o755 });
      await writeFile(target, file.content, { mode: 0o644 });
      written.push(target);
    }
    this.appliedFiles = written;
    this.userDataDigest = digest;
    this.log.info(
      { files: written.length, bytes: Buffer.byteLength(text), digest },
      "user-data applied",
    );
    this.changed();
  }

  private async refuseUserData(
    error: unknown,
    digest: string | undefined,
  ): Promise<void> {
    this.appliedFiles = [];
    this.userDataError = error instanceof Error ? error.message : String(error);
    this.userDataDigest = digest;
    await emptyDir(this.appliedDir);
    this.log.warn({ error: this.userDataError }, "user-data refused");
    this.changed();
  }

  private async doReboot(): Promise<void> {
    this.state = "rebooting";
    this.changed();

    await this.killSshd();
    await emptyDir(this.cidataDir);
    await emptyDir(this.appliedDir);
    this.appliedFiles = [];
    this.userDataError = undefined;
    this.seenUserData = undefined;
    this.userDataDigest = undefined;
    this.hostKeys = await generateHostKeys(
      this.options.dir,
      this.options.hostKeyTypes,
    );
    await this.spawnSshd();

    this.boots += 1;
    this.log.info({ boots: this.boots }, "vm rebooted");
    this.changed();
  }

  private async spawnSshd(): Promise<void> {
    const { ip, port } = this.options;
    const started = await startSshd(this.configFile, ip, port, (line) =>
      this.log.debug({ line }, "sshd"),
    );
    this.sshd = started;
    this.state = "running";
    started.child.once("exit", (code, signal) => {
      if (this.sshd !== started) {
        return;
      }
      this.sshd = undefined;
      this.state = "stopped";
      this.log.warn({ code, signal }, "sshd exited unexpectedly");
      this.changed();
    });
  }

  private async killSshd(): Promise<void> {
    const running = this.sshd;
    this.sshd = undefined;
    if (running !== undefined) {
      await killTree(running.pid);
    }
  }
}

async function lstatOrUndefined(file: string) {
  try {
    return await lstat(file);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") {
      return undefined;
    }
    throw error;
  }
}

/**
 * Reads a file the SFTP user wrote, refusing symlinks (the watcher runs as
 * root) and anything larger than a pod VM would accept.
 */
async function readRegularFile(file: string): Promise<string> {
  const handle = await open(file, constants.O_RDONLY | constants.O_NOFOLLOW);
  try {
    const info = await handle.stat();
    if (!info.isFile()) {
      throw new InternalError(`${path.basename(file)} is not a regular file`);
    }
    if (info.size > maxUserDataBytes) {
      throw new InternalError(
        `${path.basename(file)} has ${info.size} bytes; at most ${maxUserDataBytes} are read`,
      );
    }
    return (await handle.readFile()).toString("utf8");
  } finally {
    await handle.close();
  }
}

async function emptyDir(dir: string): Promise<void> {
  for (const entry of await readdir(dir)) {
    await rm(path.join(dir, entry), { recursive: true, force: true });
  }
}
