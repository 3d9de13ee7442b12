import { randomUUID } from "node:crypto";

import { jetstream, type JetStreamClient } from "@nats-io/jetstream";
import { Kvm, type KV } from "@nats-io/kv";
import {
  createInbox,
  headers,
  type NatsConnection,
  type Subscription,
} from "@nats-io/transport-node";

import {
  ByomError,
  InvalidRequestError,
  PayloadTooLargeError,
  UnavailableError,
  isErrorCode,
  ErrorCode,
} from "../errors/index.js";
import { errorFields, silentLogger, type Logger } from "../logging/index.js";
import {
  Header,
  PROTOCOL_VERSION,
  RequestKind,
  canonicalIp,
  parseUserData,
  decodeResult,
  requestDigest,
  requestSubject,
  showValue,
  validateRequest,
  type CreateRequest,
  type DeleteRequest,
  type Instance,
  type Request,
  type ResourceNames,
  type Result,
  type SuccessResult,
} from "../protocol/index.js";
import { sealUserData } from "../sealing/index.js";

/** Options of a publisher (the CAA side). */
export interface PublisherOptions {
  /** A connected NATS client; the publisher does not close it. */
  nc: NatsConnection;
  names: ResourceNames;
  /** Node of the CAA that sends the requests. */
  requestingNode: string;
  /** Default wait for a result, also the request deadline; default 120 000 ms. */
  requestTimeoutMs?: number;
  /** Cap on user-data bytes besides the server's max_payload; default 1 MiB. */
  maxUserDataBytes?: number;
  /**
   * The agents' xkey public key (`X...`, `BYOM_SEALING_PUBLIC_KEY`). When
   * set, user-data travels sealed (`userDataSealed`) and the broker never
   * holds it in clear.
   */
  sealingPublicKey?: string;
  logger?: Logger;
}

export interface CreateInstanceInput {
  podName: string;
  podNamespace?: string;
  sandboxId: string;
  /** cloud-init user-data; bytes must be UTF-8. */
  userData: string | Uint8Array;
  /** Default: a new UUID. Reuse it to retry the same request safely. */
  requestId?: string;
  timeoutMs?: number;
}

export interface DeleteInstanceInput {
  /** The instance id (IP) returned by create. */
  instanceId: string;
  allocationId?: string;
  requestId?: string;
  timeoutMs?: number;
}

export interface CreatedInstance {
  requestId: string;
  allocationId: string;
  instance: Instance;
  hostKey?: { type: string; fingerprint: string };
}

export interface DeletedInstance {
  requestId: string;
  instanceId: string;
  release: { state: string; reason?: string };
}

/** Sends requests to the agents and waits for their results. */
export interface Publisher {
  /** Provisions a pod VM. Throws ByomError with the agent's error code. */
  createInstance(input: CreateInstanceInput): Promise<CreatedInstance>;
  /** Gives a pod VM back. Throws ByomError (e.g. NOT_OWNER). */
  deleteInstance(input: DeleteInstanceInput): Promise<DeletedInstance>;
  /** The stored result of a request, if any agent answered it. */
  status(requestId: string): Promise<Result | undefined>;
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/**
 * Checks a create's fields and user-data as the agents will, without NATS,
 * so that a caller (the CLI) can refuse bad input before connecting. The
 * size against max_payload is checked when sending.
 *
 * @throws InvalidRequestError naming the field, the value and the rule.
 */
export function checkCreateInput(input: CreateInstanceInput): void {
  const userData = decodeUserData(input.userData);
  parseUserData(userData, { requireHeader: true });
  validateRequest({ ...createRequestOf(input, "check", 60_000), userData });
}

/** {@link checkCreateInput} for a delete. */
export function checkDeleteInput(input: DeleteInstanceInput): void {
  validateRequest({ ...deleteRequestOf(input, "check", 60_000) });
}

/** A create without its user-data, which goes in clear or sealed. */
function createRequestOf(
  input: CreateInstanceInput,
  requestingNode: string,
  timeoutMs: number,
): Omit<CreateRequest, "userData" | "userDataSealed"> {
  return {
    v: PROTOCOL_VERSION,
    kind: RequestKind.Create,
    requestId: input.requestId ?? randomUUID(),
    podName: input.podName,
    podNamespace: input.podNamespace ?? "default",
    sandboxId: input.sandboxId,
    requestingNode,
    deadline: new Date(Date.now() + timeoutMs).toISOString(),
  };
}

function deleteRequestOf(
  input: DeleteInstanceInput,
  requestingNode: string,
  timeoutMs: number,
): DeleteRequest {
  if (canonicalIp(input.instanceId) === undefined) {
    throw new InvalidRequestError(
      `field "instanceId" must be an IP address (got ${showValue(input.instanceId)})`,
    );
  }
  return {
    v: PROTOCOL_VERSION,
    kind: RequestKind.Delete,
    requestId: input.requestId ?? randomUUID(),
    instanceId: input.instanceId,
    ...(input.allocationId ? { allocationId: input.allocationId } : {}),
    requestingNode,
    deadline: new Date(Date.now() + timeoutMs).toISOString(),
  };
}

/** Wait past the timeout, for an answer sent just in time. */
const graceMs = 2000;
/** First read of the result bucket while waiting for an answer. */
const firstResultPollMs = 1000;

function nextPollMs(pollMs: number): number {
  return Math.min(Math.max(pollMs * 2, 500), 5000);
}

/** Creates a publisher over an existing NATS connection. */
export function createPublisher(options: PublisherOptions): Publisher {
  return new PublisherImpl(options);
}

class PublisherImpl implements Publisher {
  readonly #options: PublisherOptions;
  readonly #js: JetStreamClient;
  readonly #logger: Logger;
  #results: Promise<KV> | undefined;
  #closed = false;

