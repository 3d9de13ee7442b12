/**
 * The OpenSSH baseline: `sftp -b` uploads the file under a temp name with
 * `put -f` (fsync, as our delivery does) and renames it onto
 * cidata/user-data (OpenSSH's sftp uses posix-rename@openssh.com when the
 * server offers it), with the same key and the same VM.
 */
import { execFile, spawn } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { promisify } from "node:util";

import { onCleanup } from "./cleanup.js";

const run = promisify(execFile);

function sftpArgs(
  ip: string,
  port: number,
  keyPath: string,
  batch: string,
  logLevel = "ERROR",
): string[] {
  return [
    "-b",
    batch,
    "-i",
    keyPath,
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    `LogLevel=${logLevel}`,
    "-P",
    String(port),
    `peerpod@${ip}`,
  ];
}

/** Batch files for uploads; made before any timing starts. */
export class SftpBatches {
  #dir: Promise<string> | undefined;
  #count = 0;

  #folder(): Promise<string> {
    this.#dir ??= mkdtemp(path.join(tmpdir(), "byom-bench-sftp-")).then(
      (dir) => {
        onCleanup(`sftp batch dir ${dir}`, () =>
          rm(dir, { recursive: true, force: true }),
        );
        return dir;
      },
    );
    return this.#dir;
  }

  /** A batch uploading `file` as cidata/.tmp-<n> then renaming it. */
  async upload(file: string): Promise<string> {
    this.#count += 1;
    const number = this.#count;
    const temp = `cidata/.tmp-bench-${number}`;
    const batch = path.join(await this.#folder(), `batch-${number}`);
    await writeFile(
      batch,
      `put -f ${file} ${temp}\nrename ${temp} cidata/user-data\n`,
    );
    return batch;
  }
}

/** Runs one batch; resolves with its wall time in ms, rejects on failure. */
export function runSftp(
  ip: string,
  port: number,
  keyPath: string,
  batch: string,
): Promise<number> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const child = spawn("sftp", sftpArgs(ip, port, keyPath, batch), {
      stdio: ["ignore", "ignore", "pipe"],
    });
    let stderr = "";
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    child.once("error", reject);
    child.once("exit", (code) => {
      const elapsed = performance.now() - started;
      if (code === 0) {
        resolve(elapsed);
      } else {
        void readFile(batch, "utf8")
          .catch(() => "(unreadable)")
          .then((content) =>
            reject(
              new Error(
                `sftp to ${ip} exited ${code}: ${stderr.trim()} (batch ${batch}: ${JSON.stringify(content)})`,
              ),
            ),
          );
      }
    });
  });
}

/**
 * Whether this OpenSSH's sftp sent posix-rename for the batch's rename
 * (from its -vvv debug output).
 */
export async function renameMethod(
  ip: string,
  port: number,
  keyPath: string,
  batch: string,
): Promise<string> {
  const { stderr } = await run(
    "sftp",
    ["-vvv", ...sftpArgs(ip, port, keyPath, batch, "DEBUG3")],
    { encoding: "utf8" },
  ).catch((error: { stderr?: string }) => ({ stderr: error.stderr ?? "" }));
  const line = stderr
    .split("\n")
    .find((text) => /rename/i.test(text) && /posix|SSH2_FXP/i.test(text));
  return (
    line?.replace(/^debug\d:\s*/, "").trim() ?? "not visible in -vvv output"
  );
}
