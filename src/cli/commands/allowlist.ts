import { mkdir, writeFile } from "node:fs/promises";
import path from "node:path";

import cliProgress from "cli-progress";
import { InvalidArgumentError, type Command } from "commander";
import { stringify } from "yaml";

import { loadConfig } from "../../config/index.js";
import { InvalidRequestError } from "../../errors/index.js";
import {
  readAllowlistDir,
  scanHostKeys,
  type AllowlistReadResult,
  type HostKeyScan,
} from "../../hostkeys/index.js";
import { canonicalIp, showValue } from "../../protocol/index.js";
import { CliExit, ExitCode } from "../exit.js";

/** Name and namespace of the Secret `scan --secret` prints. */
export const allowlistSecret = {
  name: "ssh-host-key-allowlist",
  namespace: "confidential-containers-system",
} as const;

/** Above this many VMs, scan shows a progress bar (on a terminal). */
const progressThreshold = 5;

interface ScanOptions {
  pool?: boolean;
  port?: number;
  timeoutMs?: number;
  concurrency: number;
  out?: string;
  secret?: boolean;
  json?: boolean;
  config?: string;
}

/** `byom allowlist scan|check`: collect VM host keys, validate a directory. */
export function registerAllowlistCommands(program: Command): void {
  const allowlist = program
    .command("allowlist")
    .description(
      "host-key allowlist tools: collect VM host keys, check a directory",
    );

  allowlist
    .command("scan")
    .description(
      "connect to each VM, collect every host key it offers, and write *.pub files or a Secret manifest",
    )
    .argument("[ips...]", "VM addresses")
    .option("--pool", "scan every IP of VM_POOL_IPS")
    .option("--port <port>", "SSH port (default: config sshPort)", positive)
    .option(
      "--timeout-ms <ms>",
      "per handshake (default: SSH_TIMEOUT)",
      positive,
    )
    .option("--concurrency <n>", "VMs scanned at once", positive, 16)
    .option("--out <dir>", "write <ip>.pub files into this directory")
    .option(
      "--secret",
      `print a Secret manifest (${allowlistSecret.name} in ${allowlistSecret.namespace})`,
    )
    .option("--json", "print the keys as JSON")
    .option("-c, --config <file>", "config file (JSON or YAML)")
    .action(async (ips: string[], options: ScanOptions) => {
      await runScan(ips, options);
    });

  allowlist
    .command("check")
    .description(
      "validate an allowlist directory: what is trusted, what is skipped and why (exit 2 on any problem)",
    )
    .argument("<dir>", "directory of *.pub files")
    .option("--json", "print the result as JSON")
    .action(async (dir: string, options: { json?: boolean }) => {
      await runCheck(dir, options);
    });
}

function positive(text: string): number {
  const value = Number(text);
  if (!Number.isInteger(value) || value <= 0) {
    throw new InvalidArgumentError(`must be a positive integer`);
  }
  return value;
}

async function runScan(ips: string[], options: ScanOptions): Promise<void> {
  const config = loadConfig(options.config ? { file: options.config } : {});
  const targets = scanTargets(ips, options, config.pool);
  const port = options.port ?? config.sshPort;
  const timeoutMs = options.timeoutMs ?? config.sshTimeoutSeconds * 1000;

  const scans = await scanAll(targets, {
    port,
    timeoutMs,
    concurrency: options.concurrency,
  });

  const failed = scans.filter((scan) => scan.error !== undefined);
  for (const scan of failed) {
    console.error(`byom: ${scan.ip}: ${scan.error ?? ""}`);
  }
  if (options.out !== undefined) {
    await writeKeyFiles(options.out, scans);
  }
  if (options.json) {
    console.log(JSON.stringify({ vms: scans }, null, 2));
  } else if (options.secret) {
    console.log(secretManifest(scans));
  } else {
    printScanTable(scans, options.out);
  }
  if (failed.length > 0) {
    throw new CliExit(ExitCode.VmFailure);
  }
}

function scanTargets(
  ips: string[],
  options: ScanOptions,
  pool: readonly string[],
): string[] {
  if (options.pool && ips.length > 0) {
    throw new InvalidRequestError("give IPs or --pool, not both");
  }
  if (options.pool) {
    if (pool.length === 0) {
      throw new InvalidRequestError(
        "--pool needs VM_POOL_IPS (or vmPoolIps in the config file)",
      );
    }
    return [...pool];
  }
  if (ips.length === 0) {
    throw new InvalidRequestError("give at least one VM IP, or --pool");
  }
  return ips.map((text) => {
    const ip = canonicalIp(text);
    if (ip === undefined) {
      throw new InvalidRequestError(`${showValue(text)} is not an IP address`);
    }
    return ip;
  });
}

