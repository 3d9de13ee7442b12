import { readFileSync } from "node:fs";

import convict from "convict";
import {
  LineCounter,
  parseDocument,
  type ErrorCode as YamlErrorCode,
  type YAMLError,
} from "yaml";

import { ConfigError } from "../errors/index.js";
import { resourceNames, type ResourceNames } from "../protocol/index.js";
import { resolveNodeName } from "./node.js";
import { parsePoolIps } from "./pool.js";
import {
  checkValue,
  convictSchema,
  isSettingKey,
  Redacted,
  redactUrl,
  redactUrlList,
  registerFormats,
  schemaEntries,
  settingKeys,
  splitServers,
  type ByomSettings,
  type SettingKey,
} from "./schema.js";

/** Environment variable naming the config file when no file is passed. */
export const ConfigFileEnv = "BYOM_CONFIG";

/**
 * The effective configuration: every setting, plus what is derived from
 * them. Deep-frozen.
 */
export type ByomConfig = Readonly<ByomSettings> & {
  /** `vmPoolIps` expanded: canonical IPs in pool order, each once. */
  readonly pool: readonly string[];
  /** Warnings found while expanding the pool (capped ranges, duplicates). */
  readonly poolWarnings: readonly string[];
  /** This node's name: `nodeName`, else the files, else the host name. */
  readonly node: string;
  /** NATS resource names built from the name settings. */
  readonly names: ResourceNames;
  /** `natsUrl` split into trimmed entries. */
  readonly natsServers: readonly string[];
  /** `requireSealed` resolved: "auto" is true when a seed file is set. */
  readonly sealedRequired: boolean;
};

/** Options of {@link loadConfig}; every one is optional. */
export interface LoadConfigOptions {
  /** Environment to read; default `process.env`. */
  env?: NodeJS.ProcessEnv;
  /** Config file (JSON or YAML); default `$BYOM_CONFIG`, else none. */
  file?: string;
  /**
   * Values by config key; they win over file and environment. Strings are
   * converted as environment values are; undefined entries are ignored.
   */
  overrides?: Record<string, unknown>;
  /** Called with each pool warning (they are also in `poolWarnings`). */
  warn?: (message: string) => void;
  /** Reads the node-name files; for tests. See resolveNodeName. */
  readFile?: (path: string) => string;
}

type Source = "default" | "file" | "env" | "override";

/**
 * Loads, validates and freezes the configuration.
 *
 * Precedence, lowest first: schema defaults, the config file, the
 * environment, `overrides`. This is convict's order (the environment is
 * applied again after a file is loaded, so it always beats the file). As
 * in the upstream provider, an empty or blank environment variable counts
 * as unset, so a ConfigMap key left empty keeps the file's value or the
 * default. `VM_POOL_IPS` is expanded after every other value is known, so
 * `MAX_RANGE_IPS` applies whatever the source of either.
 *
 * @throws ConfigError (`INVALID_REQUEST`) when the file cannot be read or
 *   parsed, has a key not in the schema, or any value breaks its rule. The
 *   message names the variable, the key, the value (secrets hidden) and
 *   the rule, e.g.
 *   `SSH_TIMEOUT="abc" (sshTimeoutSeconds): must be a positive integer number of seconds (at most 86400)`;
 *   several problems are joined with "; ".
 */
export function loadConfig(options: LoadConfigOptions = {}): ByomConfig {
  const env = options.env ?? process.env;
  const file = options.file ?? nonBlank(env[ConfigFileEnv]);
  // An undefined override means "not given", as for an unset CLI flag.
  const overrides = Object.fromEntries(
    Object.entries(options.overrides ?? {}).filter(
      ([, value]) => value !== undefined,
    ),
  );
  registerFormats();

  const setEnv = presentEnv(env);
  const fileValues = file === undefined ? {} : readConfigFile(file);
  for (const key of Object.keys(overrides)) {
    if (!isSettingKey(key)) {
      throw new ConfigError(`override "${key}": ${unknownKeyRule(key)}`);
    }
  }

  const config = convict<ByomSettings>(convictSchema(), {
    env: setEnv,
    args: [],
  });
  config.load(fileValues);
  for (const [key, value] of Object.entries(overrides)) {
    config.set(key, value);
  }

  const sourceOf = (key: SettingKey): Source => {
    if (key in overrides) return "override";
    if (schemaEntries()[key].env in setEnv) return "env";
    if (key in fileValues) return "file";
    return "default";
  };
  const shown = (key: SettingKey, value: unknown): string => {
    // Show what the operator wrote: the variable's text, not its coercion.
    const raw = setEnv[schemaEntries()[key].env];
    return showValue(key, sourceOf(key) === "env" ? raw : value);
  };
  const settings = validateSettings(config, sourceOf, shown, file);
  return deriveConfig(settings, options);
}

