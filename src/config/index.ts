/**
 * Configuration: one convict schema with env names compatible with the
 * upstream BYOM provider, loaded by {@link loadConfig} into a frozen,
 * typed object. Nothing is read or registered at import time.
 */
export {
  ConfigFileEnv,
  describeConfigSchema,
  loadConfig,
  redactConfig,
  requirePool,
  type ByomConfig,
  type ConfigKeyDescription,
  type LoadConfigOptions,
} from "./load.js";
export {
  NodeNameFiles,
  resolveNodeName,
  type ResolveNodeNameOptions,
} from "./node.js";
export {
  parsePoolIps,
  type ParsedPool,
  type ParsePoolOptions,
} from "./pool.js";
export {
  LogFormats,
  LogLevels,
  RequireSealedChoices,
  type RequireSealed,
  type ByomSettings,
  type LogFormat,
  type LogLevel,
} from "./schema.js";
