/**
 * A RAM snapshot: a private copy of every guest RAM block, the same names
 * and sizes, that can be updated page by page and from which chosen pages
 * are put back into guest RAM. COLO's secondary keeps the primary's memory
 * at the last checkpoint in one (QEMU's colo_cache): checkpoints are loaded
 * into the snapshot, and the guest's own pages are reset from it.
 *
 * The snapshot's blocks have the RamBlock shape so that a loader can write
 * into them as into guest RAM; their `touched` bitmap has the same meaning
 * (a clear bit: the page is zero), their `dirty` and `present` bitmaps are
 * empty (nothing runs on a snapshot).
 */
import { popcount32 } from '../base/bitmap.js';
import { copyBytes } from '../base/native.js';
import { TARGET_PAGE_SIZE, type RamBlock } from './types.js';

/** Bytes copied per call when the whole of a block is copied. */
const COPY_CHUNK = 64 << 20;

function copyBlock(dst: Uint8Array, src: Uint8Array, size: number): void {
  for (let o = 0; o < size; o += COPY_CHUNK) copyBytes(dst, o, src, o, Math.min(COPY_CHUNK, size - o));
}

export class RamSnapshot {
  private constructor(readonly blocks: readonly RamBlock[]) {}

  /**
   * A copy of `ram` as it is now. The copy is consistent only if nothing
   * writes guest RAM meanwhile (the caller stops the vCPUs). Allocating it
   * takes as much memory as the guest has.
   */
  static take(ram: readonly RamBlock[]): RamSnapshot {
    const none = new Int32Array(0);
    return new RamSnapshot(
      ram.map((b) => {
        let bytes: Uint8Array;
        try {
          bytes = Buffer.allocUnsafeSlow(b.size);
        } catch (e) {
          throw new Error(`cannot allocate ${b.size} bytes for a copy of RAM block '${b.name}': ${(e as Error).message}`);
        }
        copyBlock(bytes, b.bytes, b.size);
        // a page dirtied since its touched bit was last updated may be non-zero too
        const touched = Uint32Array.from(b.touched, (w, i) => (w | (b.dirty[i] ?? 0)) >>> 0);
        return { name: b.name, size: b.size, pages: b.pages, bytes, dirty: none, touched, present: none };
      }),
    );
  }

  /** Bytes the snapshot holds. */
  get size(): number {
    return this.blocks.reduce((a, b) => a + b.size, 0);
  }

  /**
   * Copies the pages set in `pages` (one bitmap per block, as the blocks'
   * own bitmaps) from the snapshot into `ram`, in runs of neighbouring
   * pages. A restored page that may be non-zero gets its `touched` bit in
   * `ram`. The caller stops the vCPUs first. Returns the pages copied.
   */
  restore(ram: readonly RamBlock[], pages: readonly Uint32Array[]): number {
    let n = 0;
    for (let b = 0; b < this.blocks.length; b++) {
      const from = this.blocks[b]!;
      const to = ram[b]!;
      if (to.name !== from.name || to.size !== from.size) throw new Error(`RAM block ${b} is '${to.name}', the snapshot has '${from.name}'`);
      const bm = pages[b]!;
      let runStart = -1;
      const flush = (end: number): void => {
        if (runStart < 0) return;
        const off = runStart * TARGET_PAGE_SIZE;
        copyBytes(to.bytes, off, from.bytes, off, (end - runStart) * TARGET_PAGE_SIZE);
        runStart = -1;
      };
      for (let w = 0; w < bm.length; w++) {
        const v = bm[w]!;
        if (v === 0) {
          flush(w << 5);
          continue;
        }
        to.touched[w] = (to.touched[w]! | (v & from.touched[w]!)) >>> 0;
        n += popcount32(v);
        if (v === 0xffffffff) {
          if (runStart < 0) runStart = w << 5;
          continue;
        }
        for (let bit = 0; bit < 32; bit++) {
          const p = (w << 5) | bit;
          if ((v >>> bit) & 1) {
            if (runStart < 0) runStart = p;
          } else {
            flush(p);
          }
        }
      }
      flush(Math.min(bm.length << 5, from.pages));
    }
    return n;
  }
}
