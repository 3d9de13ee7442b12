import type { Delivery } from "../delivery/index.js";
import type { LeaseStore } from "../lease/index.js";
import type { Logger } from "../logging/index.js";
import type { SealedUserData } from "../protocol/index.js";
import type { SafeEmitter } from "./events.js";

/** What the handlers need from the agent. */
export interface AgentContext {
  readonly agentId: string;
  readonly leases: LeaseStore;
  readonly delivery: Delivery;
  readonly emitter: SafeEmitter;
  readonly logger: Logger;
  readonly releaseTimeoutMs: number;
  /** True once the agent is shutting down: unfinished work is handed back. */
  readonly closing: () => boolean;
  readonly readinessTimeoutMs: number;
  readonly connectTimeoutMs: number;
  /** Opens `userDataSealed`; absent when the agent has no sealing seed. */
  readonly unseal?: (sealed: SealedUserData) => string;
  /** Refuse user-data sent in clear. */
  readonly requireSealed: boolean;
  /**
   * How long a step that only NATS trouble can fail (an answer, freeing a
   * reset VM's lease) is retried before the request is handed back.
   */
  readonly natsRetryMs: number;
  /** Whether a request has a stored result (false without a result bucket). */
  readonly answered: (requestId: string) => Promise<boolean>;
}
