import type { ByomError } from "../errors/index.js";
import type { Logger } from "../logging/index.js";
import type { RequestKind, Result } from "../protocol/index.js";

/** What an integrator can react to; payloads are plain data. */
export interface AgentEventMap {
  "request:received": { requestId: string; kind: RequestKind | "unknown" };
  "request:done": {
    result: Result;
    durationMs: number;
    /** Create phases: leasing (all tries) and readiness probes. */
    timingsMs?: { lease: number; probe: number };
  };
  "lease:acquired": { ip: string; allocationId: string; existing: boolean };
  "lease:quarantined": { ip: string; reason: string };
  "lease:released": { ip: string };
  "lease:unquarantined": { ip: string };
  /** The host-key allowlist was read again (`ok: false`: kept the last good set). */
  "allowlist:reloaded": {
    ok: boolean;
    keys: number;
    added: string[];
    removed: string[];
  };
  /** One pass of the quarantine prober ended. */
  "prober:pass": { checked: number; freed: number };
  "delivery:done": {
    ip: string;
    bytes: number;
    sha256: string;
    hostKey: { type: string; fingerprint: string };
    /** SSH connection and SFTP upload of the attempt that succeeded. */
    timingsMs: { sshConnect: number; upload: number };
  };
  "delivery:failed": { ip: string; error: ByomError };
}

export type AgentEventName = keyof AgentEventMap;
export type AgentListener<Name extends AgentEventName> = (
  payload: AgentEventMap[Name],
) => void;

/** Subscribe and unsubscribe to agent events. */
export interface AgentEvents {
  on<Name extends AgentEventName>(
    name: Name,
    listener: AgentListener<Name>,
  ): () => void;
}

/** A typed emitter whose listeners cannot break the agent by throwing. */
export class SafeEmitter implements AgentEvents {
  readonly #listeners = new Map<
    AgentEventName,
    Set<(payload: never) => void>
  >();

  constructor(private readonly logger: Logger) {}

  on<Name extends AgentEventName>(
    name: Name,
    listener: AgentListener<Name>,
  ): () => void {
    const set = this.#listeners.get(name) ?? new Set();
    set.add(listener as (payload: never) => void);
    this.#listeners.set(name, set);
    return () => set.delete(listener as (payload: never) => void);
  }

  emit<Name extends AgentEventName>(
    name: Name,
    payload: AgentEventMap[Name],
  ): void {
    for (const listener of this.#listeners.get(name) ?? []) {
      try {
        (listener as AgentListener<Name>)(payload);
      } catch (error) {
        this.logger.warn({ err: error, event: name }, "event listener threw");
      }
    }
  }
}
