import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { once } from "node:events";
import { createServer, type AddressInfo } from "node:net";
import { randomBytes } from "node:crypto";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `byom <args>` with only the given variables (plus PATH). */
function byom(args: string[], env: Record<string, string>): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(
      process.execPath,
      ["--import", "tsx", "src/cli/main.ts", ...args],
      { env: { PATH: process.env.PATH ?? "", ...env } },
    );
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

describe("byom config check", () => {
  it("prints the effective configuration with the expanded pool as JSON", async () => {
    const run = await byom(["config", "check", "--json"], {
      VM_POOL_IPS: "10.0.2.254-10.0.3.1, fd00::1",
      NODE_NAME: "e2e-node",
      NATS_URL: "nats://user:pa55word@127.0.0.1:4222",
      NATS_TOKEN: "",
    });
    assert.equal(run.code, 0, run.stderr);
    const report = JSON.parse(run.stdout) as {
      poolSize: number;
      config: Record<string, unknown>;
    };
    assert.equal(report.poolSize, 5);
    assert.deepEqual(report.config.pool, [
      "10.0.2.254",
      "10.0.2.255",
      "10.0.3.0",
      "10.0.3.1",
      "fd00::1",
    ]);
    assert.equal(report.config.node, "e2e-node");
    assert.ok(!run.stdout.includes("pa55word"));
  });

  it("prints a table that shortens a long pool", async () => {
    const run = await byom(["config", "check"], {
      VM_POOL_IPS: "10.0.0.1-10.0.0.30",
      NODE_NAME: "e2e-node",
    });
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stdout, /pool: 30 IPs/);
    assert.match(run.stdout, /\.\.\. 20 more \.\.\./);
    assert.match(run.stdout, /node: e2e-node/);
  });

  it("exits 2 naming the variable of an invalid value", async () => {
    const run = await byom(["config", "check", "--json"], {
      SSH_TIMEOUT: "abc",
    });
    assert.equal(run.code, 2);
    assert.match(
      run.stderr,
      /^byom: INVALID_REQUEST: SSH_TIMEOUT="abc" \(sshTimeoutSeconds\): must be a positive integer number of seconds/,
    );
    assert.equal(run.stdout, "");
  });

  it(
    "exits 7 when NATS accepts the connection but never speaks, not hanging on the late socket",
    { timeout: 30_000 },
    async () => {
      const silent = createServer((socket) => socket.on("error", () => {}));
      silent.listen(0, "127.0.0.1");
      await once(silent, "listening");
      const { port } = silent.address() as AddressInfo;
      try {
        const run = await byom(["pool", "list", "--json"], {
          NATS_URL: `nats://127.0.0.1:${port}`,
        });
        assert.equal(run.code, 7, run.stderr);
        assert.match(run.stdout, /"code":"UNAVAILABLE".*timeout/);
      } finally {
        silent.close();
      }
    },
  );

  it("exits 2 for an empty pool with --require-pool", async () => {
    const run = await byom(["config", "check", "--require-pool"], {});
    assert.equal(run.code, 2);
    assert.match(run.stderr, /VM_POOL_IPS is empty/);
  });

  describe("--agent", () => {
    let dir: string;
    let agentEnv: Record<string, string>;

    before(async () => {
      dir = await mkdtemp(join(tmpdir(), "byom-config-agent-"));
      const key = join(dir, "id_ed25519");
      execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", key]);
      agentEnv = { VM_POOL_IPS: "127.0.0.2", SSH_PRIV_KEY_PATH: key };
    });

    after(async () => {
      await rm(dir, { recursive: true, force: true });
    });

    it("passes with a readable key and no allowlist, and says what it checked", async () => {
      const run = await byom(["config", "check", "--agent"], agentEnv);
      assert.equal(run.code, 0, run.stderr);
      assert.match(
        run.stdout,
        /agent checks passed:\n {2}ssh key: \S+id_ed25519 \(ssh-ed25519 SHA256:[A-Za-z0-9+/]{43}\)\n {2}sealed user-data: off\n {2}host keys: trust on first use/,
      );
      const json = await byom(
        ["config", "check", "--agent", "--json"],
        agentEnv,
      );
      const report = JSON.parse(json.stdout) as {
        agent: { sshKey: { type: string } };
      };
      assert.equal(report.agent.sshKey.type, "ssh-ed25519");
    });

    it("exits 2 naming SSH_HOST_KEY_ALLOWLIST_DIR when it holds no usable key", async () => {
      const empty = join(dir, "empty-allowlist");
      await mkdir(empty);
      for (const allowlist of [join(dir, "missing"), empty]) {
        const run = await byom(["config", "check", "--agent"], {
          ...agentEnv,
          SSH_HOST_KEY_ALLOWLIST_DIR: allowlist,
        });
        assert.equal(run.code, 2, allowlist);
        assert.match(
          run.stderr,
          new RegExp(
            `SSH_HOST_KEY_ALLOWLIST_DIR \\(sshHostKeyAllowlistDir\\) "${allowlist}": .*the agent would refuse every VM`,
          ),
        );
      }
    });

    it("warns about skipped allowlist lines and still passes", async () => {
      const allowlist = join(dir, "allowlist");
      await mkdir(allowlist);
      const hostKey = (
        await readFile(`${join(dir, "id_ed25519")}.pub`, "utf8")
      ).trim();
      await writeFile(
        join(allowlist, "vms.pub"),
        `${hostKey}\n127.0.0.9 ${hostKey}\n`,
      );
      const run = await byom(["config", "check", "--agent", "--json"], {
        ...agentEnv,
        SSH_HOST_KEY_ALLOWLIST_DIR: allowlist,
      });
      assert.equal(run.code, 0, run.stderr);
      const report = JSON.parse(run.stdout) as { agentWarnings: string[] };
      assert.equal(report.agentWarnings.length, 1);
      assert.match(report.agentWarnings[0]!, /1 line\(s\) skipped/);
    });

    it("exits 2 naming SSH_PRIV_KEY_PATH for a damaged key, without its bytes", async () => {
      const key = join(dir, "damaged_ed25519");
      // Printable where ssh2 would quote the magic, random after it.
      const payload = Buffer.concat([
        Buffer.from("DAMAGEDKEYBYTES"),
        randomBytes(400),
      ]);
      const body = payload.toString("base64").match(/.{1,70}/g) ?? [];
      await writeFile(
        key,
        `-----BEGIN OPENSSH PRIVATE KEY-----\n${body.join("\n")}\n-----END OPENSSH PRIVATE KEY-----\n`,
        { mode: 0o600 },
      );
      const run = await byom(["config", "check", "--agent"], {
        ...agentEnv,
        SSH_PRIV_KEY_PATH: key,
      });
      assert.equal(run.code, 2, run.stderr);
      assert.match(
        run.stderr,
        new RegExp(
          `^byom: INVALID_REQUEST: SSH_PRIV_KEY_PATH \\(sshPrivKeyPath\\): ssh private key ${key} is not a supported private key \\(unsupported OpenSSH key format\\)`,
        ),
      );
      assert.match(run.stderr, /^[\x20-\x7e\n]*$/, "non-ASCII in the message");
      assert.ok(!run.stderr.includes("DAMAGED"), run.stderr);
      assert.ok(
        !run.stderr.includes(payload.subarray(15, 19).toString("latin1")),
      );
      assert.ok(!run.stderr.includes(body[0]!.slice(0, 12)));
    });

    it("exits 2 naming a sealing seed file that cannot be read", async () => {
      const seedFile = join(dir, "no-such-seed");
      const run = await byom(["config", "check", "--agent"], {
        ...agentEnv,
        BYOM_SEALING_SEED_FILE: seedFile,
      });
      assert.equal(run.code, 2);
      assert.match(
        run.stderr,
        new RegExp(`sealing seed file "${seedFile}" cannot be read: ENOENT`),
      );
    });
  });
});
