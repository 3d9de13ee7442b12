import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";

import { createUser } from "@nats-io/nkeys";
import type { NatsConnection } from "@nats-io/transport-node";

import { createAgent, type Agent } from "../../src/agent/index.js";
import { ByomError } from "../../src/errors/index.js";
import { resourceNames } from "../../src/protocol/index.js";
import { createPublisher } from "../../src/publisher/index.js";
import {
  connectNats,
  type NatsConnectOptions,
} from "../../src/transport/index.js";
import { startNatsServer, type NatsServer } from "../helpers/nats.js";
import {
  assertInvariants,
  sha256,
  watchResults,
} from "../helpers/request-invariants.js";
import { startSandbox, type TestSandbox } from "../helpers/sandbox.js";

const execFileAsync = promisify(execFile);
const fixtures = new URL("../fixtures/userdata/", import.meta.url);

/**
 * A CA, a server certificate for 127.0.0.1 and a client certificate. The
 * server certificate also names localhost: nats.js sends no TLS server
 * name for an IP URL, and Node then checks the certificate against
 * "localhost".
 */
async function makeCertificates(dir: string): Promise<void> {
  const openssl = (...args: string[]): Promise<unknown> =>
    execFileAsync("openssl", args, { cwd: dir });
  const ecKey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
  await openssl(
    "req",
    "-x509",
    ...ecKey,
    "-nodes",
    "-keyout",
    "ca.key",
    "-out",
    "ca.pem",
    "-days",
    "2",
    "-subj",
    "/CN=byom-test-ca",
  );
  await writeFile(
    join(dir, "server.ext"),
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
  );
  await writeFile(join(dir, "client.ext"), "extendedKeyUsage=clientAuth\n");
  for (const [name, subject] of [
    ["server", "/CN=127.0.0.1"],
    ["client", "/CN=byom-agent"],
  ] as const) {
    await openssl(
      "req",
      ...ecKey,
      "-nodes",
      "-keyout",
      `${name}.key`,
      "-out",
      `${name}.csr`,
      "-subj",
      subject,
    );
    await openssl(
      "x509",
      "-req",
      "-in",
      `${name}.csr`,
      "-CA",
      "ca.pem",
      "-CAkey",
      "ca.key",
      "-CAcreateserial",
      "-out",
      `${name}.pem`,
      "-days",
      "2",
      "-extfile",
      `${name}.ext`,
    );
  }
}

/** Refused credentials: a configuration error, not worth a retry. */
function refused(pattern: RegExp, hidden?: string) {
  return (error: unknown): boolean => {
    assert.ok(error instanceof ByomError, String(error));
    assert.equal(error.name, "ConfigError");
    assert.equal(error.retryable, false);
    assert.match(error.message, pattern);
    if (hidden !== undefined) {
      assert.ok(!error.message.includes(hidden), "secret hidden");
    }
    return true;
  };
}

function unavailable(pattern: RegExp, hidden?: string) {
  return (error: unknown): boolean => {
    assert.ok(error instanceof ByomError, String(error));
    assert.equal(error.code, "UNAVAILABLE");
    assert.match(error.message, pattern);
    if (hidden !== undefined) {
      assert.ok(!error.message.includes(hidden), "secret hidden");
    }
    return true;
  };
}

