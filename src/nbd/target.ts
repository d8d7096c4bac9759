/**
 * An image as an export target: what `qemu-nbd FILE` serves. The drives'
 * exports (nbd-server-add) go through the machine's drives instead (the
 * commands layer adapts them), so that guest-visible bookkeeping sees the
 * writes.
 */
import type { BlockImage } from '../block/index.js';
import type { NbdExportTarget } from './server.js';

/** base:allocation of a top image: unallocated with no backing file is a hole of zeros, a zero cluster reads as zeros. */
export async function imageAllocation(img: BlockImage, offset: number, length: number): Promise<{ hole: boolean; zero: boolean; length: number }> {
  const s = await img.blockStatus(offset, length);
  if (!s.allocated && img.backing === null) return { hole: true, zero: true, length: s.length };
  return { hole: false, zero: s.zero, length: s.length };
}

export function imageTarget(img: BlockImage): NbdExportTarget {
  return {
    get size() {
      return img.virtualSize;
    },
    read: (o, b) => img.read(o, b),
    write: (o, d) => img.write(o, d),
    writeZeroes: (o, n) => img.writeZeroes(o, n),
    flush: () => img.flush(),
    allocation: (o, n) => imageAllocation(img, o, n),
  };
}
