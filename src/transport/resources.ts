import {
  AckPolicy,
  DeliverPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  RetentionPolicy,
  StorageType,
  jetstreamManager,
  type JetStreamManager,
} from "@nats-io/jetstream";
import { Kvm, type KV } from "@nats-io/kv";
import { nanos, type NatsConnection } from "@nats-io/transport-node";

import type { Logger } from "../logging/index.js";
import { requestWildcard, type ResourceNames } from "../protocol/index.js";

/** Settings of the request stream and its consumer. */
export interface QueueSettings {
  /** Requests older than this are dropped by the server. */
  requestMaxAgeMs: number;
  /** JetStream de-duplication window for publisher retries. */
  duplicateWindowMs: number;
  /** Redelivery delay after the last heartbeat. */
  ackWaitMs: number;
  /** Deliveries of one request before it gets a final error. */
  maxDeliver: number;
  replicas: number;
  /** How long results stay readable in the result bucket. */
  resultTtlMs: number;
}

export const defaultQueueSettings: QueueSettings = Object.freeze({
  requestMaxAgeMs: 600_000,
  duplicateWindowMs: 120_000,
  ackWaitMs: 30_000,
  maxDeliver: 5,
  replicas: 1,
  resultTtlMs: 3_600_000,
});

function isNotFound(error: unknown): boolean {
  return (
    error instanceof JetStreamApiError &&
    (error.code === JetStreamApiCodes.StreamNotFound ||
      error.code === JetStreamApiCodes.ConsumerNotFound)
  );
}

/**
 * Creates the request stream and the shared durable consumer when missing.
 * Existing resources are left as they are (an operator may have tuned them).
 */
export async function ensureQueue(
  nc: NatsConnection,
  names: ResourceNames,
  settings: QueueSettings,
  logger?: Logger,
): Promise<JetStreamManager> {
  const jsm = await jetstreamManager(nc);

  try {
    await jsm.streams.info(names.stream);
  } catch (error) {
    if (!isNotFound(error)) {
      throw error;
    }
    await jsm.streams.add({
      name: names.stream,
      subjects: [requestWildcard(names)],
      retention: RetentionPolicy.Workqueue,
      storage: StorageType.File,
      max_age: nanos(settings.requestMaxAgeMs),
      duplicate_window: nanos(
        Math.min(settings.duplicateWindowMs, settings.requestMaxAgeMs),
      ),
      num_replicas: settings.replicas,
    });
    logger?.info({ stream: names.stream }, "created request stream");
  }

  try {
    await jsm.consumers.info(names.stream, names.consumer);
  } catch (error) {
    if (!isNotFound(error)) {
      throw error;
    }
    await jsm.consumers.add(names.stream, {
      durable_name: names.consumer,
      ack_policy: AckPolicy.Explicit,
      deliver_policy: DeliverPolicy.All,
      ack_wait: nanos(settings.ackWaitMs),
      max_deliver: settings.maxDeliver,
      max_ack_pending: 1000,
      num_replicas: settings.replicas,
    });
    logger?.info({ consumer: names.consumer }, "created agent consumer");
  }
  return jsm;
}

/** Opens (creating when missing) the bucket that keeps results for a while. */
export async function openResultBucket(
  nc: NatsConnection,
  names: ResourceNames,
  settings: Pick<QueueSettings, "resultTtlMs" | "replicas">,
): Promise<KV> {
  const kvm = new Kvm(nc);
  return kvm.create(names.resultBucket, {
    history: 1,
    ttl: settings.resultTtlMs,
    replicas: settings.replicas,
  });
}
