export { connectNats, redactUrls, type NatsConnectOptions } from "./connect.js";
export {
  defaultQueueSettings,
  ensureQueue,
  openResultBucket,
  type QueueSettings,
} from "./resources.js";
export {
  freePort,
  startEmbeddedNats,
  type EmbeddedNats,
  type EmbeddedNatsOptions,
} from "./embedded.js";