/**
 * Refuses a configuration without VM IPs; the agent calls this, commands
 * that need no pool do not.
 *
 * @throws ConfigError (`INVALID_REQUEST`) when the pool is empty.
 */
export function requirePool(config: ByomConfig): readonly string[] {
  if (config.pool.length === 0) {
    throw new ConfigError(
      "VM_POOL_IPS is empty: the agent needs at least one VM IP",
    );
  }
  return config.pool;
}

/**
 * The configuration for display: every sensitive value that is set becomes
 * `[redacted]` (an unset one stays `""`, so "not set" remains visible),
 * and credentials in NATS URLs are hidden.
 */
export function redactConfig(config: ByomConfig): Record<string, unknown> {
  const entries = schemaEntries();
  const shown: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(config)) {
    if (isSettingKey(key) && entries[key].sensitive === true) {
      shown[key] = value === "" ? "" : Redacted;
    } else if (key === "natsUrl") {
      shown[key] = redactUrlList(String(value));
    } else if (key === "natsServers") {
      shown[key] = config.natsServers.map(redactUrl);
    } else {
      shown[key] = structuredClone(value);
    }
  }
  return shown;
}

/** One row of the schema, for generated docs. */
export interface ConfigKeyDescription {
  /** Config file key. */
  key: string;
  /** Environment variable. */
  env: string;
  default: string | number;
  doc: string;
  /** The rule a value must meet, as error messages word it. */
  rule: string;
  /** Hidden in output when set. */
  sensitive: boolean;
}

/** Every setting, in schema order, with its env name, default and doc. */
export function describeConfigSchema(): ConfigKeyDescription[] {
  const entries = schemaEntries();
  return settingKeys().map((key) => {
    const entry = entries[key];
    return {
      key,
      env: entry.env,
      default: entry.default,
      doc: entry.doc,
      rule: entry.rule,
      sensitive: entry.sensitive === true,
    };
  });
}

function nonBlank(value: string | undefined): string | undefined {
  return value === undefined || value.trim() === "" ? undefined : value.trim();
}

/** The schema's variables that are set to something other than blank. */
function presentEnv(env: NodeJS.ProcessEnv): Record<string, string> {
  const present: Record<string, string> = {};
  for (const entry of Object.values(schemaEntries())) {
    const value = env[entry.env];
    if (value !== undefined && value.trim() !== "") {
      present[entry.env] = value;
    }
  }
  return present;
}

function unknownKeyRule(key: string): string {
  const byEnv = Object.entries(schemaEntries()).find(
    ([, entry]) => entry.env === key,
  );
  const hint = byEnv === undefined ? "" : ` (did you mean ${byEnv[0]}?)`;
  return `is not a configuration key${hint}`;
}

/** Reads a JSON or YAML file into an object of known keys. */
function readConfigFile(file: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (error) {
    const reason = (error as NodeJS.ErrnoException).code ?? String(error);
    throw new ConfigError(`config file "${file}" cannot be read: ${reason}`, {
      cause: error,
    });
  }
  const content = parseConfigText(file, text);
  if (content === null || content === undefined) {
    return {};
  }
  if (typeof content !== "object" || Array.isArray(content)) {
    throw new ConfigError(
      `config file "${file}": must hold a mapping of configuration keys`,
    );
  }

  const values: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(content)) {
    if (!isSettingKey(key)) {
      throw new ConfigError(
        `config file "${file}": key "${key}" ${unknownKeyRule(key)}`,
      );
    }
    const single = poolListAsText(key, value);
    if (typeof single === "object" && single !== null) {
      // convict would merge a mapping into the leaf; refuse it here.
      const entry = schemaEntries()[key];
      throw new ConfigError(
        `${entry.env}=${showValue(key, single)} (${key}, from ${file}): ${entry.rule}`,
      );
    }
    values[key] = single;
  }
  return values;
}

