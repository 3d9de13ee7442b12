import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import {
  describeConfigSchema,
  loadConfig,
  redactConfig,
  requirePool,
} from "../../../src/config/index.js";
import { ConfigError } from "../../../src/errors/index.js";
import { DefaultNames } from "../../../src/protocol/index.js";

/** Node files are never read from the machine in these tests. */
const noFiles = (): string => {
  throw new Error("ENOENT");
};

function load(
  env: NodeJS.ProcessEnv,
  more: { file?: string; overrides?: Record<string, unknown> } = {},
) {
  return loadConfig({ env, readFile: noFiles, ...more });
}

function assertConfigError(run: () => unknown, ...patterns: RegExp[]): void {
  assert.throws(run, (error: unknown) => {
    assert.ok(error instanceof ConfigError, String(error));
    for (const pattern of patterns) {
      assert.match(error.message, pattern);
    }
    return true;
  });
}

describe("loadConfig", () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "byom-config-"));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  async function writeConfig(name: string, text: string): Promise<string> {
    const file = join(dir, name);
    await writeFile(file, text);
    return file;
  }

  it("returns the defaults for an empty environment", () => {
    const config = load({ NODE_NAME: "node-a" });
    assert.equal(config.vmPoolIps, "");
    assert.deepEqual(config.pool, []);
    assert.equal(config.maxRangeIps, 100);
    assert.equal(config.sshUsername, "peerpod");
    assert.equal(config.sshPubKeyPath, "/root/.ssh/id_rsa.pub");
    assert.equal(config.sshPrivKeyPath, "/root/.ssh/id_rsa");
    assert.equal(config.sshTimeoutSeconds, 30);
    assert.equal(config.sshPort, 22);
    assert.equal(config.natsUrl, "nats://127.0.0.1:4222");
    assert.deepEqual(config.natsServers, ["nats://127.0.0.1:4222"]);
    assert.deepEqual(config.names, DefaultNames);
    assert.equal(config.concurrency, 4);
    assert.equal(config.ackWaitMs, 30_000);
    assert.equal(config.maxDeliver, 5);
    assert.equal(config.requestMaxAgeMs, 600_000);
    assert.equal(config.releaseTimeoutMs, 300_000);
    assert.equal(config.quarantineProbeIntervalMs, 30_000);
    assert.equal(config.replicas, 1);
    assert.equal(config.requestTimeoutMs, 120_000);
    assert.equal(config.maxUserDataBytes, 1_048_576);
    assert.equal(config.logLevel, "info");
    assert.equal(config.logFormat, "json");
    assert.equal(config.httpPort, 9464);
    assert.equal(config.node, "node-a");
  });

  it("reads the upstream variable names and converts numbers", () => {
    const config = load({
      VM_POOL_IPS: "10.0.0.1-10.0.0.3",
      SSH_TIMEOUT: "45",
      SSH_USERNAME: "vmuser",
      BYOM_CONCURRENCY: "8",
      BYOM_STREAM: "TEST_REQUESTS",
      BYOM_SUBJECT_PREFIX: "test.byom",
      BYOM_HTTP_PORT: "0",
    });
    assert.deepEqual(config.pool, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    assert.equal(config.sshTimeoutSeconds, 45);
    assert.equal(config.sshUsername, "vmuser");
    assert.equal(config.concurrency, 8);
    assert.equal(config.names.stream, "TEST_REQUESTS");
    assert.equal(config.names.subjectPrefix, "test.byom");
    assert.equal(config.httpPort, 0);
  });

  it("returns a deep-frozen object", () => {
    const config = load({ VM_POOL_IPS: "10.0.0.1" });
    assert.ok(Object.isFrozen(config));
    assert.ok(Object.isFrozen(config.pool));
    assert.ok(Object.isFrozen(config.names));
    assert.ok(Object.isFrozen(config.poolWarnings));
  });

  it("applies MAX_RANGE_IPS to a range given by the environment", () => {
    const warned: string[] = [];
    const config = loadConfig({
      env: { VM_POOL_IPS: "10.0.0.1-10.0.0.9", MAX_RANGE_IPS: "4" },
      readFile: noFiles,
      warn: (message) => warned.push(message),
    });
    assert.deepEqual(config.pool, [
      "10.0.0.1",
      "10.0.0.2",
      "10.0.0.3",
      "10.0.0.4",
    ]);
    assert.equal(config.poolWarnings.length, 1);
    assert.deepEqual(warned, config.poolWarnings);
  });

  it("gives the same pool for a range from the environment and from a file", async () => {
    const pool = "10.0.2.254-10.0.3.1, fd00::1";
    const file = await writeConfig(
      "pool.yaml",
      `vmPoolIps: "${pool}"\nmaxRangeIps: 3\n`,
    );
    const fromFile = load({}, { file });
    const fromEnv = load({ VM_POOL_IPS: pool, MAX_RANGE_IPS: "3" });
    assert.deepEqual(fromFile.pool, fromEnv.pool);
    assert.deepEqual(fromFile.pool, [
      "10.0.2.254",
      "10.0.2.255",
      "10.0.3.0",
      "fd00::1",
    ]);
    assert.deepEqual(fromFile.poolWarnings, fromEnv.poolWarnings);
  });

  it("accepts the pool as a list in a file", async () => {
    const file = await writeConfig(
      "list.yaml",
      "vmPoolIps:\n  - 10.0.0.1-10.0.0.2\n  - 10.0.0.7\n",
    );
    assert.deepEqual(load({}, { file }).pool, [
      "10.0.0.1",
      "10.0.0.2",
      "10.0.0.7",
    ]);
  });

  it("lets the environment win over the file", async () => {
    const file = await writeConfig(
      "precedence.yaml",
      "sshTimeoutSeconds: 10\nsshUsername: fromfile\nconcurrency: 2\n",
    );
    const config = load({ SSH_TIMEOUT: "20", BYOM_CONCURRENCY: "" }, { file });
    assert.equal(config.sshTimeoutSeconds, 20);
    assert.equal(config.sshUsername, "fromfile");
    // An empty variable counts as unset, as upstream: the file's value stays.
    assert.equal(config.concurrency, 2);
  });

  it("reads a JSON file, and the file named by BYOM_CONFIG", async () => {
    const file = await writeConfig(
      "byom.json",
      JSON.stringify({ sshPort: 2222, natsUrl: "tls://nats.example:4443" }),
    );
    const config = load({ BYOM_CONFIG: file });
    assert.equal(config.sshPort, 2222);
    assert.deepEqual(config.natsServers, ["tls://nats.example:4443"]);
  });

  it("lets overrides win over environment and file", () => {
    const config = load(
      { BYOM_CONCURRENCY: "8" },
      {
        overrides: {
          concurrency: 16,
          releaseTimeoutMs: "2000",
          sshPort: undefined,
        },
      },
    );
    assert.equal(config.sshPort, 22);
    assert.equal(config.concurrency, 16);
    assert.equal(config.releaseTimeoutMs, 2000);
  });

  it("loads the example config file", () => {
    const config = load({}, { file: "config/byom.example.yaml" });
    assert.equal(config.sshUsername, "peerpod");
  });

  it("refuses an unknown key in the file, hinting the key for an env name", async () => {
    const file = await writeConfig("unknown.yaml", "sshTimout: 5\n");
    assertConfigError(
      () => load({}, { file }),
      /key "sshTimout"/,
      /not a configuration key/,
    );
    const byEnv = await writeConfig("envname.yaml", "VM_POOL_IPS: 10.0.0.1\n");
    assertConfigError(
      () => load({}, { file: byEnv }),
      /did you mean vmPoolIps\?/,
    );
  });

  it("refuses an unknown override key", () => {
    assertConfigError(() => load({}, { overrides: { bogus: 1 } }), /"bogus"/);
  });

  it("refuses a file that is missing, not YAML, or not a mapping", async () => {
    assertConfigError(
      () => load({}, { file: join(dir, "absent.yaml") }),
      /absent\.yaml/,
      /ENOENT/,
    );
    const broken = await writeConfig("broken.yaml", "a: [1\n");
    assertConfigError(() => load({}, { file: broken }), /broken\.yaml/);
    const list = await writeConfig("list-top.yaml", "- 1\n- 2\n");
    assertConfigError(() => load({}, { file: list }), /must hold a mapping/);
  });

  it("refuses a mapping as a value in the file", async () => {
    const file = await writeConfig("nested.yaml", "natsUrl:\n  a:\n    b: 1\n");
    assertConfigError(
      () => load({}, { file }),
      /^NATS_URL=\{"a":\{"b":1\}\} \(natsUrl, from /,
    );
  });

  it("names variable, value and rule for a bad SSH_TIMEOUT", () => {
    assertConfigError(
      () => load({ SSH_TIMEOUT: "abc" }),
      /^SSH_TIMEOUT="abc" \(sshTimeoutSeconds\): must be a positive integer number of seconds/,
    );
    assertConfigError(() => load({ SSH_TIMEOUT: "0" }), /SSH_TIMEOUT="0"/);
    assertConfigError(() => load({ SSH_TIMEOUT: "1.5" }), /SSH_TIMEOUT="1\.5"/);
  });

  it("names the file as the source of a bad value", async () => {
    const file = await writeConfig("bad.yaml", 'sshTimeoutSeconds: "soon"\n');
    assertConfigError(
      () => load({}, { file }),
      /^SSH_TIMEOUT="soon" \(sshTimeoutSeconds, from .*bad\.yaml\): must be a positive integer/,
    );
  });

  it("names variable, value and rule for a bad NATS_URL, hiding its password", () => {
    assertConfigError(
      () => load({ NATS_URL: "nats://a:1, http://user:secret@host:80" }),
      /^NATS_URL="nats:\/\/a:1, http:\/\/user:\[redacted\]@host:80" \(natsUrl\)/,
      /entry "http:\/\/user:\[redacted\]@host:80" has scheme http/,
      /must be a comma-separated list of nats:\/\/, tls:\/\/, ws:\/\/ or wss:\/\/ URLs/,
    );
    assert.throws(
      () => load({ NATS_URL: "http://user:secret@host" }),
      (error: Error) => !error.message.includes("secret"),
    );
    assertConfigError(() => load({ NATS_URL: "nats://:4222" }), /NATS_URL=/);
    assertConfigError(
      () => load({ NATS_URL: "nats://host:99999" }),
      /is not a URL/,
    );
  });

  it("accepts a list of NATS URLs of every scheme", () => {
    const config = load({
      NATS_URL: "nats://a:4222, tls://b:4443,ws://c:80/nats,wss://[::1]:443",
    });
    assert.deepEqual(config.natsServers, [
      "nats://a:4222",
      "tls://b:4443",
      "ws://c:80/nats",
      "wss://[::1]:443",
    ]);
  });

  it("names variable, value and rule for a bad BYOM_CONCURRENCY", () => {
    assertConfigError(
      () => load({ BYOM_CONCURRENCY: "65" }),
      /^BYOM_CONCURRENCY="65" \(concurrency\): must be an integer from 1 to 64$/,
    );
    assertConfigError(
      () => load({ BYOM_CONCURRENCY: "four" }),
      /BYOM_CONCURRENCY="four"/,
    );
  });

  it("reports every bad value at once", () => {
    assertConfigError(
      () =>
        load({
          BYOM_REPLICAS: "7",
          BYOM_LOG_LEVEL: "loud",
          BYOM_STREAM: "a.b",
        }),
      /BYOM_STREAM="a\.b" \(stream\): must be 1 to 255 characters/,
      /BYOM_REPLICAS="7" \(replicas\): must be an integer from 1 to 5/,
      /BYOM_LOG_LEVEL="loud" \(logLevel\): must be one of .*silent/,
    );
  });

  it("refuses a bad subject prefix", () => {
    assertConfigError(
      () => load({ BYOM_SUBJECT_PREFIX: "byom.*" }),
      /BYOM_SUBJECT_PREFIX="byom\.\*"/,
    );
    assertConfigError(
      () => load({ BYOM_SUBJECT_PREFIX: "byom..x" }),
      /subjectPrefix/,
    );
  });

  it("never shows a secret value in an error", () => {
    assert.throws(
      () => load({}, { overrides: { natsPassword: 42 } }),
      (error: Error) =>
        error.message.startsWith("NATS_PASSWORD=[redacted] (natsPassword)") &&
        !error.message.includes("42"),
    );
  });

  it("refuses half a TLS client pair and a password without a user", () => {
    assertConfigError(
      () => load({ NATS_TLS_CERT: "/c.pem" }),
      /NATS_TLS_CERT and NATS_TLS_KEY/,
    );
    assertConfigError(
      () => load({ NATS_PASSWORD: "pw" }),
      /a password needs a user/,
    );
    assertConfigError(
      () => load({ NATS_TOKEN: "t", NATS_USER: "u" }),
      /not both/,
    );
  });

  it("refuses a bad pool entry from the environment", () => {
    assertConfigError(
      () => load({ VM_POOL_IPS: "10.0.0.1, 10.0.0.9-10.0.0.2" }),
      /^VM_POOL_IPS entry "10\.0\.0\.9-10\.0\.0\.2": range start is above its end$/,
    );
  });

  it("allows an empty pool, which requirePool refuses", () => {
    const config = load({});
    assertConfigError(
      () => requirePool(config),
      /^VM_POOL_IPS is empty: the agent needs at least one VM IP$/,
    );
    assert.deepEqual(requirePool(load({ VM_POOL_IPS: "::1" })), ["::1"]);
  });
});

