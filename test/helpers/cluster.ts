import {
  freePort,
  startEmbeddedNats,
  type EmbeddedNats,
} from "../../src/transport/index.js";

/** A JetStream cluster of nats-servers on loopback. */
export interface NatsCluster {
  readonly nodes: EmbeddedNats[];
  /** Client URLs of every node, comma-separated. */
  readonly urls: string;
  close(): Promise<void>;
}

/**
 * Starts `size` clustered nats-servers with JetStream on 127.0.0.1, each
 * with its own store and name, routed to one another.
 */
export async function startNatsCluster(
  size = 3,
  name = "byom-test",
): Promise<NatsCluster> {
  // Every port chosen before any server starts, all different: a port
  // picked for a route is not bound yet and could be picked again.
  const ports = new Set<number>();
  while (ports.size < size * 2) {
    ports.add(await freePort());
  }
  const [clientPorts, clusterPorts] = [
    [...ports].slice(0, size),
    [...ports].slice(size),
  ];
  const routes = clusterPorts
    .map((port) => `nats://127.0.0.1:${port}`)
    .join(",");
  const started = await Promise.allSettled(
    clusterPorts.map((port, index) =>
      startEmbeddedNats({
        port: clientPorts[index]!,
        args: [
          "-n",
          `${name}-${index + 1}`,
          "--cluster_name",
          name,
          "--cluster",
          `nats://127.0.0.1:${port}`,
          "--routes",
          routes,
        ],
      }),
    ),
  );
  const nodes = started.flatMap((outcome) =>
    outcome.status === "fulfilled" ? [outcome.value] : [],
  );
  const close = async (): Promise<void> => {
    await Promise.allSettled(nodes.map((node) => node.close()));
  };
  const failed = started.find((outcome) => outcome.status === "rejected");
  if (failed !== undefined) {
    await close();
    throw failed.reason;
  }
  return { nodes, urls: nodes.map((node) => node.url).join(","), close };
}
