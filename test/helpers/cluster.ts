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
  const clusterPorts: number[] = [];
  for (let index = 0; index < size; index += 1) {
    clusterPorts.push(await freePort());
  }
  const routes = clusterPorts
    .map((port) => `nats://127.0.0.1:${port}`)
    .join(",");
  const nodes: EmbeddedNats[] = [];
  const close = async (): Promise<void> => {
    await Promise.allSettled(nodes.map((node) => node.close()));
  };
  try {
    const started = await Promise.all(
      clusterPorts.map((port, index) =>
        startEmbeddedNats({
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
    nodes.push(...started);
  } catch (error) {
    await close();
    throw error;
  }
  return { nodes, urls: nodes.map((node) => node.url).join(","), close };
}
