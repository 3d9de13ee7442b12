import { execFile } from "node:child_process";
import {
  mkdir,
  mkdtemp,
  readFile,
  readdir,
  readlink,
  rename,
  rm,
  symlink,
  unlink,
  writeFile,
} from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";

const run = promisify(execFile);

let sequence = 0;

/**
 * Writes `files` into `dir` the way the kubelet updates a Secret volume
 * (its AtomicWriter): a new `..<timestamp>` dir with the files, a
 * `..data_tmp` symlink to it renamed over `..data`, top-level symlinks
 * `name -> ..data/name` for new names, old names removed, then the old
 * timestamped dir removed. The first call lays the volume out.
 */
export async function writeSecretVolume(
  dir: string,
  files: Record<string, string>,
): Promise<void> {
  await mkdir(dir, { recursive: true });
  const previous = await readlink(join(dir, "..data")).catch(() => undefined);
  const stamp = new Date().toISOString().replace(/[-:.TZ]/g, "_");
  sequence += 1;
  const target = `..${stamp}${sequence}.${process.pid}`;
  await mkdir(join(dir, target));
  for (const [name, content] of Object.entries(files)) {
    await writeFile(join(dir, target, name), content);
  }

  await symlink(target, join(dir, "..data_tmp"));
  await rename(join(dir, "..data_tmp"), join(dir, "..data"));

  const visible = (await readdir(dir)).filter((name) => !name.startsWith("."));
  for (const name of Object.keys(files)) {
    if (!visible.includes(name)) {
      await symlink(join("..data", name), join(dir, name));
    }
  }
  for (const name of visible) {
    if (!(name in files)) {
      await unlink(join(dir, name));
    }
  }
  if (previous !== undefined) {
    await rm(join(dir, previous), { recursive: true, force: true });
  }
}

/** A key pair made by ssh-keygen; `line` is the public key line. */
export interface TestKey {
  type: string;
  line: string;
  /** `SHA256:` fingerprint as `ssh-keygen -l` prints it. */
  fingerprint: string;
}

/** Makes `count` host-key-like key pairs of `type` and returns the public lines. */
export async function makePublicKeys(
  count: number,
  type: "ed25519" | "ecdsa" | "rsa" = "ed25519",
): Promise<TestKey[]> {
  const dir = await mkdtemp(join(tmpdir(), "byom-test-keys-"));
  try {
    return await Promise.all(
      Array.from({ length: count }, async (_, index) => {
        const file = join(dir, `key${index}`);
        const size = type === "rsa" ? ["-b", "2048"] : [];
        await run("ssh-keygen", [
          "-q",
          "-t",
          type,
          ...size,
          "-N",
          "",
          "-C",
          `test-${index}`,
          "-f",
          file,
        ]);
        const { stdout } = await run("ssh-keygen", ["-l", "-f", `${file}.pub`]);
        const line = (await readFile(`${file}.pub`, "utf8")).trim();
        return {
          type: line.split(" ")[0] ?? "",
          line,
          fingerprint: stdout.split(/\s+/)[1] ?? "",
        };
      }),
    );
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
