import convict from "convict";

import { DefaultNames } from "../protocol/index.js";

/** pino levels accepted by `BYOM_LOG_LEVEL`. */
export const LogLevels = [
  "fatal",
  "error",
  "warn",
  "info",
  "debug",
  "trace",
  "silent",
] as const;
export type LogLevel = (typeof LogLevels)[number];

/** Log output formats accepted by `BYOM_LOG_FORMAT`. */
export const LogFormats = ["json", "pretty"] as const;
export type LogFormat = (typeof LogFormats)[number];

/** Values of `BYOM_REQUIRE_SEALED`: auto = required when a seed file is set. */
export const RequireSealedChoices = ["auto", "true", "false"] as const;
export type RequireSealed = (typeof RequireSealedChoices)[number];

/** Schemes a `NATS_URL` entry may use. */
const natsSchemes = ["nats:", "tls:", "ws:", "wss:"];

/**
 * The settable values, one per schema key, after validation. Units are in
 * the names; text values are trimmed except secrets.
 */
export interface ByomSettings {
  vmPoolIps: string;
  maxRangeIps: number;
  sshUsername: string;
  sshPubKeyPath: string;
  sshPrivKeyPath: string;
  sshPrivKeyPassphrase: string;
  sshTimeoutSeconds: number;
  sshPort: number;
  sshHostKeyAllowlistDir: string;
  nodeName: string;
  natsUrl: string;
  natsCredsFile: string;
  natsUser: string;
  natsPassword: string;
  natsToken: string;
  natsNkeySeedFile: string;
  natsTlsCa: string;
  natsTlsCert: string;
  natsTlsKey: string;
  subjectPrefix: string;
  stream: string;
  consumer: string;
  leaseBucket: string;
  resultBucket: string;
  concurrency: number;
  ackWaitMs: number;
  maxDeliver: number;
  requestMaxAgeMs: number;
  releaseTimeoutMs: number;
  shutdownTimeoutMs: number;
  quarantineProbeIntervalMs: number;
  allowlistReloadIntervalMs: number;
  replicas: number;
  requestTimeoutMs: number;
  maxUserDataBytes: number;
  sealingPublicKey: string;
  sealingSeedFile: string;
  requireSealed: RequireSealed;
  logLevel: LogLevel;
  logFormat: LogFormat;
  httpPort: number;
}

export type SettingKey = keyof ByomSettings;

/** Longest timer Node accepts (2^31 - 1 ms, about 24.8 days). */
const maxTimerMs = 2_147_483_647;

/**
 * One schema entry. Besides convict's fields it carries `rule` (the text
 * of the error when the value is refused) and, for integers, `min`/`max`.
 */
interface Entry<T> {
  doc: string;
  format: string;
  default: T;
  env: string;
  rule: string;
  sensitive?: boolean;
  min?: number;
  max?: number;
  choices?: readonly string[];
}

function integer(
  env: string,
  value: number,
  min: number,
  max: number,
  rule: string,
  doc: string,
): Entry<number> {
  return { doc, format: "byom-int", default: value, env, rule, min, max };
}

function milliseconds(
  env: string,
  value: number,
  min: number,
  doc: string,
): Entry<number> {
  const rule = `must be an integer number of milliseconds from ${min} to ${maxTimerMs}`;
  return integer(env, value, min, maxTimerMs, rule, doc);
}

function text(env: string, value: string, doc: string): Entry<string> {
  return {
    doc,
    format: "byom-text",
    default: value,
    env,
    rule: "must be text",
  };
}

function path(env: string, value: string, doc: string): Entry<string> {
  return {
    doc,
    format: "byom-required-text",
    default: value,
    env,
    rule: "must be a non-empty file path",
  };
}

function secret(env: string, doc: string): Entry<string> {
  return {
    doc,
    format: "byom-secret",
    default: "",
    env,
    rule: "must be text",
    sensitive: true,
  };
}

function resourceName(env: string, value: string, doc: string): Entry<string> {
  return {
    doc,
    format: "byom-nats-name",
    default: value,
    env,
    rule: "must be 1 to 255 characters of A-Z a-z 0-9 _ - (no dots, spaces or wildcards)",
  };
}

