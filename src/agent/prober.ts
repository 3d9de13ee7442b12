import { toByomError } from "../errors/index.js";
import { errorFields } from "../logging/index.js";
import { LeaseState } from "../protocol/index.js";
import type { AgentContext } from "./context.js";

/** Quarantine reasons set by an operator start with this; never auto-freed. */
export const operatorReasonPrefix = "operator:";

export interface Prober {
  close(): Promise<void>;
}

/**
 * Every `intervalMs`, tries each quarantined VM (except operator
 * quarantines): once it answers, presents an acceptable host key and has an
 * empty cidata/, it goes back to `free`. Every agent runs one; the
 * compare-and-swap in the lease store settles who does it.
 */
export function startQuarantineProber(options: {
  context: AgentContext;
  intervalMs: number;
}): Prober {
  const { context, intervalMs } = options;
  const log = context.logger.child({ task: "prober" });
  let running: Promise<void> | undefined;
  let stopped = false;

  const tick = async (): Promise<void> => {
    const leases = await context.leases.list();
    const candidates = leases.filter(
      (lease) =>
        lease.record.state === LeaseState.Quarantined &&
        !(lease.record.reason ?? "").startsWith(operatorReasonPrefix),
    );
    let freed = 0;
    for (const lease of candidates) {
      if (stopped) {
        return;
      }
      const ip = lease.record.ip;
      try {
        await context.delivery.probe(ip, { timeoutMs: 1000 });
        const seen = await context.delivery.inspect(ip, {
          timeoutMs: context.connectTimeoutMs,
        });
        if (seen.cidataEntries.length > 0) {
          continue;
        }
        await context.leases.unquarantine(ip);
        freed += 1;
        context.emitter.emit("lease:unquarantined", { ip });
        log.info(
          { ip, fingerprint: seen.hostKey.fingerprint },
          "VM healthy again; back in the pool",
        );
      } catch (error) {
        log.debug(
          { ip, err: errorFields(toByomError(error)) },
          "quarantined VM still unfit",
        );
      }
    }
    context.emitter.emit("prober:pass", {
      checked: candidates.length,
      freed,
    });
  };

  const timer = setInterval(() => {
    if (running !== undefined) {
      return;
    }
    running = tick()
      .catch((error: unknown) =>
        log.warn({ err: errorFields(error) }, "prober pass failed"),
      )
      .finally(() => (running = undefined));
  }, intervalMs);
  timer.unref();

  return {
    async close() {
      stopped = true;
      clearInterval(timer);
      await running;
    },
  };
}
