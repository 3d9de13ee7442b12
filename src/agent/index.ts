export {
  createAgent,
  type Agent,
  type AgentOptions,
  type AgentStatus,
} from "./agent.js";
export type { AgentEventMap, AgentEventName, AgentEvents } from "./events.js";
export { operatorReasonPrefix } from "./prober.js";
