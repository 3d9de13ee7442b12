/** What a suite gets and gives back. */

export interface SuiteOptions {
  /** Short durations and few runs: a smoke test of the bench itself. */
  quick: boolean;
  /** Record an agent CPU profile where a suite supports it. */
  profile: boolean;
  /** Where profiles go (git-ignored). */
  profileDir: string;
}

export interface SuiteResult {
  /** Markdown section body (tables and notes), without its heading. */
  markdown: string;
  /** One line per target: "<target>: met/MISSED (<figures>)". */
  targets: string[];
}

export interface Suite {
  id: string;
  title: string;
  run(options: SuiteOptions): Promise<SuiteResult>;
}

/** Prints a progress line on stderr with the time since the bench began. */
export function progress(message: string): void {
  const seconds = (performance.now() / 1000).toFixed(0).padStart(4);
  console.error(`[${seconds}s] ${message}`);
}
