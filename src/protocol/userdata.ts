import { parseDocument } from "yaml";

import { InvalidRequestError } from "../errors/index.js";

/** One file a pod VM writes from user-data. */
export interface UserDataFile {
  path: string;
  content: string;
}

export interface ParseUserDataOptions {
  /**
   * Require the `#cloud-config` first line. The agent does (cloud-init
   * needs it); the pod VM itself does not.
   */
  requireHeader?: boolean;
}

const header = "#cloud-config";

/**
 * Parses user-data the way the pod VM does: a YAML mapping with only a
 * `write_files` list whose items have exactly `path` (absolute, no `..`)
 * and `content` (string). Throws InvalidRequestError naming the rule.
 */
export function parseUserData(
  text: string,
  options: ParseUserDataOptions = {},
): UserDataFile[] {
  if (text.trim() === "") {
    throw new InvalidRequestError('field "userData" must not be empty');
  }
  if (text.includes("\uFFFD")) {
    throw new InvalidRequestError(
      'field "userData" must be valid UTF-8 (found a replacement character)',
    );
  }
  if (
    options.requireHeader === true &&
    !text.startsWith(`${header}\n`) &&
    !text.startsWith(`${header}\r\n`) &&
    text !== header
  ) {
    throw new InvalidRequestError(
      `field "userData" must start with a "${header}" line`,
    );
  }

  const document = parseDocument(text, { strict: true, uniqueKeys: true });
  if (document.errors.length > 0) {
    const first = document.errors[0];
    const where = first?.linePos?.[0];
    const at =
      where === undefined ? "" : ` at line ${where.line} column ${where.col}`;
    throw new InvalidRequestError(
      `field "userData" is not valid YAML${at}: ${first?.code ?? "error"}`,
    );
  }

  return readWriteFiles(document.toJS() as unknown);
}

function readWriteFiles(root: unknown): UserDataFile[] {
  if (root === null || typeof root !== "object" || Array.isArray(root)) {
    throw new InvalidRequestError('field "userData" must be a YAML mapping');
  }
  const keys = Object.keys(root);
  const unknown = keys.filter((key) => key !== "write_files");
  if (unknown.length > 0) {
    throw new InvalidRequestError(
      `field "userData" has top-level key "${unknown[0]}"; only "write_files" is accepted`,
    );
  }
  const items = (root as { write_files?: unknown }).write_files;
  if (!Array.isArray(items) || items.length === 0) {
    throw new InvalidRequestError(
      'field "userData.write_files" must be a non-empty list',
    );
  }
  return items.map((item, index) => readItem(item, index));
}

function readItem(item: unknown, index: number): UserDataFile {
  const field = `userData.write_files[${index}]`;
  if (item === null || typeof item !== "object" || Array.isArray(item)) {
    throw new InvalidRequestError(`field "${field}" must be a mapping`);
  }
  const extra = Object.keys(item).filter(
    (key) => key !== "path" && key !== "content",
  );
  if (extra.length > 0) {
    throw new InvalidRequestError(
      `field "${field}" has key "${extra[0]}"; only "path" and "content" are accepted`,
    );
  }
  const { path, content } = item as { path?: unknown; content?: unknown };
  if (typeof path !== "string" || !isSafeAbsolutePath(path)) {
    throw new InvalidRequestError(
      `field "${field}.path" must be an absolute path without ".." or control characters (got ${JSON.stringify(path)?.slice(0, 80)})`,
    );
  }
  if (typeof content !== "string") {
    throw new InvalidRequestError(`field "${field}.content" must be a string`);
  }
  return { path, content };
}

function hasControlCharacter(text: string): boolean {
  return [...text].some((char) => {
    const code = char.codePointAt(0) ?? 0;
    return code < 0x20 || code === 0x7f;
  });
}

function isSafeAbsolutePath(path: string): boolean {
  return (
    path.startsWith("/") &&
    path.length <= 4096 &&
    !hasControlCharacter(path) &&
    !path.split("/").some((part) => part === ".." || part === ".")
  );
}