/** What each `yaml` error code means, in our words: its messages quote source. */
const yamlReasons: Record<YamlErrorCode, string> = {
  ALIAS_PROPS: "an alias cannot have a tag or an anchor",
  BAD_ALIAS: "malformed alias",
  BAD_DIRECTIVE: "unsupported or malformed directive",
  BAD_DQ_ESCAPE: "invalid escape sequence in a double-quoted string",
  BAD_INDENT: "bad indentation",
  BAD_PROP_ORDER: "anchor and tag in the wrong order",
  BAD_SCALAR_START: "a plain value cannot start with this character",
  BLOCK_AS_IMPLICIT_KEY:
    'a mapping nested on one line; quote a value that holds ": "',
  BLOCK_IN_FLOW: "a block collection inside a flow collection",
  DUPLICATE_KEY: "duplicate key",
  IMPOSSIBLE: "internal parser error",
  KEY_OVER_1024_CHARS: "a key longer than 1024 characters",
  MISSING_CHAR: "a closing quote or bracket is missing",
  MULTILINE_IMPLICIT_KEY: "a key that spans lines",
  MULTIPLE_ANCHORS: "more than one anchor on a node",
  MULTIPLE_DOCS: "more than one document",
  MULTIPLE_TAGS: "more than one tag on a node",
  NON_STRING_KEY: "a key that is not a string",
  RESOURCE_EXHAUSTION: "too many aliases",
  TAB_AS_INDENT: "a tab used as indentation",
  TAG_RESOLVE_FAILED: "unknown tag",
  UNEXPECTED_TOKEN: "unexpected token",
  BAD_COLLECTION_TYPE: "a collection of the wrong type for its tag",
};

/**
 * Parses YAML (and so JSON, a subset of YAML 1.2). A problem is reported
 * by line, column, the parser's code and our reason, never with the
 * parser's message: it quotes the source line, which may hold a password.
 * Warnings (e.g. an unknown tag) fail too, as they would otherwise be
 * printed with the source line. No cause is chained, for the same reason.
 */
function parseConfigText(file: string, text: string): unknown {
  const lineCounter = new LineCounter();
  const document = parseDocument(text, { lineCounter, prettyErrors: false });
  const problems: YAMLError[] = [...document.errors, ...document.warnings];
  const [first] = problems;
  if (first !== undefined) {
    const { line, col } = lineCounter.linePos(first.pos[0]);
    const reason = yamlReasons[first.code] ?? "syntax error";
    const more =
      problems.length > 1 ? ` (${problems.length} problems in all)` : "";
    throw new ConfigError(
      `config file "${file}" is not valid YAML or JSON at line ${line}, column ${col}: ${first.code} (${reason})${more}; the line is not shown as it may hold a secret`,
    );
  }

  try {
    return document.toJS();
  } catch (error) {
    // Alias errors name the alias, which is source text: not shown.
    const message = error instanceof Error ? error.message : "";
    const reason = /excessive alias count/i.test(message)
      ? "too many aliases"
      : "an alias cannot be resolved (is its anchor defined before it?)";
    throw new ConfigError(
      `config file "${file}" cannot be turned into values: ${reason}`,
    );
  }
}

/** A file may give the pool as a list of entries; it means the same. */
function poolListAsText(key: string, value: unknown): unknown {
  if (
    key === "vmPoolIps" &&
    Array.isArray(value) &&
    value.every((item) => typeof item === "string")
  ) {
    return value.join(",");
  }
  return value;
}

