/**
 * Sealed user-data: the publisher encrypts user-data to the agents'
 * curve25519 key (an NATS "xkey") so that the broker never stores it in
 * clear. Each message gets a fresh sender key pair, whose public half
 * travels with the box; only a holder of the agents' seed can open it.
 * Pure crypto over `@nats-io/nkeys` plus reading seed files.
 */

import {
  createCurve,
  fromCurveSeed,
  fromPublic,
  type KeyPair,
} from "@nats-io/nkeys";

import { ConfigError, InvalidRequestError } from "../errors/index.js";
import { readAtMost } from "../files/index.js";
import {
  SealedAlgorithm,
  xkeyPublicPattern,
  type SealedUserData,
} from "../protocol/index.js";

/** A new sealing key pair: the public key for publishers, the seed for agents. */
export interface SealingKeyPair {
  /** xkey public key, `X` and 55 base32 characters. */
  publicKey: string;
  /** xkey seed, `SX...`: the secret; keep it in a file readable by the agent only. */
  seed: string;
}

/** Opens sealed user-data; throws InvalidRequestError when no key opens it. */
export type Unsealer = (sealed: SealedUserData) => string;

const encoder = new TextEncoder();
const utf8 = new TextDecoder("utf-8", { fatal: true });
const publicKeyText = new RegExp(xkeyPublicPattern);

/** Generates a sealing key pair (curve25519). */
export function createSealingKeyPair(): SealingKeyPair {
  const pair = createCurve();
  return {
    publicKey: pair.getPublicKey(),
    seed: new TextDecoder().decode(pair.getSeed()),
  };
}

/**
 * The public key of a seed.
 *
 * @throws ConfigError (`INVALID_REQUEST`) when the text is not an xkey
 *   seed; the message never repeats the seed.
 */
export function sealingPublicKeyOf(seed: string): string {
  return curvePair(seed, "sealing seed").getPublicKey();
}

/**
 * Checks an xkey public key.
 *
 * @throws ConfigError (`INVALID_REQUEST`) naming the value and the rule.
 */
export function checkSealingPublicKey(publicKey: string): string {
  const trimmed = publicKey.trim();
  let valid = publicKeyText.test(trimmed);
  if (valid) {
    try {
      fromPublic(trimmed);
    } catch {
      valid = false;
    }
  }
  if (!valid) {
    throw new ConfigError(
      `sealing public key "${trimmed.slice(0, 60)}" must be an xkey public key (X followed by 55 base32 characters, from "byom keys sealing generate")`,
    );
  }
  return trimmed;
}

/**
 * Seals user-data to `recipientPublicKey` with a fresh sender key.
 *
 * @throws ConfigError (`INVALID_REQUEST`) when the recipient key is invalid.
 */
export function sealUserData(
  text: string,
  recipientPublicKey: string,
): SealedUserData {
  const recipient = checkSealingPublicKey(recipientPublicKey);
  const sender = createCurve();
  try {
    const box = sender.seal(encoder.encode(text), recipient);
    return {
      alg: SealedAlgorithm,
      sender: sender.getPublicKey(),
      box: Buffer.from(box).toString("base64"),
    };
  } finally {
    sender.clear();
  }
}

/**
 * Opens sealed user-data with the first of `seeds` that can (several
 * seeds serve a key rotation).
 *
 * @throws InvalidRequestError naming `userDataSealed` when the algorithm
 *   is unknown, no seed opens the box, or the content is not UTF-8.
 */
export function openUserData(
  sealed: SealedUserData,
  seeds: string | readonly string[],
): string {
  return createUnsealer(typeof seeds === "string" ? [seeds] : seeds)(sealed);
}

/**
 * An {@link Unsealer} over seeds checked once, tried in order.
 *
 * @throws ConfigError when a seed is not an xkey seed or none is given.
 */
export function createUnsealer(seeds: readonly string[]): Unsealer {
  if (seeds.length === 0) {
    throw new ConfigError("sealing needs at least one seed");
  }
  const pairs = seeds.map((seed, index) =>
    curvePair(seed, `sealing seed ${index + 1}`),
  );
  return (sealed) => open(sealed, pairs);
}

/**
 * Reads the seeds of a comma-separated list of files (newest first, as
 * `BYOM_SEALING_SEED_FILE=new,old` during a rotation).
 *
 * @throws ConfigError naming the file (never its content) when a file
 *   cannot be read or holds no xkey seed.
 */
export async function loadSealingSeeds(files: string): Promise<string[]> {
  const paths = files
    .split(",")
    .map((path) => path.trim())
    .filter((path) => path !== "");
  if (paths.length === 0) {
    throw new ConfigError(
      "BYOM_SEALING_SEED_FILE must name at least one seed file",
    );
  }
  return Promise.all(paths.map((path) => readSeedFile(path)));
}

async function readSeedFile(path: string): Promise<string> {
  let text: string;
  try {
    // A seed file is one line; a device or a huge file is not read whole.
    text = (await readAtMost(path, 64 * 1024)).toString("utf8");
  } catch (error) {
    const reason = (error as NodeJS.ErrnoException).code ?? String(error);
    throw new ConfigError(
      `sealing seed file "${path}" cannot be read: ${reason}`,
      { cause: error },
    );
  }
  const seed = text
    .split(/\r?\n/)
    .map((line) => line.trim())
    .find((line) => line !== "" && !line.startsWith("#"));
  if (seed === undefined) {
    throw new ConfigError(
      `sealing seed file "${path}" holds no seed: it must hold one SX... line`,
    );
  }
  curvePair(seed, `sealing seed file "${path}"`).clear();
  return seed;
}

function curvePair(seed: string, what: string): KeyPair {
  try {
    return fromCurveSeed(encoder.encode(seed.trim()));
  } catch (error) {
    throw new ConfigError(
      `${what} must be an xkey seed (SX..., from "byom keys sealing generate")`,
      { cause: error },
    );
  }
}

function open(sealed: SealedUserData, pairs: readonly KeyPair[]): string {
  if (sealed.alg !== SealedAlgorithm) {
    throw new InvalidRequestError(
      `field "userDataSealed.alg" must be "${SealedAlgorithm}"`,
    );
  }
  const box = new Uint8Array(Buffer.from(sealed.box, "base64"));
  for (const pair of pairs) {
    let opened: Uint8Array | null = null;
    try {
      opened = pair.open(box, sealed.sender);
    } catch {
      // A malformed box or sender key is the same failure as a wrong key.
    }
    if (opened !== null) {
      return decodeOpened(opened);
    }
  }
  throw new InvalidRequestError(
    `field "userDataSealed" cannot be opened with this agent's sealing ${pairs.length === 1 ? "key" : `keys (${pairs.length} tried)`}: sealed to another key, or damaged`,
  );
}

function decodeOpened(bytes: Uint8Array): string {
  try {
    return utf8.decode(bytes);
  } catch (error) {
    throw new InvalidRequestError(
      'field "userDataSealed" must hold UTF-8 user-data',
      { cause: error },
    );
  }
}
