import type { Command } from "commander";

import { loadConfig, type ByomConfig } from "../../config/index.js";
import {
  InvalidRequestError,
  PayloadTooLargeError,
} from "../../errors/index.js";
import {
  checkCreateInput,
  checkDeleteInput,
  createPublisher,
  type CreateInstanceInput,
  type DeleteInstanceInput,
  type Publisher,
} from "../../publisher/index.js";
import { connectNats } from "../../transport/index.js";
import { readAtMost } from "../../files/index.js";
import { createRootLogger, failWith, natsOptionsFrom } from "../runtime.js";

interface CommonOptions {
  config?: string;
  json?: boolean;
  timeoutMs?: string;
  requestId?: string;
}

function configOf(options: CommonOptions): ByomConfig {
  return loadConfig(options.config ? { file: options.config } : {});
}

async function withPublisher<T>(
  config: ByomConfig,
  run: (publisher: Publisher) => Promise<T>,
): Promise<T> {
  const logger = createRootLogger({
    ...config,
    logLevel: config.logLevel === "info" ? "warn" : config.logLevel,
  });
  const nc = await connectNats(
    natsOptionsFrom(config, `byom-cli-${config.node}`),
  );
  try {
    const publisher = createPublisher({
      nc,
      names: config.names,
      requestingNode: config.node,
      requestTimeoutMs: config.requestTimeoutMs,
      maxUserDataBytes: config.maxUserDataBytes,
      ...(config.sealingPublicKey
        ? { sealingPublicKey: config.sealingPublicKey }
        : {}),
      logger,
    });
    return await run(publisher);
  } finally {
    await nc.close();
  }
}

function timeoutOf(options: CommonOptions): number | undefined {
  if (options.timeoutMs === undefined) {
    return undefined;
  }
  const value = Number(options.timeoutMs);
  if (!Number.isInteger(value) || value <= 0) {
    throw new InvalidRequestError(
      `--timeout-ms "${options.timeoutMs}" must be a positive integer number of milliseconds`,
    );
  }
  return value;
}

