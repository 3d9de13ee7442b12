import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";

import { connect, type NatsConnection } from "@nats-io/transport-node";

import { createAgent, type Agent } from "../../src/agent/index.js";
import {
  createMetrics,
  startHealthServer,
  type HealthServer,
  type Metrics,
  type NatsWatch,
} from "../../src/observability/index.js";
import { createPublisher, type Publisher } from "../../src/publisher/index.js";
import { resourceNames } from "../../src/protocol/index.js";
import { createSandbox, type Sandbox } from "../../src/sandbox/index.js";
import { startNatsServer, type NatsServer } from "../helpers/nats.js";
import { waitFor } from "../helpers/wait.js";

const run = promisify(execFile);
const fixtures = new URL("../fixtures/userdata/", import.meta.url);
const names = resourceNames({
  stream: "OBS_TEST",
  leaseBucket: "obs-leases",
  resultBucket: "obs-results",
  subjectPrefix: "obs.v1.requests",
  consumer: "obs-agents",
});

/** One sample of the exposition text: `name{labels} value`. */
function sample(text: string, name: string, labels = ""): number | undefined {
  const prefix = labels === "" ? `${name} ` : `${name}{${labels}} `;
  const line = text.split("\n").find((entry) => entry.startsWith(prefix));
  return line === undefined ? undefined : Number(line.slice(prefix.length));
}

