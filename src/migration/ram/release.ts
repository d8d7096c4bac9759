/**
 * release-ram (docs/spec/qmp.md E.5): during postcopy the source gives the memory of
 * pages it has sent back to the OS. A page can go once its bit is clear in
 * the migration bitmap: after the switch the VM is stopped, so a sent page
 * never becomes dirty again.
 *
 * Pages are released in coalesced ranges (MADV_DONTNEED on the whole host
 * pages inside each range): a SharedArrayBuffer's memory need not start on
 * a host page boundary, so single pages may straddle two host pages, and
 * ranges free far more than page-by-page calls would.
 */
import type { RamBlock } from '../../machine/types.js';
import { TARGET_PAGE_SIZE } from '../../machine/types.js';
import { releaseMemory } from '../../base/native.js';

export class RamReleaser {
  /** Per block, per bitmap word (32 pages): 1 once those pages were handed back. */
  private readonly released: Uint8Array[];
  /** Bytes handed to releaseMemory so far. */
  releasedBytes = 0;
  /** False once the platform turned out not to support it (no addon). */
  private supported = true;

  constructor(
    private readonly blocks: readonly RamBlock[],
    /** Bit set = page still to be sent (RamSender.bitmaps). */
    private readonly toSend: readonly Uint32Array[],
  ) {
    this.released = blocks.map((b) => new Uint8Array((b.pages + 31) >>> 5));
  }

  /** Release every page that has been sent and not released yet. */
  releaseSent(): void {
    if (!this.supported) return;
    for (let b = 0; b < this.blocks.length; b++) {
      const bm = this.toSend[b]!;
      const rel = this.released[b]!;
      const words = rel.length;
      let runStart = -1;
      for (let i = 0; i <= words; i++) {
        // a word is releasable when every page in it is sent and not yet released
        const can = i < words && bm[i] === 0 && rel[i] === 0;
        if (can) {
          if (runStart < 0) runStart = i;
          continue;
        }
        if (runStart >= 0) {
          this.releaseWords(b, runStart, i);
          runStart = -1;
        }
      }
    }
  }

  private releaseWords(b: number, from: number, to: number): void {
    const block = this.blocks[b]!;
    const start = from * 32 * TARGET_PAGE_SIZE;
    const end = Math.min(block.size, to * 32 * TARGET_PAGE_SIZE);
    if (!releaseMemory(block.bytes.subarray(start, end))) {
      this.supported = false;
      return;
    }
    this.releasedBytes += end - start;
    this.released[b]!.fill(1, from, to);
    // the memory now reads as zero: keep `touched` honest for anyone who looks
    block.touched.fill(0, from, to);
  }
}