/** `byom create` and `byom delete`: the publisher from a shell. */
export function registerPublishCommands(program: Command): void {
  program
    .command("create")
    .description(
      "provision a pod VM: send a create request and print the instance",
    )
    .requiredOption("--pod <name>", "pod name (DNS-1123)")
    .requiredOption(
      "--sandbox-id <id>",
      "sandbox id; allocation id = <pod>-<sandbox-id>",
    )
    .option("--namespace <ns>", "pod namespace", "default")
    .requiredOption(
      "--user-data <file>",
      "cloud-init #cloud-config file to deliver (at most BYOM_MAX_USER_DATA_BYTES bytes)",
    )
    .option("--request-id <id>", "request id (reuse it to retry safely)")
    .option("--timeout-ms <ms>", "how long to wait for the result")
    .option("-c, --config <file>", "config file (JSON or YAML)")
    .option("--json", "print JSON")
    .action(
      async (
        options: CommonOptions & {
          pod: string;
          sandboxId: string;
          namespace: string;
          userData: string;
        },
      ) => {
        const json = options.json === true;
        try {
          const config = configOf(options);
          const userData = await readUserData(
            options.userData,
            config.maxUserDataBytes,
          );
          const timeoutMs = timeoutOf(options);
          const input: CreateInstanceInput = {
            podName: options.pod,
            podNamespace: options.namespace,
            sandboxId: options.sandboxId,
            userData,
            ...(options.requestId ? { requestId: options.requestId } : {}),
            ...(timeoutMs ? { timeoutMs } : {}),
          };
          checkCreateInput(input);
          const created = await withPublisher(config, (publisher) =>
            publisher.createInstance(input),
          );
          if (json) {
            console.log(JSON.stringify({ ok: true, ...created }));
            return;
          }
          console.log(
            `created ${created.instance.name} (ip ${created.instance.id}) for ${options.namespace}/${options.pod}`,
          );
          console.log(`  allocation  ${created.allocationId}`);
          if (created.hostKey) {
            console.log(
              `  host key    ${created.hostKey.type} ${created.hostKey.fingerprint}`,
            );
          }
          console.log(`  request     ${created.requestId}`);
        } catch (error) {
          failWith(withFlagNames(error), json);
        }
      },
    );

  program
    .command("delete")
    .description(
      "give a pod VM back: reboot trigger, then free once the VM has reset",
    )
    .argument("<ip>", "instance id (the VM's IP) returned by create")
    .option("--allocation-id <id>", "refuse unless this allocation owns the IP")
    .option("--request-id <id>", "request id (reuse it to retry safely)")
    .option("--timeout-ms <ms>", "how long to wait for the result")
    .option("-c, --config <file>", "config file (JSON or YAML)")
    .option("--json", "print JSON")
    .action(
      async (
        ip: string,
        options: CommonOptions & { allocationId?: string },
      ) => {
        const json = options.json === true;
        try {
          const timeoutMs = timeoutOf(options);
          const input: DeleteInstanceInput = {
            instanceId: ip,
            ...(options.allocationId
              ? { allocationId: options.allocationId }
              : {}),
            ...(options.requestId ? { requestId: options.requestId } : {}),
            ...(timeoutMs ? { timeoutMs } : {}),
          };
          checkDeleteInput(input);
          const deleted = await withPublisher(configOf(options), (publisher) =>
            publisher.deleteInstance(input),
          );
          if (json) {
            console.log(JSON.stringify({ ok: true, ...deleted }));
            return;
          }
          const reason = deleted.release.reason
            ? ` (${deleted.release.reason})`
            : "";
          console.log(`deleted ${ip}: VM is ${deleted.release.state}${reason}`);
        } catch (error) {
          failWith(withFlagNames(error), json);
        }
      },
    );
}

/**
 * Reads the --user-data file, at most one byte past the cap so that
 * /dev/zero, a FIFO or a huge file is refused without being read whole.
 * The size is checked here, before the publisher's UTF-8 and cloud-init
 * checks, so an oversized file is reported by its size.
 *
 * @throws InvalidRequestError when the file cannot be read;
 *   PayloadTooLargeError when it holds more than `maxBytes` bytes.
 */
async function readUserData(path: string, maxBytes: number): Promise<Buffer> {
  let content: Buffer;
  try {
    content = await readAtMost(path, maxBytes + 1);
  } catch (error) {
    const reason = (error as NodeJS.ErrnoException).code ?? String(error);
    throw new InvalidRequestError(
      `--user-data "${path}" cannot be read: ${reason}`,
      { cause: error },
    );
  }
  if (content.length > maxBytes) {
    throw new PayloadTooLargeError(
      `--user-data "${path}" is larger than the cap of ${maxBytes} bytes set by BYOM_MAX_USER_DATA_BYTES=${maxBytes} (maxUserDataBytes); nothing was sent`,
    );
  }
  return content;
}

/** The flag or argument that sets each request field. */
const flagOfField: Record<string, string> = {
  podName: "--pod",
  podNamespace: "--namespace",
  sandboxId: "--sandbox-id",
  userData: "--user-data",
  requestId: "--request-id",
  instanceId: "<ip>",
  allocationId: "--allocation-id",
};

/**
 * A request error names protocol fields (`field "podName"`); at the shell
 * the user typed flags: name the flag too.
 */
function withFlagNames(error: unknown): unknown {
  if (!(error instanceof InvalidRequestError)) {
    return error;
  }
  const message = error.message.replace(
    /field "([A-Za-z]+)"/g,
    (text, field: string) =>
      flagOfField[field] === undefined
        ? text
        : `${flagOfField[field]} (field "${field}")`,
  );
  return message === error.message
    ? error
    : new InvalidRequestError(message, { cause: error });
}