async function scanAll(
  ips: string[],
  settings: { port: number; timeoutMs: number; concurrency: number },
): Promise<HostKeyScan[]> {
  const bar =
    process.stderr.isTTY && ips.length > progressThreshold
      ? new cliProgress.SingleBar(
          {
            stream: process.stderr,
            format: "scanning [{bar}] {value}/{total} VMs",
            hideCursor: true,
            clearOnComplete: true,
          },
          cliProgress.Presets.shades_classic,
        )
      : undefined;
  bar?.start(ips.length, 0);

  const results: HostKeyScan[] = new Array<HostKeyScan>(ips.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    for (let index = next++; index < ips.length; index = next++) {
      const ip = ips[index] ?? "";
      results[index] = await scanHostKeys(ip, {
        port: settings.port,
        timeoutMs: settings.timeoutMs,
      });
      bar?.increment();
    }
  };
  try {
    await Promise.all(
      Array.from(
        { length: Math.min(settings.concurrency, ips.length) },
        worker,
      ),
    );
  } finally {
    bar?.stop();
  }
  return results;
}

/** `10.0.0.5.pub`; ':' of IPv6 becomes '_' (Secret keys allow no ':'). */
function keyFileName(ip: string): string {
  return `${ip.replaceAll(":", "_")}.pub`;
}

function keyFileContent(scan: HostKeyScan): string {
  return scan.keys.map((key) => `${key.line} ${scan.ip}\n`).join("");
}

async function writeKeyFiles(dir: string, scans: HostKeyScan[]): Promise<void> {
  await mkdir(dir, { recursive: true });
  for (const scan of scans) {
    if (scan.keys.length > 0) {
      await writeFile(
        path.join(dir, keyFileName(scan.ip)),
        keyFileContent(scan),
      );
    }
  }
}

function secretManifest(scans: HostKeyScan[]): string {
  const stringData = Object.fromEntries(
    scans
      .filter((scan) => scan.keys.length > 0)
      .map((scan) => [keyFileName(scan.ip), keyFileContent(scan)]),
  );
  return stringify({
    apiVersion: "v1",
    kind: "Secret",
    metadata: {
      name: allowlistSecret.name,
      namespace: allowlistSecret.namespace,
    },
    type: "Opaque",
    stringData,
  }).trimEnd();
}

function printScanTable(scans: HostKeyScan[], out: string | undefined): void {
  const rows = scans.flatMap((scan) =>
    scan.error !== undefined
      ? [[scan.ip, "-", `error: ${scan.error}`]]
      : scan.keys.map((key) => [scan.ip, key.type, key.fingerprint]),
  );
  printTable(["IP", "TYPE", "FINGERPRINT"], rows);
  const keys = scans.reduce((sum, scan) => sum + scan.keys.length, 0);
  const written = scans.filter((scan) => scan.keys.length > 0).length;
  console.log(
    out === undefined
      ? `${keys} keys from ${scans.length} VMs`
      : `${keys} keys from ${scans.length} VMs; wrote ${written} files to ${out}`,
  );
}

async function runCheck(
  dir: string,
  options: { json?: boolean },
): Promise<void> {
  const read = await readAllowlistDir(dir);
  const failing =
    read.keys.length === 0 ||
    read.problems.length > 0 ||
    read.skipped.length > 0 ||
    read.warnings.length > 0;

  if (options.json) {
    console.log(JSON.stringify(checkReport(read, failing), null, 2));
  } else {
    printCheck(read);
  }
  if (failing) {
    throw new CliExit(ExitCode.Invalid);
  }
}

function checkReport(read: AllowlistReadResult, failing: boolean): object {
  return {
    ok: !failing,
    dir: read.dir,
    trusted: read.keys.map((key) => ({
      file: key.file,
      line: key.line,
      type: key.type,
      fingerprint: key.fingerprint,
      ...(key.comment === undefined ? {} : { comment: key.comment }),
    })),
    skipped: read.skipped,
    problems: read.problems,
    warnings: read.warnings,
  };
}

function printCheck(read: AllowlistReadResult): void {
  console.log(`${read.dir}: ${read.keys.length} trusted keys`);
  printTable(
    ["FILE:LINE", "TYPE", "FINGERPRINT", "COMMENT"],
    read.keys.map((key) => [
      `${key.file}:${key.line}`,
      key.type,
      key.fingerprint,
      key.comment ?? "",
    ]),
  );
  if (read.skipped.length > 0) {
    console.log(`\nskipped ${read.skipped.length}:`);
    for (const line of read.skipped) {
      console.log(`  ${line.file}:${line.line}: ${line.reason}`);
    }
  }
  for (const problem of read.problems) {
    console.log(`\nproblem: ${problem}`);
  }
  for (const warning of read.warnings) {
    console.log(`\nwarning: ${warning}`);
  }
}

function printTable(header: string[], rows: string[][]): void {
  const widths = header.map((title, column) =>
    Math.max(title.length, ...rows.map((row) => (row[column] ?? "").length)),
  );
  for (const row of [header, ...rows]) {
    console.log(
      row
        .map((cell, column) => cell.padEnd(widths[column] ?? 0))
        .join("  ")
        .trimEnd(),
    );
  }
}