/**
 * The schema, as a function so that nothing is built at import time. Key
 * order is the order of the docs and of `byom config check`.
 */
function schemaDefinition(): { [K in SettingKey]: Entry<ByomSettings[K]> } {
  return {
    vmPoolIps: {
      doc: "VM IPs of the pool: comma-separated addresses and start-end ranges, IPv4 or IPv6 (in a file, a list of entries also works)",
      format: "byom-text",
      default: "",
      env: "VM_POOL_IPS",
      rule: "must be a comma-separated list of IP addresses and start-end ranges",
    },
    maxRangeIps: integer(
      "MAX_RANGE_IPS",
      100,
      1,
      65_536,
      "must be an integer from 1 to 65536",
      "Most addresses taken from one start-end range of VM_POOL_IPS; the rest of the range is dropped with a warning",
    ),
    sshUsername: {
      doc: "SSH user on the pod VMs (SFTP-only, chrooted)",
      format: "byom-username",
      default: "peerpod",
      env: "SSH_USERNAME",
      rule: "must be a non-empty user name without spaces, ':' or '/'",
    },
    sshPubKeyPath: path(
      "SSH_PUB_KEY_PATH",
      "/root/.ssh/id_rsa.pub",
      "Public key file of the SSH client key; accepted for the upstream name, not read (the agent derives the public key from SSH_PRIV_KEY_PATH; `byom config check --agent` prints its fingerprint)",
    ),
    sshPrivKeyPath: path(
      "SSH_PRIV_KEY_PATH",
      "/root/.ssh/id_rsa",
      "Private key file of the SSH client key (OpenSSH, PKCS#1 or SEC1)",
    ),
    sshPrivKeyPassphrase: secret(
      "SSH_PRIV_KEY_PASSPHRASE",
      "Passphrase of the private key; empty when the key is not encrypted",
    ),
    sshTimeoutSeconds: integer(
      "SSH_TIMEOUT",
      30,
      1,
      86_400,
      "must be a positive integer number of seconds (at most 86400)",
      "SSH connect, handshake and authentication timeout, in seconds (the upstream unit)",
    ),
    sshPort: integer(
      "SSH_PORT",
      22,
      1,
      65_535,
      "must be a port number from 1 to 65535",
      "SSH port of the pod VMs",
    ),
    sshHostKeyAllowlistDir: text(
      "SSH_HOST_KEY_ALLOWLIST_DIR",
      "",
      "Directory of *.pub files listing the accepted VM host keys; empty means trust on first use (TOFU)",
    ),
    nodeName: text(
      "NODE_NAME",
      "",
      "Name of this node; empty means /etc/podinfo/nodename, then /etc/hostname, then the host name",
    ),
    natsUrl: {
      doc: "NATS server URLs, comma-separated; each nats://, tls://, ws:// or wss:// with host[:port]",
      format: "byom-nats-urls",
      default: "nats://127.0.0.1:4222",
      env: "NATS_URL",
      rule: "must be a comma-separated list of nats://, tls://, ws:// or wss:// URLs with host[:port]",
    },
    natsCredsFile: text(
      "NATS_CREDS",
      "",
      "NATS credentials file (JWT and nkey seed); empty for none",
    ),
    natsUser: text("NATS_USER", "", "NATS user name; empty for none"),
    natsPassword: secret("NATS_PASSWORD", "NATS password for NATS_USER"),
    natsToken: secret("NATS_TOKEN", "NATS authentication token"),
    natsNkeySeedFile: text(
      "NATS_NKEY_SEED_FILE",
      "",
      "File holding the NATS user's nkey seed (SU...) for nkey authentication; empty for none",
    ),
    natsTlsCa: text(
      "NATS_TLS_CA",
      "",
      "CA certificate file to verify the NATS server; empty for the system CAs",
    ),
    natsTlsCert: text(
      "NATS_TLS_CERT",
      "",
      "Client certificate file for NATS mutual TLS; needs NATS_TLS_KEY",
    ),
    natsTlsKey: text(
      "NATS_TLS_KEY",
      "",
      "Client private key file for NATS mutual TLS; needs NATS_TLS_CERT",
    ),
    subjectPrefix: {
      doc: "Subject prefix of requests; create and delete go to <prefix>.create and <prefix>.delete",
      format: "byom-subject",
      default: DefaultNames.subjectPrefix,
      env: "BYOM_SUBJECT_PREFIX",
      rule: "must be dot-separated tokens of A-Z a-z 0-9 _ - (no wildcards, spaces or empty tokens), at most 255 characters",
    },
    stream: resourceName(
      "BYOM_STREAM",
      DefaultNames.stream,
      "JetStream stream holding the requests",
    ),
    consumer: resourceName(
      "BYOM_CONSUMER",
      DefaultNames.consumer,
      "Durable pull consumer shared by all agents",
    ),
    leaseBucket: resourceName(
      "BYOM_LEASE_BUCKET",
      DefaultNames.leaseBucket,
      "KV bucket of the IP leases",
    ),
    resultBucket: resourceName(
      "BYOM_RESULT_BUCKET",
      DefaultNames.resultBucket,
      "KV bucket keeping recent results for publishers that retry",
    ),
    concurrency: integer(
      "BYOM_CONCURRENCY",
      4,
      1,
      64,
      "must be an integer from 1 to 64",
      "Requests one agent serves at the same time",
    ),
    ackWaitMs: milliseconds(
      "BYOM_ACK_WAIT_MS",
      30_000,
      1000,
      "Consumer ack wait, in milliseconds; agents signal progress well within it",
    ),
    maxDeliver: integer(
      "BYOM_MAX_DELIVER",
      5,
      1,
      100,
      "must be an integer from 1 to 100",
      "Deliveries of one request before it fails for good",
    ),
    requestMaxAgeMs: milliseconds(
      "BYOM_REQUEST_MAX_AGE_MS",
      600_000,
      1000,
      "Age after which a request left in the stream expires, in milliseconds",
    ),
    releaseTimeoutMs: milliseconds(
      "BYOM_RELEASE_TIMEOUT_MS",
      300_000,
      1,
      "How long to wait for a VM to reset after the reboot trigger, in milliseconds, before quarantining it",
    ),
    shutdownTimeoutMs: milliseconds(
      "BYOM_SHUTDOWN_TIMEOUT_MS",
      15_000,
      1,
      "On SIGTERM, how long in-flight requests may finish, in milliseconds, before they are handed back to the stream",
    ),
    quarantineProbeIntervalMs: milliseconds(
      "BYOM_QUARANTINE_PROBE_INTERVAL_MS",
      30_000,
      1,
      "Pause between probes of quarantined VMs, in milliseconds",
    ),
    allowlistReloadIntervalMs: milliseconds(
      "BYOM_ALLOWLIST_RELOAD_INTERVAL_MS",
      60_000,
      1,
      "Period of the full re-read of SSH_HOST_KEY_ALLOWLIST_DIR, in milliseconds, besides the reload on every change the watcher sees",
    ),
    replicas: integer(
      "BYOM_REPLICAS",
      1,
      1,
      5,
      "must be an integer from 1 to 5",
      "Replicas of the stream and buckets (3 in a 3-node NATS cluster)",
    ),
    requestTimeoutMs: milliseconds(
      "BYOM_REQUEST_TIMEOUT_MS",
      120_000,
      1,
      "How long a publisher waits for a result, in milliseconds; also the request deadline",
    ),
    maxUserDataBytes: integer(
      "BYOM_MAX_USER_DATA_BYTES",
      1_048_576,
      1,
      67_108_864,
      "must be an integer number of bytes from 1 to 67108864",
      "Largest user-data a publisher sends, in bytes (the server's max_payload also applies)",
    ),
    sealingPublicKey: {
      doc: "Publisher: the agents' xkey public key (X...); when set, user-data is sealed to it so the broker never holds it in clear (docs/sealing.md)",
      format: "byom-xkey-public",
      default: "",
      env: "BYOM_SEALING_PUBLIC_KEY",
      rule: "must be empty or an xkey public key: X followed by 55 base32 characters (byom keys sealing generate)",
    },
    sealingSeedFile: text(
      "BYOM_SEALING_SEED_FILE",
      "",
      "Agent: file(s) holding the xkey seed (SX...) that opens sealed user-data, comma-separated, newest first, during a rotation; empty for none",
    ),
    requireSealed: {
      doc: "Agent: refuse user-data sent in clear; auto means true when BYOM_SEALING_SEED_FILE is set",
      format: "byom-choice",
      default: "auto",
      env: "BYOM_REQUIRE_SEALED",
      rule: `must be one of ${RequireSealedChoices.join(", ")}`,
      choices: RequireSealedChoices,
    },
    logLevel: {
      doc: "Log level",
      format: "byom-choice",
      default: "info",
      env: "BYOM_LOG_LEVEL",
      rule: `must be one of ${LogLevels.join(", ")}`,
      choices: LogLevels,
    },
    logFormat: {
      doc: "Log format: json lines, or pretty for people",
      format: "byom-choice",
      default: "json",
      env: "BYOM_LOG_FORMAT",
      rule: `must be one of ${LogFormats.join(", ")}`,
      choices: LogFormats,
    },
    httpPort: integer(
      "BYOM_HTTP_PORT",
      9464,
      0,
      65_535,
      "must be a port number from 0 to 65535 (0 turns the HTTP server off)",
      "Port of /metrics, /healthz and /readyz; 0 turns the HTTP server off",
    ),
  };
}

