import { readFileSync } from "node:fs";
import { hostname as osHostname } from "node:os";

/** Files read, in order, when `NODE_NAME` is unset. */
export const NodeNameFiles = {
  /** Kubernetes downward API volume, as the upstream deployment mounts it. */
  podinfo: "/etc/podinfo/nodename",
  hostname: "/etc/hostname",
} as const;

/** Sources of {@link resolveNodeName}; each can be replaced in tests. */
export interface ResolveNodeNameOptions {
  /** Environment; default `process.env`. Only `NODE_NAME` is read. */
  env?: NodeJS.ProcessEnv;
  /** Reads a file as UTF-8; a throw counts as a missing file. */
  readFile?: (path: string) => string;
  /** Last resort; default `os.hostname()`. */
  hostname?: () => string;
}

/**
 * The name of this node, as the upstream provider finds it: `NODE_NAME`
 * (trimmed; blank counts as unset), then `/etc/podinfo/nodename`, then
 * `/etc/hostname` (each trimmed, first line), then
 * `os.hostname()`. Never throws.
 */
export function resolveNodeName(options: ResolveNodeNameOptions = {}): string {
  const env = options.env ?? process.env;
  const fromEnv = env.NODE_NAME?.trim() ?? "";
  if (fromEnv !== "") {
    return fromEnv;
  }

  const readFile =
    options.readFile ?? ((file: string) => readFileSync(file, "utf8"));
  for (const file of [NodeNameFiles.podinfo, NodeNameFiles.hostname]) {
    const name = firstLine(file, readFile);
    if (name !== "") {
      return name;
    }
  }

  return (options.hostname ?? osHostname)().trim();
}

function firstLine(file: string, readFile: (path: string) => string): string {
  try {
    return (readFile(file).trim().split(/\r?\n/, 1)[0] ?? "").trim();
  } catch {
    return "";
  }
}
