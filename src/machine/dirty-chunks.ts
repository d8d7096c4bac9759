/**
 * The dirty-chunk log of one drive, for block migration: while tracking is
 * on, every write through the drive sets the bit of each 1 MiB chunk it
 * touches (QEMU's BLK_MIG_BLOCK_SIZE: 2048 sectors of 512 bytes). A caller
 * takes the set of dirty chunks and clears it in one step (take()), sends
 * those chunks, and takes again.
 *
 * Bit i (word i >>> 5, bit i & 31, the layout of base/bitmap.ts) is chunk
 * i, bytes [i * CHUNK, min((i + 1) * CHUNK, size)). The last chunk may be
 * short.
 */
import { bitmapWords, countBits, newBitmap } from '../base/bitmap.js';

/** Bytes per chunk: 1 MiB, QEMU's BLK_MIG_BLOCK_SIZE (BDRV_SECTORS_PER_DIRTY_CHUNK = 2048 sectors). */
export const DIRTY_CHUNK_SIZE = 1 << 20;

export class DirtyChunks {
  /** Chunks of the drive (the last may be short). */
  readonly chunks: number;
  private bm: Uint32Array;
  private on = false;

  constructor(readonly size: number) {
    this.chunks = Math.ceil(size / DIRTY_CHUNK_SIZE);
    this.bm = newBitmap(this.chunks);
  }

  get tracking(): boolean {
    return this.on;
  }

  /** Start tracking with every chunk clean (a second start clears the log again). */
  start(): void {
    this.bm = newBitmap(this.chunks);
    this.on = true;
  }

  /** Stop tracking and forget what was dirty. */
  stop(): void {
    this.on = false;
    this.bm.fill(0);
  }

  /** Mark the chunks of [offset, offset + length) dirty (nothing while tracking is off or for length 0). */
  mark(offset: number, length: number): void {
    if (!this.on || length <= 0) return;
    const first = Math.floor(offset / DIRTY_CHUNK_SIZE);
    const last = Math.min(this.chunks - 1, Math.floor((offset + length - 1) / DIRTY_CHUNK_SIZE));
    const bm = this.bm;
    for (let c = first; c <= last; c++) bm[c >>> 5] = bm[c >>> 5]! | (1 << (c & 31));
  }

  /**
   * The dirty chunks since tracking started or the last take(), as a bitmap
   * of `chunks` bits that the caller keeps; the log is clean afterwards.
   * Throws while tracking is off.
   */
  take(): Uint32Array {
    if (!this.on) throw new Error('dirty-chunk tracking is off');
    const got = this.bm;
    this.bm = new Uint32Array(bitmapWords(this.chunks));
    return got;
  }

  /** Dirty chunks now (0 while tracking is off). */
  count(): number {
    return countBits(this.bm);
  }
}
