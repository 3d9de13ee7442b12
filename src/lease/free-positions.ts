/**
 * Which pool positions hold a free IP, kept as a Fenwick (binary indexed)
 * tree so that acquire finds "the k-th free IP in pool order" and "the
 * next free IP from here" in O(log pool) instead of scanning the pool.
 */
export class FreePositions {
  /** 1-based Fenwick sums over `#free`. */
  readonly #tree: Int32Array;
  readonly #free: Uint8Array;
  /** Largest power of two not above the size; where a descent starts. */
  readonly #topStep: number;
  #count = 0;

  /** `size` positions, none free. */
  constructor(size: number) {
    this.#tree = new Int32Array(size + 1);
    this.#free = new Uint8Array(size);
    this.#topStep = size === 0 ? 0 : 2 ** Math.floor(Math.log2(size));
  }

  /** Number of positions. */
  get size(): number {
    return this.#free.length;
  }

  /** Number of free positions. */
  get count(): number {
    return this.#count;
  }

  /** True when `position` is free. */
  has(position: number): boolean {
    return this.#free[position] === 1;
  }

  /** Marks `position` free or not; a no-op when it already is. */
  set(position: number, free: boolean): void {
    const flag = free ? 1 : 0;
    if (this.#free[position] === flag) {
      return;
    }
    this.#free[position] = flag;
    const delta = free ? 1 : -1;
    this.#count += delta;
    for (let index = position + 1; index < this.#tree.length;) {
      this.#tree[index]! += delta;
      index += index & -index;
    }
  }

  /** Free positions before `position` (its rank among the free ones). */
  countBefore(position: number): number {
    let sum = 0;
    for (let index = Math.min(position, this.size); index > 0;) {
      sum += this.#tree[index]!;
      index -= index & -index;
    }
    return sum;
  }

  /** The position of the `rank`-th free one (from 0); -1 past the end. */
  nth(rank: number): number {
    if (rank < 0 || rank >= this.#count) {
      return -1;
    }
    // Descend to the last index whose prefix sum is still <= rank; the
    // free position we want is the next one.
    let index = 0;
    let remaining = rank;
    for (let step = this.#topStep; step > 0; step >>= 1) {
      const next = index + step;
      if (next < this.#tree.length && this.#tree[next]! <= remaining) {
        index = next;
        remaining -= this.#tree[next]!;
      }
    }
    return index;
  }

  /** The first free position at or after `position`; -1 if none. */
  nextFrom(position: number): number {
    return this.nth(this.countBefore(position));
  }
}
