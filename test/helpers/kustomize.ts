import { execFile } from "node:child_process";
import { readFile, stat } from "node:fs/promises";
import { join, resolve } from "node:path";
import { promisify } from "node:util";

import { parseAllDocuments } from "yaml";

/**
 * A minimal kustomize for the features deploy/ uses, since no kustomize
 * binary comes from our registries: `resources` (files and directories),
 * `components`, `namespace`, and `patches` with a strategic merge patch
 * (by `path`, with or without a `target` of kind and name). Anything else
 * in a kustomization is refused, so a new feature cannot be ignored
 * silently. When `kubectl kustomize` is on the machine, the deploy tests
 * compare both outputs.
 */
export type KubeObject = Record<string, unknown> & {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string } & Record<string, unknown>;
};

const supportedFields = new Set([
  "apiVersion",
  "kind",
  "resources",
  "components",
  "namespace",
  "patches",
]);

/** Kinds that live outside namespaces (the ones deploy/ could use). */
const clusterScoped = new Set([
  "Namespace",
  "ClusterRole",
  "ClusterRoleBinding",
  "CustomResourceDefinition",
  "PriorityClass",
  "StorageClass",
]);

/**
 * Strategic merge keys of the lists deploy/ patches (from the Kubernetes
 * API's patchMergeKey); other lists are replaced whole, as kustomize does.
 */
const mergeKeys: Record<string, string> = {
  containers: "name",
  initContainers: "name",
  ephemeralContainers: "name",
  volumes: "name",
  env: "name",
  volumeMounts: "mountPath",
  volumeDevices: "devicePath",
  imagePullSecrets: "name",
  hostAliases: "ip",
  ports: "containerPort",
};

interface Patch {
  path: string;
  target?: { kind?: string; name?: string };
}

/** Renders the kustomization in `dir` into its objects. */
export async function renderKustomization(dir: string): Promise<KubeObject[]> {
  return render(resolve(dir), "Kustomization");
}

/**
 * Renders one kustomization; a Component works on its parent's objects
 * (`incoming`), as kustomize applies components.
 */
async function render(
  dir: string,
  expected: string,
  incoming: KubeObject[] = [],
): Promise<KubeObject[]> {
  const file = join(dir, "kustomization.yaml");
  const [kustomization] = await readYaml(file);
  if (kustomization === undefined) {
    throw new Error(`${file}: empty`);
  }
  const kind = (kustomization.kind as string | undefined) ?? "Kustomization";
  if (kind !== expected) {
    throw new Error(`${file}: kind ${kind} where ${expected} was expected`);
  }
  for (const field of Object.keys(kustomization)) {
    if (!supportedFields.has(field)) {
      throw new Error(
        `${file}: "${field}" is not supported by the test renderer`,
      );
    }
  }

  let objects: KubeObject[] = [...incoming];
  for (const entry of (kustomization.resources as string[] | undefined) ?? []) {
    const path = join(dir, entry);
    objects.push(
      ...((await stat(path)).isDirectory()
        ? await render(path, "Kustomization")
        : await readObjects(path)),
    );
  }
  for (const entry of (kustomization.components as string[] | undefined) ??
    []) {
    objects = await render(join(dir, entry), "Component", objects);
  }
  objects = await applyPatches(
    dir,
    (kustomization.patches as Patch[] | undefined) ?? [],
    objects,
  );

  const namespace = kustomization.namespace as string | undefined;
  if (namespace !== undefined) {
    for (const object of objects) {
      if (!clusterScoped.has(object.kind)) {
        object.metadata.namespace = namespace;
      }
    }
  }
  assertUnique(objects, file);
  return objects;
}

