export * from "./names.js";
export * from "./ip.js";
export * from "./messages.js";
export * from "./schemas.js";
export {
  decodeRequest,
  decodeResult,
  parseMessage,
  requestIdHint,
  showValue,
  validateRequest,
} from "./validate.js";
export * from "./userdata.js";
