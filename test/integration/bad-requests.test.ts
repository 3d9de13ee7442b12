import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { after, before, describe, it } from "node:test";

import { jetstream } from "@nats-io/jetstream";
import { createInbox, headers } from "@nats-io/transport-node";

import {
  Header,
  requestSubject,
  type RequestKind,
  type Result,
} from "../../src/protocol/index.js";
import {
  assertInvariants,
  sha256,
  watchResults,
  type ResultWatch,
} from "../helpers/request-invariants.js";
import { startStack, type TestStack } from "../helpers/stack.js";
import { waitFor } from "../helpers/wait.js";

const corpusDir = new URL("../fixtures/bad-requests/", import.meta.url);
const userDataDir = new URL("../fixtures/userdata/", import.meta.url);

/** One file of the corpus; see test/fixtures/bad-requests/README.md. */
interface BadRequest {
  what?: string;
  subject: RequestKind;
  payload?: unknown;
  payloadText?: string;
  payloadBase64?: string;
  userDataFile?: string;
  expect: string;
}

async function loadCorpus(): Promise<Array<[string, BadRequest]>> {
  const files = (await readdir(corpusDir))
    .filter((name) => name.endsWith(".json"))
    .sort();
  return Promise.all(
    files.map(async (name): Promise<[string, BadRequest]> => [
      name.replace(/\.json$/, ""),
      JSON.parse(
        await readFile(new URL(name, corpusDir), "utf8"),
      ) as BadRequest,
    ]),
  );
}

describe("bad requests: a corpus of malformed and invalid messages", () => {
  let stack: TestStack;
  let watch: ResultWatch;
  let basicUserData: string;
  const requestIds: string[] = [];
  const delivered = new Set<string>();
  const live: Record<string, string> = {};

  before(async () => {
    stack = await startStack({
      vms: 2,
      firstIp: "127.47.0.2",
      prefix: "badreq",
      agent: { concurrency: 4 },
    });
    watch = watchResults(stack.clientConnection);
    basicUserData = await readFile(
      new URL("pod-basic.yaml", userDataDir),
      "utf8",
    );
  });

  after(async () => {
    watch?.close();
    await stack?.close();
  });

  async function encode(id: string, entry: BadRequest): Promise<Uint8Array> {
    if (entry.payloadText !== undefined) {
      return new TextEncoder().encode(entry.payloadText);
    }
    if (entry.payloadBase64 !== undefined) {
      return new Uint8Array(Buffer.from(entry.payloadBase64, "base64"));
    }
    let payload = entry.payload;
    if (entry.userDataFile !== undefined) {
      payload = {
        v: 1,
        kind: "create",
        requestId: "$ID",
        podName: "web-1",
        podNamespace: "default",
        sandboxId: "s1",
        requestingNode: "node-a",
        deadline: "$DEADLINE",
        userData: await readFile(new URL(entry.userDataFile, userDataDir), {
          encoding: "utf8",
        }),
      };
    }
    const deadline = new Date(Date.now() + 60_000).toISOString();
    const text = JSON.stringify(payload)
      .replaceAll('"$ID"', JSON.stringify(id))
      .replaceAll('"$DEADLINE"', JSON.stringify(deadline))
      .replaceAll('"$USERDATA"', JSON.stringify(basicUserData));
    return new TextEncoder().encode(text);
  }

  /** Publishes raw bytes as a request and waits for its one result. */
  async function send(
    id: string,
    subject: RequestKind,
    payload: Uint8Array,
  ): Promise<Result> {
    const inbox = createInbox();
    const subscription = stack.clientConnection.subscribe(inbox, {
      max: 1,
      timeout: 10_000,
    });
    const requestHeaders = headers();
    requestHeaders.set(Header.ReplyTo, inbox);
    await jetstream(stack.clientConnection).publish(
      requestSubject(stack.names, subject),
      payload,
      { headers: requestHeaders, msgID: id },
    );
    requestIds.push(id);
    for await (const message of subscription) {
      return message.json<Result>();
    }
    throw new Error(`no result for ${id}`);
  }

  it("holds at least 50 cases, each naming a field or the message and a rule", async () => {
    const corpus = await loadCorpus();
    assert.ok(corpus.length >= 50, `${corpus.length} cases`);
    for (const [name, entry] of corpus) {
      assert.ok(
        entry.subject === "create" || entry.subject === "delete",
        `${name}: subject`,
      );
      assert.ok(/field|message/.test(entry.expect), `${name}: expect`);
    }
  });

  it("answers every case INVALID_REQUEST with its message, leasing nothing", async () => {
    const corpus = await loadCorpus();
    const mismatches: string[] = [];
    // Several at once, as the agent serves them with its concurrency.
    await Promise.all(
      corpus.map(async ([name, entry]) => {
        const id = `bad-${name}`;
        const result = await send(id, entry.subject, await encode(id, entry));
        const message = result.ok ? "(ok)" : result.error.message;
        if (
          result.ok ||
          result.error.code !== "INVALID_REQUEST" ||
          result.error.retryable ||
          !new RegExp(entry.expect).test(message) ||
          result.requestId !== id
        ) {
          mismatches.push(
            `${name}: ${result.ok ? "ok" : result.error.code} "${message}" !~ /${entry.expect}/`,
          );
        }
      }),
    );

    assert.deepEqual(mismatches, []);
    assert.equal(stack.agent.status().running, true);
    await assertInvariants({
      leases: stack.agent.leases,
      sandbox: stack.vms.sandbox,
      watch,
      requestIds,
      live,
      delivered,
    });
  });

  it("still serves a valid create and delete afterwards", async () => {
    const created = await stack.publisher.createInstance({
      podName: "after-bad",
      sandboxId: "s1",
      userData: basicUserData,
      requestId: "good-create",
    });
    requestIds.push("good-create");
    delivered.add(sha256(basicUserData));
    live[created.instance.id] = created.allocationId;
    await assertInvariants({
      leases: stack.agent.leases,
      sandbox: stack.vms.sandbox,
      watch,
      requestIds,
      live,
      delivered,
    });

    const deleted = await stack.publisher.deleteInstance({
      instanceId: created.instance.id,
      allocationId: created.allocationId,
      requestId: "good-delete",
    });
    requestIds.push("good-delete");
    assert.equal(deleted.release.state, "releasing");
    await waitFor(
      async () =>
        (await stack.agent.leases.get(created.instance.id))?.record.state ===
        "free",
      { timeoutMs: 20_000, what: `${created.instance.id} free again` },
    );
    delete live[created.instance.id];
    await assertInvariants({
      leases: stack.agent.leases,
      sandbox: stack.vms.sandbox,
      watch,
      requestIds,
      live,
      delivered,
    });
  });
});