let cachedSchema: ReturnType<typeof schemaDefinition> | undefined;

/** The schema entries by key (built on first use). */
export function schemaEntries(): ReturnType<typeof schemaDefinition> {
  cachedSchema ??= schemaDefinition();
  return cachedSchema;
}

export function settingKeys(): SettingKey[] {
  return Object.keys(schemaEntries()) as SettingKey[];
}

export function isSettingKey(key: string): key is SettingKey {
  return Object.prototype.hasOwnProperty.call(schemaEntries(), key);
}

/** The value check of one entry: throws an Error whose message is the rule. */
export function checkValue(key: SettingKey, value: unknown): void {
  const entry: Entry<unknown> = schemaEntries()[key];
  const format = formats[entry.format];
  if (format === undefined) {
    throw new Error(`no format ${entry.format}`);
  }
  format.validate(value, entry);
}

/** Splits a `NATS_URL` value into trimmed, non-empty entries. */
export function splitServers(value: string): string[] {
  return value
    .split(",")
    .map((entry) => entry.trim())
    .filter((entry) => entry !== "");
}

function fail(rule: string): never {
  throw new Error(rule);
}

const integerText = /^[+-]?\d+$/;
const natsNameText = /^[A-Za-z0-9_-]{1,255}$/;
const subjectText = /^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/;