describe("NATS authentication and TLS", () => {
  let dir: string;
  let vms: TestSandbox;
  const servers: NatsServer[] = [];
  const connections: NatsConnection[] = [];
  const agents: Agent[] = [];
  let userData: Buffer;
  let pool: string[];

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "byom-nats-auth-"));
    await makeCertificates(dir);
    vms = await startSandbox({ vms: 3, firstIp: "127.49.1.2" });
    pool = vms.sandbox.status().map((vm) => vm.ip);
    userData = await readFile(new URL("pod-basic.yaml", fixtures));
  });

  after(async () => {
    for (const agent of agents) await agent.close().catch(() => undefined);
    for (const nc of connections) await nc.close().catch(() => undefined);
    for (const server of servers) await server.stop().catch(() => undefined);
    await vms?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  async function serverWith(name: string, config: string): Promise<NatsServer> {
    const file = join(dir, `${name}.conf`);
    await writeFile(file, config);
    const server = await startNatsServer({ args: ["-c", file] });
    servers.push(server);
    return server;
  }

  async function connected(
    options: NatsConnectOptions,
  ): Promise<NatsConnection> {
    const nc = await connectNats({ timeoutMs: 3000, ...options });
    connections.push(nc);
    return nc;
  }

  /** An agent and a publisher over `connection`; one create round trip. */
  async function roundTrip(
    prefix: string,
    ip: string,
    connection: (name: string) => Promise<NatsConnection>,
  ): Promise<void> {
    const names = resourceNames({
      subjectPrefix: `${prefix}.v1.requests`,
      stream: `${prefix.toUpperCase()}_REQUESTS`,
      consumer: `${prefix}-agents`,
      leaseBucket: `${prefix}-leases`,
      resultBucket: `${prefix}-results`,
    });
    const agentConnection = await connection("byom-agent");
    const clientConnection = await connection("byom-publisher");
    const watch = watchResults(clientConnection);
    const agent = await createAgent({
      nc: agentConnection,
      names,
      pool: [ip],
      agentId: "node-a",
      ssh: {
        username: "peerpod",
        privateKey: Buffer.from(vms.privateKey),
        port: 22,
        connectTimeoutMs: 5000,
      },
      quarantineProbeIntervalMs: 0,
    });
    agents.push(agent);
    const publisher = createPublisher({
      nc: clientConnection,
      names,
      requestingNode: "node-a",
      requestTimeoutMs: 20_000,
    });
    const created = await publisher.createInstance({
      podName: `${prefix}-pod`,
      sandboxId: "s1",
      userData,
      requestId: `${prefix}-create`,
    });
    assert.equal(created.instance.id, ip);
    const held = await readFile(
      join(vms.sandbox.vm(ip).cidataDir, "user-data"),
    );
    assert.equal(sha256(held), sha256(userData));
    await assertInvariants({
      leases: agent.leases,
      sandbox: {
        ...vms.sandbox,
        // This agent's pool is one VM; the others belong to other servers.
        status: () => vms.sandbox.status().filter((vm) => vm.ip === ip),
      },
      watch,
      requestIds: [`${prefix}-create`],
      live: { [ip]: created.allocationId },
      delivered: new Set([sha256(userData)]),
    });
    watch.close();
  }

  it("user and password: a create round-trips; a wrong password fails naming the URL, not the password", async () => {
    const server = await serverWith(
      "userpass",
      'authorization { users = [ { user: "byom", password: "s3cret-pass-Q1" } ] }\n',
    );
    await roundTrip("authuser", pool[0]!, (name) =>
      connected({
        servers: server.url,
        name,
        user: "byom",
        password: "s3cret-pass-Q1",
      }),
    );

    await assert.rejects(
      connected({
        servers: server.url,
        name: "wrong",
        user: "byom",
        password: "not-the-pass-Z9",
      }),
      refused(
        new RegExp(
          `^NATS at nats://127\\.0\\.0\\.1:${server.port} refused the connection \\(.*[Aa]uthorization.*\\): check NATS_USER and NATS_PASSWORD$`,
        ),
        "not-the-pass-Z9",
      ),
    );
    const inUrl = `nats://byom:not-the-pass-Z9@127.0.0.1:${server.port}`;
    await assert.rejects(
      connected({ servers: inUrl, name: "wrong-url" }),
      refused(
        /^NATS at nats:\/\/byom:\[redacted\]@127\.0\.0\.1:\d+ refused the connection .*: check the user in NATS_URL$/,
        "not-the-pass-Z9",
      ),
    );
  });

  it("mutual TLS: CA and client certificate work; without the client certificate it fails clearly", async () => {
    const server = await serverWith(
      "tls",
      [
        "tls {",
        `  cert_file: "${join(dir, "server.pem")}"`,
        `  key_file: "${join(dir, "server.key")}"`,
        `  ca_file: "${join(dir, "ca.pem")}"`,
        "  verify: true",
        "}",
        "",
      ].join("\n"),
    );
    const tlsUrl = `tls://127.0.0.1:${server.port}`;
    await roundTrip("authtls", pool[1]!, (name) =>
      connected({
        servers: tlsUrl,
        name,
        tls: {
          caFile: join(dir, "ca.pem"),
          certFile: join(dir, "client.pem"),
          keyFile: join(dir, "client.key"),
        },
      }),
    );

    await assert.rejects(
      connected({
        servers: tlsUrl,
        name: "no-client-cert",
        tls: { caFile: join(dir, "ca.pem") },
      }),
      unavailable(
        new RegExp(
          `^cannot connect to NATS at tls://127\\.0\\.0\\.1:${server.port}: .*set NATS_TLS_CERT and NATS_TLS_KEY\\)$`,
        ),
      ),
    );
    await assert.rejects(
      connected({ servers: tlsUrl, name: "no-ca", timeoutMs: 2000 }),
      unavailable(
        /^cannot connect to NATS at tls:\/\/127\.0\.0\.1:\d+: unable to verify the first certificate/,
      ),
    );
  });

  it("nkey: a user nkey seed file authenticates; another seed is refused", async () => {
    const user = createUser();
    const server = await serverWith(
      "nkey",
      `authorization { users = [ { nkey: "${user.getPublicKey()}" } ] }\n`,
    );
    const seedFile = join(dir, "user.nk");
    await writeFile(seedFile, `${new TextDecoder().decode(user.getSeed())}\n`, {
      mode: 0o600,
    });
    await roundTrip("authnkey", pool[2]!, (name) =>
      connected({ servers: server.url, name, nkeySeedFile: seedFile }),
    );

    const strangerFile = join(dir, "stranger.nk");
    await writeFile(
      strangerFile,
      `${new TextDecoder().decode(createUser().getSeed())}\n`,
    );
    await assert.rejects(
      connected({
        servers: server.url,
        name: "stranger",
        nkeySeedFile: strangerFile,
      }),
      refused(/refused the connection .*: check NATS_NKEY_SEED_FILE$/),
    );
    // No credentials at all: the message says which settings exist.
    await assert.rejects(
      connected({ servers: server.url, name: "anonymous" }),
      refused(/: it requires authentication and none is set \(NATS_USER/),
    );
  });
});
