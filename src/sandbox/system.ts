import { execFile } from "node:child_process";
import { access, constants, mkdir, readFile, stat } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";

import {
  ConfigError,
  InternalError,
  UnavailableError,
} from "../errors/index.js";

const execFileAsync = promisify(execFile);

/** Where Debian's OpenSSH lives; sshd must be started by absolute path. */
export const sshdPath = "/usr/sbin/sshd";
export const sshKeygenPath = "/usr/bin/ssh-keygen";

const installHint = "install openssh-server: apt-get install -y openssh-server";

/** Runs a program without a shell; rejects with its stderr in the message. */
export async function run(file: string, args: string[]): Promise<string> {
  try {
    const { stdout } = await execFileAsync(file, args, { encoding: "utf8" });
    return stdout;
  } catch (error) {
    const stderr = (error as { stderr?: unknown }).stderr;
    const detail = typeof stderr === "string" ? stderr.trim() : "";
    throw new InternalError(
      `${path.basename(file)} ${args[0] ?? ""} failed${detail === "" ? "" : `: ${detail}`}`,
      { cause: error },
    );
  }
}

async function isExecutable(file: string): Promise<boolean> {
  try {
    await access(file, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** Throws UnavailableError when not root or OpenSSH's server is missing. */
export async function checkPrerequisites(): Promise<void> {
  if (process.getuid?.() !== 0) {
    throw new UnavailableError(
      "the sandbox needs root (sshd chroots and a system user); run it as root",
    );
  }
  for (const file of [sshdPath, sshKeygenPath]) {
    if (!(await isExecutable(file))) {
      throw new UnavailableError(`${file} is missing; ${installHint}`);
    }
  }
}

async function userExists(username: string): Promise<boolean> {
  const passwd = await readFile("/etc/passwd", "utf8");
  return passwd.split("\n").some((line) => line.startsWith(`${username}:`));
}

/**
 * Creates the SFTP-only system user if missing and makes sure it is not
 * locked: sshd refuses an account whose password field starts with "!",
 * which is what useradd leaves; "*" allows key login only.
 */
export async function ensureUser(username: string): Promise<void> {
  if (!/^[a-z_][a-z0-9_-]{0,31}$/.test(username)) {
    throw new ConfigError(
      `option "username" must be a lower-case user name (got ${JSON.stringify(username)})`,
    );
  }
  if (!(await userExists(username))) {
    try {
      await run("/usr/sbin/useradd", [
        "--system",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        username,
      ]);
    } catch (error) {
      // Another sandbox may have created it at the same moment.
      if (!(await userExists(username))) {
        throw error;
      }
    }
  }
  const shadow = await readFile("/etc/shadow", "utf8");
  const entry = shadow
    .split("\n")
    .find((line) => line.startsWith(`${username}:`));
  if (entry?.split(":")[1] !== "*") {
    await run("/usr/sbin/usermod", ["--password", "*", username]);
  }
}

/** The numeric ids of a user, from /etc/passwd. */
export async function userIds(
  username: string,
): Promise<{ uid: number; gid: number }> {
  const passwd = await readFile("/etc/passwd", "utf8");
  const fields = passwd
    .split("\n")
    .find((line) => line.startsWith(`${username}:`))
    ?.split(":");
  if (fields === undefined) {
    throw new InternalError(`user ${username} is missing from /etc/passwd`);
  }
  return { uid: Number(fields[2]), gid: Number(fields[3]) };
}

/** sshd refuses to start without its privilege separation directory. */
export async function ensurePrivsepDir(): Promise<void> {
  await mkdir("/run/sshd", { recursive: true, mode: 0o755 });
}

/**
 * Checks that every existing component of `dir` is root-owned and not
 * group- or world-writable, the rule sshd applies to a ChrootDirectory,
 * and returns the components that do not exist yet (outermost first).
 */
export async function checkChrootPath(dir: string): Promise<string[]> {
  if (!path.isAbsolute(dir) || /[\s"'\\]/.test(dir) || hasControl(dir)) {
    throw new ConfigError(
      `option "stateDir" must be an absolute path without spaces, quotes or control characters (got ${JSON.stringify(dir)})`,
    );
  }
  const normal = path.resolve(dir);
  if (normal === "/tmp" || normal.startsWith("/tmp/")) {
    throw new ConfigError(
      `option "stateDir" ${normal} is under /tmp, which is world-writable; sshd refuses a ChrootDirectory there (use a dir under /var/lib)`,
    );
  }

  const missing: string[] = [];
  let current = normal;
  for (;;) {
    try {
      const info = await stat(current);
      if (!info.isDirectory()) {
        throw new ConfigError(
          `option "stateDir": ${current} is not a directory`,
        );
      }
      if (info.uid !== 0 || (info.mode & 0o022) !== 0) {
        throw new ConfigError(
          `option "stateDir": ${current} must be owned by root and not group- or world-writable (sshd ChrootDirectory rule); it has uid ${info.uid} and mode ${(info.mode & 0o7777).toString(8)}`,
        );
      }
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ENOENT") {
        throw error;
      }
      missing.unshift(current);
    }
    const parent = path.dirname(current);
    if (parent === current) {
      return missing;
    }
    current = parent;
  }
}

function hasControl(text: string): boolean {
  return [...text].some((char) => char.charCodeAt(0) < 0x20);
}

/** A client key pair made for talking to sandbox VMs. */
export interface ClientKeyPair {
  privateKeyPath: string;
  /** OpenSSH private key text. */
  privateKey: string;
  /** The public key line, without its line end. */
  publicKey: string;
}

/**
 * Makes an unencrypted ed25519 key pair at `privateKeyPath` (and `.pub`)
 * with ssh-keygen; the folder must exist and the files must not.
 */
export async function generateClientKey(
  privateKeyPath: string,
  comment = "byom-sandbox-client",
): Promise<ClientKeyPair> {
  await run(sshKeygenPath, [
    "-q",
    "-t",
    "ed25519",
    "-N",
    "",
    "-C",
    comment,
    "-f",
    privateKeyPath,
  ]);
  return {
    privateKeyPath,
    privateKey: await readFile(privateKeyPath, "utf8"),
    publicKey: (await readFile(`${privateKeyPath}.pub`, "utf8")).trim(),
  };
}