/** A string that is an integer becomes a number; anything else stays raw. */
function toInteger(value: string): unknown {
  const trimmed = value.trim();
  return integerText.test(trimmed) ? Number(trimmed) : value;
}

/** Why one `NATS_URL` entry is refused, or undefined when it is fine. */
export function natsUrlProblem(entry: string): string | undefined {
  let url: URL;
  try {
    url = new URL(entry);
  } catch {
    return "is not a URL";
  }
  if (!natsSchemes.includes(url.protocol)) {
    return `has scheme ${url.protocol.replace(/:$/, "")}`;
  }
  if (url.hostname === "") {
    return "has no host";
  }
  const isWebSocket = url.protocol === "ws:" || url.protocol === "wss:";
  if (!isWebSocket && url.pathname !== "" && url.pathname !== "/") {
    return "has a path";
  }
  return undefined;
}

interface Format {
  validate(value: unknown, entry: Entry<unknown>): void;
  coerce?(value: string): unknown;
}

const formats: Record<string, Format> = {
  "byom-text": {
    validate: (value, entry) => {
      if (typeof value !== "string") fail(entry.rule);
    },
    coerce: (value) => value.trim(),
  },
  "byom-required-text": {
    validate: (value, entry) => {
      if (typeof value !== "string" || value.trim() === "") fail(entry.rule);
    },
    coerce: (value) => value.trim(),
  },
  "byom-secret": {
    validate: (value, entry) => {
      if (typeof value !== "string") fail(entry.rule);
    },
  },
  "byom-username": {
    validate: (value, entry) => {
      if (typeof value !== "string" || !/^[^\s:/]+$/.test(value)) {
        fail(entry.rule);
      }
    },
    coerce: (value) => value.trim(),
  },
  "byom-int": {
    validate: (value, entry) => {
      const min = entry.min ?? 0;
      const max = entry.max ?? Number.MAX_SAFE_INTEGER;
      if (
        typeof value !== "number" ||
        !Number.isSafeInteger(value) ||
        value < min ||
        value > max
      ) {
        fail(entry.rule);
      }
    },
    coerce: toInteger,
  },
  "byom-choice": {
    validate: (value, entry) => {
      if (typeof value !== "string" || !entry.choices?.includes(value)) {
        fail(entry.rule);
      }
    },
    coerce: (value) => value.trim(),
  },
  "byom-nats-name": {
    validate: (value, entry) => {
      if (typeof value !== "string" || !natsNameText.test(value)) {
        fail(entry.rule);
      }
    },
    coerce: (value) => value.trim(),
  },
  "byom-subject": {
    validate: (value, entry) => {
      if (
        typeof value !== "string" ||
        value.length > 255 ||
        !subjectText.test(value)
      ) {
        fail(entry.rule);
      }
    },
    coerce: (value) => value.trim(),
  },
  "byom-xkey-public": {
    validate: (value, entry) => {
      if (
        typeof value !== "string" ||
        (value !== "" && !/^X[A-Z2-7]{55}$/.test(value))
      ) {
        fail(entry.rule);
      }
    },
    coerce: (value) => value.trim(),
  },
  "byom-nats-urls": {
    validate: (value, entry) => {
      if (typeof value !== "string") fail(entry.rule);
      const servers = splitServers(value);
      if (servers.length === 0) fail(entry.rule);
      for (const server of servers) {
        const problem = natsUrlProblem(server);
        if (problem !== undefined) {
          fail(`entry "${redactUrl(server)}" ${problem}: ${entry.rule}`);
        }
      }
    },
    coerce: (value) => value.trim(),
  },
};

