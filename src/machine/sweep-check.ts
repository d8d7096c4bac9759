/**
 * Checker for the `sweep` workload's memory pattern: within [start, end) the
 * first bytes of the pages must read v+1 for pages [start, k) and v for
 * pages [k, end) (mod 256), for some k (k = start allowed: all equal).
 * Valid once the first round has completed, or from boot on zero-filled RAM.
 */
import type { Machine } from './machine.js';
import { TARGET_PAGE_SIZE } from './types.js';

export interface SweepMismatch {
  /** guest-physical address of the first bad page */
  addr: number;
  expected: number;
  actual: number;
}

export function checkSweep(m: Machine, range?: { start: number; end: number }): SweepMismatch | null {
  const w = m.workload;
  let start: number;
  let end: number;
  if (range) ({ start, end } = range);
  else if (w.kind === 'sweep') {
    start = w.start!;
    end = w.end!;
  } else throw new Error(`checkSweep: workload is '${w.kind}', not sweep`);
  const first = m.read(start, 1)[0]!;
  let cur = first;
  let dropped = false;
  for (let a = start + TARGET_PAGE_SIZE; a < end; a += TARGET_PAGE_SIZE) {
    const { block, offset } = m.locate(a);
    const v = block.bytes[offset]!;
    if (v === cur) continue;
    if (!dropped && v === ((cur - 1) & 255)) {
      dropped = true;
      cur = v;
      continue;
    }
    return { addr: a, expected: cur, actual: v };
  }
  return null;
}