  constructor(options: PublisherOptions) {
    this.#options = options;
    this.#js = jetstream(options.nc);
    this.#logger = (options.logger ?? silentLogger()).child({
      component: "publisher",
    });
  }

  async createInstance(input: CreateInstanceInput): Promise<CreatedInstance> {
    // Size first: a large binary is too large before it is bad UTF-8.
    const userDataBytes =
      typeof input.userData === "string"
        ? Buffer.byteLength(input.userData, "utf8")
        : input.userData.byteLength;
    this.#checkUserDataSize(userDataBytes);
    const userData = decodeUserData(input.userData);
    const timeoutMs =
      input.timeoutMs ?? this.#options.requestTimeoutMs ?? 120_000;
    // The agent checks it too; checking here fails fast, with no agent needed.
    parseUserData(userData, { requireHeader: true });
    const sealingKey = this.#options.sealingPublicKey;
    const request: CreateRequest = {
      ...createRequestOf(input, this.#options.requestingNode, timeoutMs),
      ...(sealingKey
        ? { userDataSealed: sealUserData(userData, sealingKey) }
        : { userData }),
    };
    const result = await this.#send(request, timeoutMs, userDataBytes);
    if (result.instance === undefined || result.allocationId === undefined) {
      throw new UnavailableError(
        `result of ${request.requestId} names no instance`,
      );
    }
    return {
      requestId: request.requestId,
      allocationId: result.allocationId,
      instance: result.instance,
      ...(result.hostKey ? { hostKey: result.hostKey } : {}),
    };
  }

  async deleteInstance(input: DeleteInstanceInput): Promise<DeletedInstance> {
    const timeoutMs =
      input.timeoutMs ?? this.#options.requestTimeoutMs ?? 120_000;
    const request = deleteRequestOf(
      input,
      this.#options.requestingNode,
      timeoutMs,
    );
    const result = await this.#send(request, timeoutMs);
    return {
      requestId: request.requestId,
      instanceId: input.instanceId,
      release: result.release ?? { state: "unknown" },
    };
  }

  async status(requestId: string): Promise<Result | undefined> {
    const entry = await (await this.#resultBucket()).get(requestId);
    if (entry === null || entry.operation !== "PUT") {
      return undefined;
    }
    return decodeResult(entry.value);
  }

  /** The NATS server's max_payload, from its INFO; 1 MiB when unknown. */
  #maxPayload(): number {
    return this.#options.nc.info?.max_payload ?? 1024 * 1024;
  }

  /** The cap check, before sealing or encoding anything. */
  #checkUserDataSize(bytes: number): void {
    const cap = this.#options.maxUserDataBytes ?? 1024 * 1024;
    if (bytes > cap) {
      throw new PayloadTooLargeError(
        `user-data is ${bytes} bytes; the configured cap (BYOM_MAX_USER_DATA_BYTES) is ${cap} bytes (the NATS server's max_payload is ${this.#maxPayload()} bytes); nothing was sent`,
      );
    }
  }

  async #send(
    request: Request,
    timeoutMs: number,
    userDataBytes?: number,
  ): Promise<SuccessResult> {
    if (this.#closed) {
      throw new UnavailableError("publisher is closed");
    }
    validateRequest(request as unknown as Record<string, unknown>);
    const payload = new TextEncoder().encode(JSON.stringify(request));
    const maxPayload = this.#maxPayload();
    if (payload.length > maxPayload) {
      const inside =
        userDataBytes === undefined
          ? ""
          : ` (user-data ${userDataBytes} bytes${request.kind === RequestKind.Create && request.userDataSealed ? ", sealed" : ""})`;
      throw new PayloadTooLargeError(
        `encoded request is ${payload.length} bytes${inside}; the NATS server's max_payload is ${maxPayload} bytes; nothing was sent`,
      );
    }

    const log = this.#logger.child({
      requestId: request.requestId,
      kind: request.kind,
    });
    const inbox = createInbox();
    const subscription = this.#options.nc.subscribe(inbox, { max: 1 });
    try {
      const reply = firstMessage(subscription);
      const requestHeaders = headers();
      requestHeaders.set(Header.ReplyTo, inbox);
      const ack = await this.#js.publish(
        requestSubject(this.#options.names, request.kind),
        payload,
        {
          msgID: request.requestId,
          headers: requestHeaders,
          timeout: Math.min(timeoutMs, 10_000),
        },
      );
      log.debug(
        { bytes: payload.length, duplicate: ack.duplicate },
        "request published",
      );

      const result = await this.#awaitResult(
        reply,
        request.requestId,
        timeoutMs + graceMs,
        // A duplicate was answered (or is being served) for an earlier
        // send, to that send's inbox: read the result bucket at once.
        ack.duplicate ? 0 : firstResultPollMs,
      );
      if (result === undefined) {
        throw new UnavailableError(
          `no result for request ${request.requestId} within ${timeoutMs} ms; is an agent running? (retry with the same request id)`,
        );
      }
      expectSameRequest(request, result);
      return expectSuccess(result);
    } catch (error) {
      if (error instanceof ByomError) {
        throw error;
      }
      log.warn({ err: errorFields(error) }, "request could not be sent");
      const reason = error instanceof Error ? error.message : String(error);
      throw new UnavailableError(
        `could not send request ${request.requestId}: ${reason}`,
        {
          cause: error,
        },
      );
    } finally {
      subscription.unsubscribe();
    }
  }

  /**
   * The result of `requestId`: from the reply subject, or from the result
   * bucket, read after `firstPollMs` and then at growing intervals. An
   * agent does not answer again a request answered before (a retry with
   * the same id, an id used before): its answer is only in the bucket.
   */
  async #awaitResult(
    reply: Promise<Uint8Array | undefined>,
    requestId: string,
    waitMs: number,
    firstPollMs: number,
  ): Promise<Result | undefined> {
    const until = Date.now() + waitMs;
    for (let pollMs = firstPollMs; ; pollMs = nextPollMs(pollMs)) {
      const data = await withTimeout(
        reply,
        Math.max(0, Math.min(pollMs, until - Date.now())),
      );
      if (data !== undefined) {
        return decodeResult(data);
      }
      if (Date.now() >= until) {
        // A failed last read is no answer either: the caller says so.
        return this.status(requestId).catch(() => undefined);
      }
      // NATS trouble on a read here is not the request's failure: the
      // reply or a later read may still come.
      const stored = await this.status(requestId).catch(() => undefined);
      if (stored !== undefined) {
        return stored;
      }
    }
  }

  #resultBucket(): Promise<KV> {
    this.#results ??= new Kvm(this.#options.nc).open(
      this.#options.names.resultBucket,
    );
    return this.#results;
  }

  async close(): Promise<void> {
    this.#closed = true;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

function decodeUserData(userData: string | Uint8Array): string {
  if (typeof userData === "string") {
    return userData;
  }
  try {
    return utf8.decode(userData);
  } catch (error) {
    throw new InvalidRequestError('field "userData" must be valid UTF-8', {
      cause: error,
    });
  }
}

async function firstMessage(
  subscription: Subscription,
): Promise<Uint8Array | undefined> {
  for await (const message of subscription) {
    return message.data;
  }
  return undefined;
}

async function withTimeout<T>(
  promise: Promise<T>,
  timeoutMs: number,
): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), timeoutMs);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A result under this request id that answered another request (the id
 * was used before) is refused: printing it would name the wrong pod.
 */
function expectSameRequest(request: Request, result: Result): void {
  if (
    result.requestDigest === undefined ||
    result.requestDigest === requestDigest(request)
  ) {
    return;
  }
  const answered =
    result.kind === undefined
      ? "another request"
      : `another ${result.kind}${result.ok && result.allocationId ? ` (allocation ${result.allocationId})` : ""}`;
  throw new InvalidRequestError(
    `request id ${request.requestId} was used before for ${answered}; send this ${request.kind} with a new request id`,
  );
}

function expectSuccess(result: Result): SuccessResult {
  if (result.ok) {
    return result;
  }
  const code = isErrorCode(result.error.code)
    ? result.error.code
    : ErrorCode.Internal;
  throw new ByomError(code, result.error.message, {
    retryable: result.error.retryable,
  });
}
