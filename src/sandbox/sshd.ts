import { spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { readdir, readFile, rm } from "node:fs/promises";
import { createConnection, createServer } from "node:net";
import path from "node:path";
import { setTimeout as delay } from "node:timers/promises";

import { InternalError, UnavailableError } from "../errors/index.js";
import { run, sshKeygenPath, sshdPath } from "./system.js";

/** Host key types the sandbox can generate. */
export type HostKeyType = "ed25519" | "ecdsa" | "rsa";

export interface HostKeyInfo {
  type: string;
  fingerprint: string;
}

export function hostKeyPath(dir: string, type: HostKeyType): string {
  return path.join(dir, `ssh_host_${type}_key`);
}

/** The `SHA256:` fingerprint of a public key line, as `ssh-keygen -l` prints. */
export function fingerprintOf(publicKeyLine: string): HostKeyInfo {
  const [type = "", blob = ""] = publicKeyLine.trim().split(/\s+/);
  const digest = createHash("sha256")
    .update(Buffer.from(blob, "base64"))
    .digest("base64")
    .replace(/=+$/, "");
  return { type, fingerprint: `SHA256:${digest}` };
}

/** Makes fresh host keys of every type, replacing the old ones. */
export async function generateHostKeys(
  dir: string,
  types: readonly HostKeyType[],
): Promise<HostKeyInfo[]> {
  return Promise.all(
    types.map(async (type) => {
      const file = hostKeyPath(dir, type);
      await rm(file, { force: true });
      await rm(`${file}.pub`, { force: true });
      const size = type === "rsa" ? ["-b", "3072"] : [];
      await run(sshKeygenPath, [
        "-q",
        "-t",
        type,
        ...size,
        "-N",
        "",
        "-C",
        "",
        "-f",
        file,
      ]);
      return fingerprintOf(await readFile(`${file}.pub`, "utf8"));
    }),
  );
}

export interface SshdConfigOptions {
  dir: string;
  ip: string;
  port: number;
  username: string;
  hostKeyTypes: readonly HostKeyType[];
  authorizedKeysFile: string;
  chrootDir: string;
}

/** The sshd_config of one VM: SFTP only, chrooted, key auth only. */
export function sshdConfig(options: SshdConfigOptions): string {
  const hostKeys = options.hostKeyTypes.map(
    (type) => `HostKey ${hostKeyPath(options.dir, type)}`,
  );
  return [
    `ListenAddress ${options.ip}:${options.port}`,
    ...hostKeys,
    "PidFile none",
    `AllowUsers ${options.username}`,
    "AuthenticationMethods publickey",
    "PubkeyAuthentication yes",
    "PasswordAuthentication no",
    "KbdInteractiveAuthentication no",
    "PermitRootLogin no",
    "UsePAM no",
    "StrictModes yes",
    `AuthorizedKeysFile ${options.authorizedKeysFile}`,
    `ChrootDirectory ${options.chrootDir}`,
    "Subsystem sftp internal-sftp",
    "ForceCommand internal-sftp",
    "AllowTcpForwarding no",
    "AllowAgentForwarding no",
    "AllowStreamLocalForwarding no",
    "X11Forwarding no",
    "PermitTunnel no",
    "PermitTTY no",
    "GatewayPorts no",
    "PrintMotd no",
    // Benchmarks open many connections at once.
    "MaxStartups 200:30:400",
    "LogLevel INFO",
    "",
  ].join("\n");
}

/** Throws UnavailableError naming ip and port when something listens there. */
export async function assertPortFree(ip: string, port: number): Promise<void> {
  const server = createServer();
  try {
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen({ host: ip, port, exclusive: true }, resolve);
    });
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new UnavailableError(
      code === "EADDRINUSE"
        ? `address ${ip} port ${port} is already in use; stop what listens there or pick another firstIp or port`
        : `cannot bind ${ip} port ${port}: ${code ?? String(error)}`,
      { cause: error },
    );
  }
  await new Promise<void>((resolve) => server.close(() => resolve()));
}