describe("metrics and health of a running agent", () => {
  let server: NatsServer;
  let sandbox: Sandbox;
  let keyDir: string;
  let agentConnection: NatsConnection;
  let clientConnection: NatsConnection;
  let agent: Agent;
  let publisher: Publisher;
  let metrics: Metrics;
  let natsWatch: NatsWatch;
  let http: HealthServer;
  let base: string;

  before(async () => {
    server = await startNatsServer();
    keyDir = await mkdtemp(join(tmpdir(), "byom-obs-key-"));
    const keyPath = join(keyDir, "id_ed25519");
    await run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", keyPath]);
    sandbox = await createSandbox({
      vms: 2,
      firstIp: "127.44.0.2",
      stateDir: `/var/lib/byom-sandbox-test/obs-${process.pid}`,
      authorizedKeys: await readFile(`${keyPath}.pub`, "utf8"),
    });
    agentConnection = await connect({
      servers: server.url,
      reconnectTimeWait: 200,
    });
    clientConnection = await connect({ servers: server.url });
    agent = await createAgent({
      nc: agentConnection,
      names,
      pool: sandbox.status().map((vm) => vm.ip),
      agentId: "obs-node",
      ssh: {
        username: "peerpod",
        privateKey: await readFile(keyPath),
        port: 22,
        connectTimeoutMs: 5000,
      },
      quarantineProbeIntervalMs: 0,
    });
    publisher = createPublisher({
      nc: clientConnection,
      names,
      requestingNode: "obs-node",
      requestTimeoutMs: 20_000,
    });

    metrics = createMetrics({ processMetrics: false });
    metrics.attachAgent(agent);
    natsWatch = metrics.attachNats(agentConnection);
    http = await startHealthServer({
      port: 0,
      host: "127.0.0.1",
      metrics,
      checks: () => ({
        nats: natsWatch.connected(),
        consumer: agent.status().consumerBound,
        allowlist: agent.status().hostKeyPolicy,
      }),
    });
    base = `http://127.0.0.1:${http.port}`;
  });

  after(async () => {
    await http?.close();
    metrics?.close();
    await publisher?.close();
    await agent?.close();
    await clientConnection?.close();
    await agentConnection?.close();
    await sandbox?.close();
    await server?.stop();
    await rm(keyDir, { recursive: true, force: true });
  });

  it("answers /healthz with 200 and /readyz with 200 when ready", async () => {
    const health = await fetch(`${base}/healthz`);
    assert.equal(health.status, 200);
    assert.deepEqual(await health.json(), { status: "ok" });

    const ready = await fetch(`${base}/readyz`);
    assert.equal(ready.status, 200);
    const body = (await ready.json()) as { status: string; reasons: string[] };
    assert.equal(body.status, "ready");
    assert.deepEqual(body.reasons, []);
  });

  it("counts a create, times it end to end and shows the pool by state", async () => {
    const before = await (await fetch(`${base}/metrics`)).text();
    assert.equal(sample(before, "byom_pool_leases", 'state="free"'), 2);
    assert.equal(
      sample(before, "byom_requests_total", 'operation="create",code="OK"'),
      undefined,
    );

    const created = await publisher.createInstance({
      podName: "obs-1",
      podNamespace: "default",
      sandboxId: "s1",
      userData: await readFile(new URL("pod-basic.yaml", fixtures)),
    });
    // The result reaches the publisher before the agent's event fires.
    const text = await waitFor(
      async () => {
        const body = await (await fetch(`${base}/metrics`)).text();
        return sample(
          body,
          "byom_requests_total",
          'operation="create",code="OK"',
        )
          ? body
          : undefined;
      },
      { what: "the create to be counted" },
    );
    const response = await fetch(`${base}/metrics`);
    assert.match(response.headers.get("content-type") ?? "", /^text\/plain/);

    assert.equal(
      sample(text, "byom_requests_total", 'operation="create",code="OK"'),
      1,
    );
    assert.equal(
      sample(
        text,
        "byom_request_duration_seconds_count",
        'operation="create",code="OK"',
      ),
      1,
    );
    const seconds = sample(
      text,
      "byom_request_duration_seconds_sum",
      'operation="create",code="OK"',
    );
    assert.ok(seconds !== undefined && seconds > 0 && seconds < 20);
    assert.equal(sample(text, "byom_deliveries_total", 'result="ok"'), 1);
    assert.equal(
      sample(text, "byom_lease_transitions_total", 'event="acquired"'),
      1,
    );
    assert.equal(sample(text, "byom_pool_leases", 'state="ready"'), 1);
    assert.equal(sample(text, "byom_pool_leases", 'state="free"'), 1);
    assert.equal(sample(text, "byom_pool_leases", 'state="quarantined"'), 0);
    assert.equal(sample(text, "byom_host_key_rejections_total"), 0);
    assert.equal(sample(text, "byom_nats_connected"), 1);
    assert.equal(sample(text, "byom_consumer_bound"), 1);
    assert.equal(sample(text, "byom_host_key_policy_ok", 'mode="tofu"'), 1);
    for (const phase of ["lease", "probe", "ssh_connect", "upload"]) {
      assert.notEqual(
        sample(text, `byom_${phase}_duration_seconds_count`),
        undefined,
        `byom_${phase}_duration_seconds is exported`,
      );
    }
    assert.ok(sandbox.status().some((vm) => vm.ip === created.instance.id));
  });

  it("answers /readyz with 503 and the reason once the NATS server is gone", async () => {
    await server.stop();

    const body = await waitFor(
      async () => {
        const response = await fetch(`${base}/readyz`);
        return response.status === 503
          ? ((await response.json()) as { reasons: string[] })
          : undefined;
      },
      { what: "/readyz to turn 503" },
    );
    assert.ok(
      body.reasons.includes("nats: not connected"),
      body.reasons.join(),
    );
    const text = await (await fetch(`${base}/metrics`)).text();
    assert.equal(sample(text, "byom_nats_connected"), 0);
    assert.ok(
      (sample(text, "byom_nats_connection_events_total", 'type="disconnect"') ??
        0) >= 1,
    );
    assert.equal((await fetch(`${base}/healthz`)).status, 200);
  });

  it("answers unknown paths with 404 and other methods with 405", async () => {
    assert.equal((await fetch(`${base}/nope`)).status, 404);
    assert.equal(
      (await fetch(`${base}/metrics`, { method: "POST" })).status,
      405,
    );
  });
});
