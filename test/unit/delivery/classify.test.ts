import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  classifyConnectError,
  classifySftpError,
  type ConnectFailureContext,
} from "../../../src/delivery/classify.js";
import {
  AuthFailedError,
  DeliveryFailedError,
  HostKeyRejectedError,
  VmUnreachableError,
} from "../../../src/errors/index.js";

const context: ConnectFailureContext = {
  ip: "127.30.0.9",
  port: 22,
  username: "peerpod",
  timeoutMs: 1500,
  clientKey: { type: "ssh-ed25519", fingerprint: "SHA256:client" },
};

/** Fakes an ssh2 error: ssh2 marks its errors with `level` (and sockets with `code`). */
function ssh2Error(message: string, fields: Record<string, unknown>): Error {
  return Object.assign(new Error(message), fields);
}

describe("ssh error classification", () => {
  it("calls refused, unroutable and reset connections unreachable (retryable)", () => {
    for (const code of [
      "ECONNREFUSED",
      "EHOSTUNREACH",
      "ENETUNREACH",
      "ECONNRESET",
    ]) {
      const cause = ssh2Error(`connect ${code} 127.30.0.9:22`, {
        level: "client-socket",
        code,
      });
      const error = classifyConnectError(cause, context);
      assert.ok(error instanceof VmUnreachableError, code);
      assert.equal(error.retryable, true);
      assert.equal(error.cause, cause);
      assert.match(
        error.message,
        new RegExp(`127\\.30\\.0\\.9:22 unreachable: ${code}`),
      );
    }
  });

  it("calls the ready timeout unreachable and names the limit", () => {
    const error = classifyConnectError(
      ssh2Error("Timed out while waiting for handshake", {
        level: "client-timeout",
      }),
      context,
    );
    assert.ok(error instanceof VmUnreachableError);
    assert.match(error.message, /within 1500 ms/);
  });

  it("calls a connection lost before the banner or a server disconnect unreachable", () => {
    const lost = ssh2Error("Connection lost before handshake", {
      level: "protocol",
    });
    const disconnect = ssh2Error("Too many connections", { code: 11 });
    assert.ok(
      classifyConnectError(lost, context) instanceof VmUnreachableError,
    );
    assert.ok(
      classifyConnectError(disconnect, context) instanceof VmUnreachableError,
    );
  });

  it("reports a refused host key with ip, type, fingerprint and the policy's reason", () => {
    const error = classifyConnectError(
      ssh2Error("Host denied (verification failed)", { level: "handshake" }),
      {
        ...context,
        rejection: {
          keyType: "ssh-ed25519",
          fingerprint: "SHA256:abc",
          reason: "not in the allowlist",
        },
      },
    );
    assert.ok(error instanceof HostKeyRejectedError);
    assert.equal(error.retryable, false);
    assert.equal(
      error.message,
      "host key of vm 127.30.0.9 refused: ssh-ed25519 SHA256:abc: not in the allowlist",
    );
  });

  it("calls a missing allowed host key algorithm a host key refusal", () => {
    const error = classifyConnectError(
      ssh2Error("Handshake failed: no matching host key format", {
        level: "handshake",
      }),
      { ...context, offeredHostKeyAlgorithms: ["ssh-rsa"] },
    );
    assert.ok(error instanceof HostKeyRejectedError);
    assert.match(error.message, /allowed types \(ssh-rsa\)/);
  });

  it("fails fast on other handshake failures", () => {
    const error = classifyConnectError(
      ssh2Error("Handshake failed: no matching cipher", { level: "handshake" }),
      context,
    );
    assert.ok(error instanceof DeliveryFailedError);
    assert.equal(error.retryable, false);
  });

  it("reports an auth failure with user and client key fingerprint, not retryable", () => {
    const error = classifyConnectError(
      ssh2Error("All configured authentication methods failed", {
        level: "client-authentication",
      }),
      context,
    );
    assert.ok(error instanceof AuthFailedError);
    assert.equal(error.retryable, false);
    assert.match(
      error.message,
      /as peerpod with the agent's key ssh-ed25519 SHA256:client/,
    );
  });

  it("calls an sftp failure delivery-failed, or unreachable when the connection dropped", () => {
    const cause = ssh2Error("Permission denied", { code: 3 });
    const failed = classifySftpError(cause, {
      ip: "127.30.0.9",
      step: "open temp file",
      connectionLost: false,
    });
    assert.ok(failed instanceof DeliveryFailedError);
    assert.equal(
      failed.message,
      "sftp open temp file on vm 127.30.0.9 failed: Permission denied",
    );
    const dropped = classifySftpError(new Error("No response from server"), {
      ip: "127.30.0.9",
      step: "write temp file",
      connectionLost: true,
    });
    assert.ok(dropped instanceof VmUnreachableError);
  });
});
