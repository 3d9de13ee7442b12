import {
  createServer,
  type IncomingMessage,
  type ServerResponse,
} from "node:http";
import type { AddressInfo } from "node:net";

import { errorFields, silentLogger, type Logger } from "../logging/index.js";
import type { Metrics } from "./metrics.js";

/** What readiness is made of; each check is read at every `/readyz`. */
export interface ReadinessChecks {
  /** The NATS client holds a connection. */
  nats: boolean;
  /** The agent pulls from the shared durable consumer. */
  consumer: boolean;
  /** The host-key policy can accept a VM (always true in TOFU mode). */
  allowlist: { ok: boolean; reason?: string };
}

export interface HealthServerOptions {
  /** TCP port; 0 picks a free one (see the returned `port`). */
  port: number;
  /** Address to bind; default `0.0.0.0` (the kubelet probes the pod IP). */
  host?: string;
  metrics: Metrics;
  checks: () => ReadinessChecks;
  logger?: Logger;
}

/** A running HTTP server for `/metrics`, `/healthz` and `/readyz`. */
export interface HealthServer {
  /** The port it listens on. */
  readonly port: number;
  /** Stops listening and ends open connections; idempotent. */
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** The readiness verdict: ready, or the reasons why not. */
export function readiness(checks: ReadinessChecks): {
  ready: boolean;
  reasons: string[];
} {
  const reasons: string[] = [];
  if (!checks.nats) {
    reasons.push("nats: not connected");
  }
  if (!checks.consumer) {
    reasons.push("consumer: not bound");
  }
  if (!checks.allowlist.ok) {
    reasons.push(
      `allowlist: ${checks.allowlist.reason ?? "no usable host key"}`,
    );
  }
  return { ready: reasons.length === 0, reasons };
}

/**
 * Serves `GET /metrics` (Prometheus text), `GET /healthz` (200 while the
 * process runs) and `GET /readyz` (200, or 503 with the reasons as JSON).
 * Rejects with the listen error (for example EADDRINUSE).
 */
export async function startHealthServer(
  options: HealthServerOptions,
): Promise<HealthServer> {
  const logger = (options.logger ?? silentLogger()).child({
    component: "http",
  });
  const server = createServer((request, response) => {
    handle(options, request, response).catch((error: unknown) => {
      logger.warn(
        { err: errorFields(error), url: request.url },
        "request failed",
      );
      if (!response.headersSent) {
        sendJson(response, 500, { error: "internal error" });
      } else {
        response.destroy();
      }
    });
  });

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port, options.host ?? "0.0.0.0", () => {
      server.off("error", reject);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  logger.info(
    { port, host: options.host ?? "0.0.0.0" },
    "HTTP server listening",
  );

  let closing: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closing ??= new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    });
    return closing;
  };
  return { port, close, [Symbol.asyncDispose]: close };
}

async function handle(
  options: HealthServerOptions,
  request: IncomingMessage,
  response: ServerResponse,
): Promise<void> {
  const path = new URL(request.url ?? "/", "http://localhost").pathname;
  if (request.method !== "GET" && request.method !== "HEAD") {
    response.setHeader("allow", "GET, HEAD");
    sendJson(response, 405, { error: "method not allowed" });
    return;
  }

  switch (path) {
    case "/metrics": {
      const body = await options.metrics.render();
      response.writeHead(200, { "content-type": options.metrics.contentType });
      response.end(request.method === "HEAD" ? undefined : body);
      return;
    }
    case "/healthz":
      sendJson(response, 200, { status: "ok" });
      return;
    case "/readyz": {
      const checks = options.checks();
      const verdict = readiness(checks);
      sendJson(response, verdict.ready ? 200 : 503, {
        status: verdict.ready ? "ready" : "not ready",
        reasons: verdict.reasons,
        checks,
      });
      return;
    }
    default:
      sendJson(response, 404, { error: `no such path: ${path}` });
  }
}

function sendJson(
  response: ServerResponse,
  status: number,
  body: unknown,
): void {
  const text = JSON.stringify(body);
  response.writeHead(status, {
    "content-type": "application/json; charset=utf-8",
    "cache-control": "no-store",
  });
  response.end(text);
}
