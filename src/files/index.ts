/**
 * Bounded file reads, for files a user names (user-data, keys): a device
 * or a huge file must not be read whole.
 */
import { open } from "node:fs/promises";

/** Bytes asked of the file per read; small enough for a tiny cap. */
const chunkBytes = 64 * 1024;

/**
 * Reads the first `maxBytes` bytes of a file, or all of it when shorter,
 * and stops there. Reads sequentially from wherever the file starts, so
 * it also ends for `/dev/zero`, a FIFO whose writer never stops, and a
 * file that grows while it is read; it never trusts a stat size (a
 * character device reports 0). Callers that want "larger than N" ask for
 * N + 1 bytes.
 *
 * @throws the fs error (with its `code`, e.g. ENOENT, EISDIR) when the
 *   file cannot be opened or read.
 */
export async function readAtMost(
  path: string,
  maxBytes: number,
): Promise<Buffer> {
  const handle = await open(path, "r");
  try {
    const chunks: Buffer[] = [];
    let total = 0;
    while (total < maxBytes) {
      const buffer = Buffer.alloc(Math.min(chunkBytes, maxBytes - total));
      const { bytesRead } = await handle.read(buffer, 0, buffer.length, null);
      if (bytesRead === 0) {
        break;
      }
      chunks.push(buffer.subarray(0, bytesRead));
      total += bytesRead;
    }
    return Buffer.concat(chunks, total);
  } finally {
    await handle.close();
  }
}
