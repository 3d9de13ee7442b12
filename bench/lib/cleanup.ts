/**
 * Everything a bench run starts is registered here and undone in reverse
 * order: at the end of a suite, on an error, and on SIGINT/SIGTERM.
 */

type Step = { what: string; run: () => Promise<unknown> };

const steps: Step[] = [];
let handlersInstalled = false;

/** Registers an undo step; returns a function that runs it once, now. */
export function onCleanup(
  what: string,
  run: () => Promise<unknown>,
): () => Promise<void> {
  const step: Step = { what, run };
  steps.push(step);
  return async () => {
    const index = steps.indexOf(step);
    if (index < 0) {
      return;
    }
    steps.splice(index, 1);
    await attempt(step);
  };
}

/** Runs every registered step, newest first; never throws. */
export async function cleanupAll(): Promise<void> {
  for (let step = steps.pop(); step !== undefined; step = steps.pop()) {
    await attempt(step);
  }
}

async function attempt(step: Step): Promise<void> {
  try {
    await step.run();
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    console.error(`cleanup: ${step.what} failed: ${reason}`);
  }
}

/** Cleans up and exits on SIGINT/SIGTERM. */
export function installSignalHandlers(): void {
  if (handlersInstalled) {
    return;
  }
  handlersInstalled = true;
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    process.once(signal, () => {
      console.error(`\n${signal}: cleaning up`);
      void cleanupAll().finally(() => process.exit(130));
    });
  }
  for (const event of ["uncaughtException", "unhandledRejection"] as const) {
    process.once(event, (error: unknown) => {
      console.error(`${event}:`, error);
      void cleanupAll().finally(() => process.exit(1));
    });
  }
}
