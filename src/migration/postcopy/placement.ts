/**
 * Postcopy page placement on the destination (docs/spec/stream-format.md
 * §11). After POSTCOPY_LISTEN the guest runs while pages still arrive, so a
 * page is placed only where it is still missing (its bit clear in the
 * block's `present` bitmap): once placed, the running guest owns it, and a
 * second copy in flight (requested and also sent by the background walk)
 * must not overwrite what the guest wrote since. After placing, `placed`
 * sets the present bit and wakes the vCPUs waiting for the page.
 *
 * A ZERO record for a missing page clears the local copy unless it was never
 * written (a page that was received, then discarded, may be stale), so
 * untouched memory stays unallocated, as UFFDIO_ZEROPAGE leaves it in QEMU.
 */
import { testBit } from '../../base/bitmap.js';
import type { RamBlock } from '../../machine/types.js';
import { TARGET_PAGE_SIZE } from '../../machine/types.js';
import type { StreamReader } from '../stream/reader.js';
import { WIRE } from '../wire/constants.js';

/** Where pages go (the RAM loader). */
export interface PageStore {
  readonly blocks: readonly RamBlock[];
  readonly counters: { pages: number };
  /** The page becomes `fill` bytes (counted as a zero page). */
  putZero(b: number, page: number, fill: number): void;
  /** The buffered PAGE payload into the page (counted as a normal page). */
  putPage(r: StreamReader, b: number, page: number): void;
}

export class PostcopyPlacer {
  constructor(
    private readonly store: PageStore,
    private readonly placed: ((block: number, page: number) => void) | null,
  ) {}

  /** One ZERO or PAGE record whose payload is buffered in `r`. */
  place(r: StreamReader, b: number, page: number, kind: number): void {
    const zero = kind === WIRE.RAM.ZERO;
    if (testBit(this.store.blocks[b]!.present, page)) {
      r.skip(zero ? 1 : TARGET_PAGE_SIZE);
      return;
    }
    if (zero) this.store.putZero(b, page, r.get8());
    else this.store.putPage(r, b, page);
    this.store.counters.pages++;
    this.placed?.(b, page);
  }
}