/** Runs every key's rule and the rules between keys; throws all problems. */
function validateSettings(
  config: convict.Config<ByomSettings>,
  sourceOf: (key: SettingKey) => Source,
  shown: (key: SettingKey, value: unknown) => string,
  file: string | undefined,
): ByomSettings {
  const entries = schemaEntries();
  const problems: string[] = [];
  for (const key of settingKeys()) {
    const value: unknown = config.get(key);
    try {
      checkValue(key, value);
    } catch (error) {
      const rule = error instanceof Error ? error.message : String(error);
      const where = sourceOf(key) === "file" ? `, from ${file}` : "";
      problems.push(
        `${entries[key].env}=${shown(key, value)} (${key}${where}): ${rule}`,
      );
    }
  }
  if (problems.length > 0) {
    throw new ConfigError(problems.join("; "));
  }

  try {
    config.validate({ allowed: "strict" });
  } catch (error) {
    // Every rule ran above; this is a backstop for convict's own checks.
    const reason = error instanceof Error ? error.message : String(error);
    throw new ConfigError(`invalid configuration: ${reason}`, {
      cause: error,
    });
  }

  const settings = config.getProperties();
  checkPairs(settings);
  return settings;
}

function showValue(key: SettingKey, value: unknown): string {
  if (schemaEntries()[key].sensitive === true) {
    return Redacted;
  }
  if (key === "natsUrl" && typeof value === "string") {
    return JSON.stringify(redactUrlList(value));
  }
  // An nkey seed (S + type letter + base32) pasted where a public key
  // belongs must not be echoed.
  if (typeof value === "string" && /^S[A-Z][A-Z2-7]{20,}/.test(value.trim())) {
    return `${Redacted} (this looks like a seed, which is secret: give the public key)`;
  }
  return JSON.stringify(value) ?? String(value);
}

/** Rules between settings. */
function checkPairs(settings: ByomSettings): void {
  if ((settings.natsTlsCert === "") !== (settings.natsTlsKey === "")) {
    throw new ConfigError(
      "NATS_TLS_CERT and NATS_TLS_KEY (natsTlsCert, natsTlsKey): set both or neither",
    );
  }
  if (settings.natsPassword !== "" && settings.natsUser === "") {
    throw new ConfigError(
      "NATS_PASSWORD (natsPassword) is set but NATS_USER (natsUser) is empty: a password needs a user",
    );
  }
  if (settings.natsToken !== "" && settings.natsUser !== "") {
    throw new ConfigError(
      "NATS_TOKEN and NATS_USER (natsToken, natsUser): use a token or a user, not both",
    );
  }
  const natsAuth = [
    settings.natsUser !== "" ? "NATS_USER" : "",
    settings.natsToken !== "" ? "NATS_TOKEN" : "",
    settings.natsNkeySeedFile !== "" ? "NATS_NKEY_SEED_FILE" : "",
    settings.natsCredsFile !== "" ? "NATS_CREDS" : "",
  ].filter((name) => name !== "");
  if (natsAuth.length > 1) {
    throw new ConfigError(
      `${natsAuth.join(" and ")} are set together: NATS authentication takes one of user and password, token, nkey seed file or credentials file`,
    );
  }
}

function deriveConfig(
  settings: ByomSettings,
  options: LoadConfigOptions,
): ByomConfig {
  const pool = parsePoolIps(settings.vmPoolIps, {
    maxRangeIps: settings.maxRangeIps,
    ...(options.warn === undefined ? {} : { warn: options.warn }),
  });
  const node = resolveNodeName({
    env: { NODE_NAME: settings.nodeName },
    ...(options.readFile === undefined ? {} : { readFile: options.readFile }),
  });
  const names = resourceNames({
    subjectPrefix: settings.subjectPrefix,
    stream: settings.stream,
    consumer: settings.consumer,
    leaseBucket: settings.leaseBucket,
    resultBucket: settings.resultBucket,
  });

  return deepFreeze({
    ...settings,
    pool: pool.ips,
    poolWarnings: pool.warnings,
    node,
    names,
    natsServers: splitServers(settings.natsUrl),
    sealedRequired:
      settings.requireSealed === "auto"
        ? settings.sealingSeedFile !== ""
        : settings.requireSealed === "true",
  });
}

function deepFreeze<T>(value: T): T {
  if (typeof value === "object" && value !== null) {
    for (const child of Object.values(value)) {
      deepFreeze(child);
    }
    Object.freeze(value);
  }
  return value;
}
