/**
 * Observability of the agent: Prometheus metrics (`byom_*`) fed by the
 * agent's events and the NATS client's status, and an HTTP server for
 * `/metrics`, `/healthz` and `/readyz`.
 */
export {
  createMetrics,
  metricPrefix,
  okCode,
  Phase,
  type CreateMetricsOptions,
  type Metrics,
  type NatsWatch,
  type PhaseTimingsMs,
} from "./metrics.js";
export {
  readiness,
  startHealthServer,
  type HealthServer,
  type HealthServerOptions,
  type ReadinessChecks,
} from "./health.js";