async function applyPatches(
  dir: string,
  patches: Patch[],
  objects: KubeObject[],
): Promise<KubeObject[]> {
  for (const patch of patches) {
    for (const document of await readYaml(join(dir, patch.path))) {
      const kind = patch.target?.kind ?? (document.kind as string);
      const name =
        patch.target?.name ??
        (document.metadata as { name: string } | undefined)?.name;
      const matches = objects.filter(
        (object) => object.kind === kind && object.metadata.name === name,
      );
      if (matches.length !== 1) {
        throw new Error(
          `${patch.path}: ${matches.length} targets for ${kind}/${name}`,
        );
      }
      const index = objects.indexOf(matches[0]!);
      const patched = mergePatch(matches[0], document, "") as KubeObject;
      // A patch chosen by target keeps the target's identity.
      patched.metadata.name = matches[0]!.metadata.name;
      objects[index] = patched;
    }
  }
  return objects;
}

/** Strategic merge of `patch` onto `base` (a copy; inputs unchanged). */
export function mergePatch(
  base: unknown,
  patch: unknown,
  field: string,
): unknown {
  if (isMap(base) && isMap(patch)) {
    const merged: Record<string, unknown> = { ...base };
    for (const [key, value] of Object.entries(patch)) {
      if (value === null) {
        delete merged[key];
      } else {
        merged[key] = key in base ? mergePatch(base[key], value, key) : value;
      }
    }
    return merged;
  }
  const mergeKey = mergeKeys[field];
  if (Array.isArray(base) && Array.isArray(patch) && mergeKey !== undefined) {
    const merged = [...base] as unknown[];
    for (const item of patch) {
      const key = isMap(item) ? item[mergeKey] : undefined;
      const at = merged.findIndex(
        (existing) => isMap(existing) && existing[mergeKey] === key,
      );
      if (key !== undefined && at >= 0) {
        merged[at] = mergePatch(merged[at], item, "");
      } else {
        // New entries go first, as kustomize's strategic merge puts them.
        merged.splice(merged.length - base.length, 0, item);
      }
    }
    return merged;
  }
  return structuredClone(patch);
}

function isMap(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

async function readYaml(path: string): Promise<Record<string, unknown>[]> {
  const documents = parseAllDocuments(await readFile(path, "utf8"));
  const values: Record<string, unknown>[] = [];
  for (const document of documents) {
    if (document.errors.length > 0) {
      throw new Error(`${path}: ${document.errors[0]!.message}`);
    }
    const value: unknown = document.toJS();
    if (value !== null && value !== undefined) {
      if (!isMap(value)) {
        throw new Error(`${path}: a document is not a mapping`);
      }
      values.push(value);
    }
  }
  return values;
}

async function readObjects(path: string): Promise<KubeObject[]> {
  const objects = await readYaml(path);
  for (const object of objects) {
    const metadata = object.metadata as { name?: unknown } | undefined;
    if (
      typeof object.apiVersion !== "string" ||
      typeof object.kind !== "string" ||
      typeof metadata?.name !== "string"
    ) {
      throw new Error(`${path}: an object without apiVersion, kind or name`);
    }
  }
  return objects as KubeObject[];
}

function assertUnique(objects: KubeObject[], file: string): void {
  const seen = new Set<string>();
  for (const object of objects) {
    const id = objectId(object);
    if (seen.has(id)) {
      throw new Error(`${file}: ${id} appears twice`);
    }
    seen.add(id);
  }
}

/** `kind/namespace/name`, the identity kustomize keeps unique. */
export function objectId(object: KubeObject): string {
  return `${object.kind}/${object.metadata.namespace ?? ""}/${object.metadata.name}`;
}

const run = promisify(execFile);

/** `kubectl kustomize <dir>` parsed, or undefined when kubectl is absent. */
export async function renderWithKubectl(
  dir: string,
): Promise<KubeObject[] | undefined> {
  let stdout: string;
  try {
    ({ stdout } = await run("kubectl", ["kustomize", dir], {
      maxBuffer: 16 * 1024 * 1024,
    }));
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") {
      return undefined;
    }
    throw error;
  }
  return parseAllDocuments(stdout)
    .map((document) => document.toJS() as KubeObject | null)
    .filter((object): object is KubeObject => object !== null);
}