describe("redactConfig", () => {
  it("hides passwords, tokens, the passphrase and URL credentials", () => {
    const config = load({
      NATS_URL: "nats://alice:s3cret@a:4222,tls://t0ken@b:4443,nats://c:4222",
      NATS_USER: "alice",
      NATS_PASSWORD: "hunter2",
      SSH_PRIV_KEY_PASSPHRASE: "open sesame",
    });
    const shown = redactConfig(config);
    const text = JSON.stringify(shown);
    for (const secret of ["s3cret", "t0ken", "hunter2", "open sesame"]) {
      assert.ok(!text.includes(secret), `${secret} is visible in ${text}`);
    }
    assert.equal(shown.natsPassword, "[redacted]");
    assert.equal(shown.sshPrivKeyPassphrase, "[redacted]");
    assert.equal(shown.natsUser, "alice");
    assert.equal(
      shown.natsUrl,
      "nats://alice:[redacted]@a:4222,tls://[redacted]@b:4443,nats://c:4222",
    );
    assert.deepEqual(shown.natsServers, [
      "nats://alice:[redacted]@a:4222",
      "tls://[redacted]@b:4443",
      "nats://c:4222",
    ]);
  });

  it("keeps unset secrets visible as empty", () => {
    const shown = redactConfig(load({}));
    assert.equal(shown.natsPassword, "");
    assert.equal(shown.natsToken, "");
    assert.equal(shown.sshPrivKeyPassphrase, "");
  });

  it("keeps the pool and derived values", () => {
    const shown = redactConfig(
      load({ VM_POOL_IPS: "10.0.0.1", NODE_NAME: "n1" }),
    );
    assert.deepEqual(shown.pool, ["10.0.0.1"]);
    assert.equal(shown.node, "n1");
  });
});

