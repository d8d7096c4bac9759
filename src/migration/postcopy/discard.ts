/**
 * POSTCOPY_RAM_DISCARD (docs/spec/stream-format.md §10): at the switch the
 * source lists, per RAM block, the pages the destination must not trust
 * (never sent, or dirtied since they were sent); the destination marks them
 * missing, so that a vCPU touching one waits for it.
 */
import { clearRange, nextClearBit, nextSetBit, type Bitmap } from '../../base/bitmap.js';
import type { RamBlock } from '../../machine/types.js';
import { TARGET_PAGE_SIZE } from '../../machine/types.js';
import type { ByteSink } from '../stream/writer.js';
import { WIRE } from '../wire/constants.js';
import { ERR, MigrationStreamError } from '../wire/errors.js';
import { putCmdRamDiscard } from '../wire/records.js';

/** The set bits of a block's migration bitmap as coalesced byte ranges [start, length). */
export function discardRanges(toSend: Bitmap, pages: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let p = nextSetBit(toSend, 0, pages); p >= 0; ) {
    const end = nextClearBit(toSend, p, pages);
    out.push([p * TARGET_PAGE_SIZE, (end - p) * TARGET_PAGE_SIZE]);
    p = nextSetBit(toSend, end, pages);
  }
  return out;
}

/** The discard commands of one block, at most DISCARD_MAX_RANGES ranges each. */
export function putDiscards(w: ByteSink, blockName: string, ranges: ReadonlyArray<readonly [number, number]>): void {
  const max = WIRE.LIMITS.DISCARD_MAX_RANGES;
  for (let i = 0; i < ranges.length; i += max) {
    putCmdRamDiscard(w, blockName, ranges, i, Math.min(i + max, ranges.length));
  }
}

/** Destination: the pages of these ranges of block `name` are missing until they come again. */
export function applyDiscard(blocks: readonly RamBlock[], name: string, ranges: ReadonlyArray<readonly [number, number]>): void {
  const block = blocks.find((x) => x.name === name);
  if (!block) throw new MigrationStreamError(ERR.discardNoBlock(name));
  for (const [start, len] of ranges) {
    if (start + len > block.size || start % TARGET_PAGE_SIZE !== 0 || len % TARGET_PAGE_SIZE !== 0) {
      throw new MigrationStreamError(ERR.discardOverrun(name, start, len));
    }
    clearRange(block.present, start / TARGET_PAGE_SIZE, (start + len) / TARGET_PAGE_SIZE);
  }
}
