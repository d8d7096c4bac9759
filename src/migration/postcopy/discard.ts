/**
 * POSTCOPY_RAM_DISCARD (docs/spec/stream-format.md §10): at the switch the
 * source lists, per RAM block, the pages the destination must not trust
 * (never sent, or dirtied since they were sent); the destination marks them
 * missing, so that a vCPU touching one waits for it.
 */
import { clearRange, type Bitmap } from '../../base/bitmap.js';
import type { RamBlock } from '../../machine/types.js';
import { TARGET_PAGE_SIZE } from '../../machine/types.js';
import type { ByteSink } from '../stream/writer.js';
import { WIRE } from '../wire/constants.js';
import { ERR, MigrationStreamError } from '../wire/errors.js';
import { putCmdRamDiscard } from '../wire/records.js';

/**
 * The set bits of a block's migration bitmap as coalesced byte ranges
 * [start, length). One pass over the words, whole empty and full words at a
 * time: it runs once, cold, while the guest is stopped (postcopy downtime).
 */
export function discardRanges(toSend: Bitmap, pages: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  const words = (pages + 31) >>> 5;
  let runStart = -1;
  for (let w = 0; w < words; w++) {
    const v = toSend[w]! >>> 0;
    if (v === 0 || v === 0xffffffff) {
      // the whole word continues or ends a run
      if (v === 0 && runStart >= 0) {
        out.push([runStart * TARGET_PAGE_SIZE, ((w << 5) - runStart) * TARGET_PAGE_SIZE]);
        runStart = -1;
      } else if (v !== 0 && runStart < 0) {
        runStart = w << 5;
      }
      continue;
    }
    for (let b = 0; b < 32; b++) {
      const set = ((v >>> b) & 1) !== 0;
      if (set && runStart < 0) runStart = (w << 5) | b;
      else if (!set && runStart >= 0) {
        out.push([runStart * TARGET_PAGE_SIZE, (((w << 5) | b) - runStart) * TARGET_PAGE_SIZE]);
        runStart = -1;
      }
    }
  }
  if (runStart >= 0) out.push([runStart * TARGET_PAGE_SIZE, (Math.min(words << 5, pages) - runStart) * TARGET_PAGE_SIZE]);
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
  let block: RamBlock | undefined;
  for (let i = 0; i < blocks.length && block === undefined; i++) if (blocks[i]!.name === name) block = blocks[i];
  if (!block) throw new MigrationStreamError(ERR.discardNoBlock(name));
  for (let i = 0; i < ranges.length; i++) {
    const [start, len] = ranges[i]!;
    if (start + len > block.size || start % TARGET_PAGE_SIZE !== 0 || len % TARGET_PAGE_SIZE !== 0) {
      throw new MigrationStreamError(ERR.discardOverrun(name, start, len));
    }
    clearRange(block.present, start / TARGET_PAGE_SIZE, (start + len) / TARGET_PAGE_SIZE);
  }
}