describe("describeConfigSchema", () => {
  it("describes every key with env, default, doc and sensitivity", () => {
    const rows = describeConfigSchema();
    const byKey = new Map(rows.map((row) => [row.key, row]));
    assert.equal(byKey.get("sshTimeoutSeconds")?.env, "SSH_TIMEOUT");
    assert.equal(byKey.get("sshTimeoutSeconds")?.default, 30);
    assert.equal(byKey.get("natsToken")?.sensitive, true);
    assert.equal(byKey.get("natsUser")?.sensitive, false);
    const sensitive = rows.filter((row) => row.sensitive).map((row) => row.key);
    assert.deepEqual(sensitive.sort(), [
      "natsPassword",
      "natsToken",
      "sshPrivKeyPassphrase",
    ]);
    for (const row of rows) {
      assert.ok(row.doc.length > 0 && row.env.length > 0, row.key);
    }
    const envs = new Set(rows.map((row) => row.env));
    assert.equal(envs.size, rows.length, "every key has its own variable");
  });

  it("matches the example config file key for key", async () => {
    const { readFile } = await import("node:fs/promises");
    const { parse } = await import("yaml");
    const example = parse(
      await readFile("config/byom.example.yaml", "utf8"),
    ) as Record<string, unknown>;
    const rows = describeConfigSchema();
    assert.deepEqual(
      Object.keys(example),
      rows.map((row) => row.key),
    );
    for (const row of rows) {
      assert.equal(example[row.key], row.default, row.key);
    }
  });
});
