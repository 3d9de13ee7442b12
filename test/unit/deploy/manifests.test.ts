import assert from "node:assert/strict";
import { copyFile, cp, mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { after, before, describe, it } from "node:test";

import { parse } from "yaml";

import { validateObject } from "../../helpers/kube-schema.js";
import {
  objectId,
  renderKustomization,
  renderWithKubectl,
  type KubeObject,
} from "../../helpers/kustomize.js";

const deployDir = new URL("../../../deploy/", import.meta.url).pathname;
const caaFixture = new URL(
  "../../fixtures/deploy/cloud-api-adaptor.yaml",
  import.meta.url,
).pathname;
const namespace = "confidential-containers-system";

type Json = Record<string, unknown>;
interface Container extends Json {
  name: string;
}

/** Every directory of deploy/ with a kustomization of kind Kustomization. */
async function kustomizations(root: string): Promise<string[]> {
  const found: string[] = [];
  for (const entry of await readdir(root, {
    recursive: true,
    withFileTypes: true,
  })) {
    if (entry.isFile() && entry.name === "kustomization.yaml") {
      const text = await readFile(join(entry.parentPath, entry.name), "utf8");
      if ((parse(text) as Json).kind !== "Component") {
        found.push(relative(root, entry.parentPath));
      }
    }
  }
  return found.sort();
}

function find(objects: KubeObject[], kind: string, name: string): Json {
  const object = objects.find(
    (candidate) => candidate.kind === kind && candidate.metadata.name === name,
  );
  assert.ok(object, `${kind}/${name} is rendered`);
  return object;
}

function podSpec(workload: Json): Json {
  return (workload.spec as Json & { template: { spec: Json } }).template.spec;
}

function container(workload: Json, name: string): Container {
  const found = (podSpec(workload).containers as Container[]).find(
    (candidate) => candidate.name === name,
  );
  assert.ok(found, `container ${name}`);
  return found;
}

/** The properties the issue asks of the agent container and its pod. */
function assertAgent(workload: Json): void {
  const spec = podSpec(workload);
  const agent = container(workload, "byom-agent");
  assert.deepEqual(agent.args, ["agent"]);
  assert.deepEqual(agent.envFrom, [{ configMapRef: { name: "peer-pods-cm" } }]);

  const env = agent.env as Json[];
  assert.deepEqual(
    env.find((variable) => variable.name === "NODE_NAME"),
    {
      name: "NODE_NAME",
      valueFrom: { fieldRef: { fieldPath: "spec.nodeName" } },
    },
  );
  assert.ok(env.some((variable) => variable.name === "NATS_URL"));

  const mounts = agent.volumeMounts as Json[];
  const volumes = spec.volumes as Json[];
  const volumeAt = (path: string): Json => {
    const mount = mounts.find((candidate) => candidate.mountPath === path);
    assert.ok(mount, `a mount at ${path}`);
    assert.equal(mount.subPath, undefined, `${path} is not a subPath mount`);
    assert.equal(mount.readOnly, true);
    const volume = volumes.find((candidate) => candidate.name === mount.name);
    assert.ok(volume, `volume ${String(mount.name)}`);
    return volume.secret as Json;
  };
  assert.equal(volumeAt("/root/.ssh").secretName, "ssh-key-secret");
  const allowlist = volumeAt("/etc/ssh-allowlist");
  assert.equal(allowlist.secretName, "ssh-host-key-allowlist");
  assert.equal(allowlist.optional, true);
  assert.ok(mounts.every((mount) => mount.subPath === undefined));

  const probe = (name: string): Json =>
    (agent[name] as { httpGet: Json }).httpGet;
  assert.equal(probe("livenessProbe").path, "/healthz");
  assert.equal(probe("readinessProbe").path, "/readyz");

  const resources = agent.resources as { requests: Json; limits: Json };
  assert.ok(resources.requests.cpu && resources.requests.memory);
  assert.ok(resources.limits.cpu && resources.limits.memory);

  const security = agent.securityContext as Json;
  assert.equal(security.runAsNonRoot, true);
  assert.equal(typeof security.runAsUser, "number");
  assert.notEqual(security.runAsUser, 0);
  assert.equal(security.allowPrivilegeEscalation, false);
  assert.equal(security.readOnlyRootFilesystem, true);
  assert.deepEqual(security.capabilities, { drop: ["ALL"] });
}

describe("deploy/ kustomizations", () => {
  let workDir: string;
  let rendered: Map<string, KubeObject[]>;

  before(async () => {
    // The sidecar overlay holds what Helm renders; a stand-in shaped like
    // the upstream chart's DaemonSet takes its place here.
    workDir = await mkdtemp(join(tmpdir(), "byom-deploy-"));
    await cp(deployDir, workDir, { recursive: true });
    await copyFile(
      caaFixture,
      join(workDir, "overlays/sidecar/cloud-api-adaptor.yaml"),
    );
    rendered = new Map();
    for (const dir of await kustomizations(workDir)) {
      rendered.set(dir, await renderKustomization(join(workDir, dir)));
    }
  });

  after(async () => {
    await rm(workDir, { recursive: true, force: true });
  });

  it("finds the base and the small, standalone and sidecar overlays", () => {
    assert.deepEqual(
      [...rendered.keys()],
      ["base", "overlays/sidecar", "overlays/small", "overlays/standalone"],
    );
  });

  it("renders objects that all pass the Kubernetes JSON schemas", () => {
    for (const [dir, objects] of rendered) {
      assert.ok(objects.length > 0, dir);
      for (const object of objects) {
        validateObject(object);
      }
    }
  });

  it("puts every namespaced object in confidential-containers-system", () => {
    for (const [dir, objects] of rendered) {
      for (const object of objects) {
        if (object.kind !== "Namespace") {
          assert.equal(
            object.metadata.namespace,
            namespace,
            `${dir}: ${objectId(object)}`,
          );
        }
      }
    }
  });

  it("runs NATS with JetStream as a 3-replica StatefulSet with storage, and 1 in the small overlay", () => {
    for (const dir of ["base", "overlays/standalone", "overlays/small"]) {
      const objects = rendered.get(dir)!;
      const nats = find(objects, "StatefulSet", "byom-nats") as {
        spec: { replicas: number; volumeClaimTemplates: Json[] };
      };
      assert.equal(nats.spec.replicas, dir === "overlays/small" ? 1 : 3, dir);
      assert.equal(nats.spec.volumeClaimTemplates.length, 1);

      const config = (
        find(objects, "ConfigMap", "byom-nats-config").data as Json
      )["nats.conf"] as string;
      assert.match(config, /jetstream \{/);
      assert.equal(/cluster \{/.test(config), dir !== "overlays/small", dir);

      const client = find(objects, "Service", "byom-nats").spec as Json;
      assert.ok((client.ports as Json[]).some((port) => port.port === 4222));
      const headless = find(objects, "Service", "byom-nats-headless")
        .spec as Json;
      assert.equal(headless.clusterIP, "None");
      assert.deepEqual(
        (headless.ports as Json[]).map((port) => port.port),
        [4222, 6222, 8222],
      );
    }
  });

  it("lets agents and the cloud-api-adaptor reach NATS's client port", () => {
    const policy = find(
      rendered.get("base")!,
      "NetworkPolicy",
      "byom-nats",
    ) as {
      spec: { ingress: { ports: Json[]; from: Json[] }[] };
    };
    const client = policy.spec.ingress.find((rule) =>
      rule.ports.some((port) => port.port === 4222),
    );
    assert.ok(client);
    assert.deepEqual(
      client.from.map((peer) => (peer.podSelector as Json).matchLabels),
      [
        { "app.kubernetes.io/name": "byom-agent" },
        { app: "cloud-api-adaptor" },
      ],
    );
  });

  it("adds the agent to the cloud-api-adaptor DaemonSet and keeps its own container and volumes", () => {
    const daemonSet = find(
      rendered.get("overlays/sidecar")!,
      "DaemonSet",
      "cloud-api-adaptor-daemonset",
    );
    assertAgent(daemonSet);
    assert.ok(container(daemonSet, "cloud-api-adaptor-con"));
    const volumes = (podSpec(daemonSet).volumes as Json[]).map(
      (volume) => volume.name,
    );
    assert.ok(volumes.includes("ssh") && volumes.includes("pods-dir"));
  });

  it("runs the agent as a DaemonSet of its own in the standalone overlay", () => {
    assertAgent(
      find(rendered.get("overlays/standalone")!, "DaemonSet", "byom-agent"),
    );
  });

  it("fails on a broken manifest", () => {
    const daemonSet = structuredClone(
      find(rendered.get("overlays/standalone")!, "DaemonSet", "byom-agent"),
    ) as KubeObject;
    const agent = container(daemonSet, "byom-agent");
    (agent.ports as Json[])[0]!.containerPort = "metrics";
    assert.throws(
      () => validateObject(daemonSet),
      /containerPort must be integer/,
    );

    const noSelector = structuredClone(daemonSet);
    delete (noSelector.spec as Json).selector;
    assert.throws(() => validateObject(noSelector), /selector/);
  });

  it("renders as kubectl kustomize does, when kubectl is on this machine", async (context) => {
    for (const [dir, objects] of rendered) {
      const reference = await renderWithKubectl(join(workDir, dir));
      if (reference === undefined) {
        context.skip("kubectl is not installed");
        return;
      }
      const byId = (list: KubeObject[]): Map<string, KubeObject> =>
        new Map(list.map((object) => [objectId(object), object]));
      assert.deepEqual(byId(objects), byId(reference), dir);
    }
  });
});