let formatsRegistered = false;

/** Registers the formats with convict once; called by the loader. */
export function registerFormats(): void {
  if (formatsRegistered) {
    return;
  }
  for (const [name, format] of Object.entries(formats)) {
    convict.addFormat({
      name,
      validate: (value: unknown, entry: convict.SchemaObj) =>
        format.validate(value, entry as unknown as Entry<unknown>),
      ...(format.coerce === undefined ? {} : { coerce: format.coerce }),
    });
  }
  formatsRegistered = true;
}

/** The convict schema built from the entries. */
export function convictSchema(): convict.Schema<ByomSettings> {
  return schemaEntries() as unknown as convict.Schema<ByomSettings>;
}

/** Marker that replaces a secret in output. */
export const Redacted = "[redacted]";

/**
 * A server URL with its credentials hidden: a password becomes
 * `[redacted]`, and so does a user part without a password (NATS reads
 * that as a token).
 */
export function redactUrl(url: string): string {
  return url.replace(
    /^([A-Za-z][A-Za-z0-9+.-]*:\/\/)([^@/]*)@/,
    (_match, scheme: string, userInfo: string) => {
      const colon = userInfo.indexOf(":");
      const shown =
        colon < 0 ? Redacted : `${userInfo.slice(0, colon)}:${Redacted}`;
      return `${scheme}${shown}@`;
    },
  );
}

/** A comma-separated URL list with every entry's credentials hidden. */
export function redactUrlList(value: string): string {
  return value
    .split(",")
    .map((entry) => {
      const leading = entry.length - entry.trimStart().length;
      return entry.slice(0, leading) + redactUrl(entry.slice(leading));
    })
    .join(",");
}