/** True once something at ip:port accepts TCP and sends an SSH banner. */
async function answersSsh(ip: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = createConnection({ host: ip, port });
    const finish = (value: boolean): void => {
      socket.destroy();
      resolve(value);
    };
    socket.setTimeout(1000, () => finish(false));
    socket.once("error", () => finish(false));
    socket.once("data", (chunk) => finish(chunk.toString().startsWith("SSH-")));
  });
}

export interface StartedSshd {
  child: ChildProcess;
  pid: number;
}

/**
 * Spawns `sshd -D -e -f config` and resolves once it answers on ip:port.
 * Its stderr lines go to `onLine`. Rejects naming ip and port when it
 * exits before that or does not answer within `timeoutMs`.
 */
export async function startSshd(
  configFile: string,
  ip: string,
  port: number,
  onLine: (line: string) => void,
  timeoutMs = 10_000,
): Promise<StartedSshd> {
  const child = spawn(sshdPath, ["-D", "-e", "-f", configFile], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  const lastLines: string[] = [];
  let buffered = "";
  child.stderr?.setEncoding("utf8");
  child.stderr?.on("data", (chunk: string) => {
    buffered += chunk;
    const lines = buffered.split("\n");
    buffered = lines.pop() ?? "";
    for (const line of lines) {
      lastLines.push(line);
      if (lastLines.length > 5) {
        lastLines.shift();
      }
      onLine(line);
    }
  });
  let exit: string | undefined;
  child.once("exit", (code, signal) => {
    exit = signal === null ? `code ${code}` : `signal ${signal}`;
  });
  child.once("error", (error) => {
    exit = error.message;
  });

  const until = Date.now() + timeoutMs;
  let answered = false;
  while (!answered && exit === undefined && Date.now() < until) {
    answered = await answersSsh(ip, port);
    if (!answered) {
      await delay(20);
    }
  }
  if (exit !== undefined || child.pid === undefined) {
    const output = lastLines.join("; ");
    const taken = output.includes("Address already in use");
    throw new UnavailableError(
      taken
        ? `address ${ip} port ${port} is already in use (sshd could not bind it)`
        : `sshd for ${ip} port ${port} exited at start (${exit ?? "no pid"}): ${output}`,
    );
  }
  if (!answered) {
    await killTree(child.pid);
    throw new UnavailableError(
      `sshd for ${ip} port ${port} did not answer within ${timeoutMs} ms`,
    );
  }
  return { child, pid: child.pid };
}

/**
 * Direct children of a process, from /proc/<pid>/task/<tid>/children
 * (one small read per thread instead of a scan of every process).
 */
async function childPids(pid: number): Promise<number[]> {
  const tasks = await readdir(`/proc/${pid}/task`).catch(() => []);
  const lists = await Promise.all(
    tasks.map((task) =>
      readFile(`/proc/${pid}/task/${task}/children`, "utf8").catch(() => ""),
    ),
  );
  return lists
    .join(" ")
    .split(/\s+/)
    .filter((entry) => entry !== "")
    .map(Number);
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * Kills a process and all its descendants with SIGKILL and waits until
 * they are gone. sshd puts each connection in its own session, so killing
 * the listener's process group would leave connections open.
 */
export async function killTree(pid: number, timeoutMs = 5000): Promise<void> {
  // Stop each process before reading its children, so none forks one we
  // would miss (sshd forks per connection).
  if (!Number.isInteger(pid) || pid <= 1) {
    throw new InternalError(`refusing to kill process tree of pid ${pid}`);
  }
  const tree = [pid];
  for (const member of tree) {
    signal(member, "SIGSTOP");
    tree.push(...(await childPids(member)));
  }
  for (const member of tree) {
    signal(member, "SIGKILL");
  }

  const until = Date.now() + timeoutMs;
  while (tree.some((member) => isRunning(member))) {
    if (Date.now() > until) {
      throw new InternalError(
        `processes ${tree.join(", ")} did not end within ${timeoutMs} ms`,
      );
    }
    await delay(10);
  }
}

function signal(pid: number, name: NodeJS.Signals): void {
  try {
    process.kill(pid, name);
  } catch {
    // Already gone.
  }
}

/** Alive and not a zombie: a zombie child of ours is already dead. */
function isRunning(pid: number): boolean {
  try {
    // Synchronous on purpose: a short poll over a few processes.
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
}
