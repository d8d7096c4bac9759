/**
 * Page bitmaps: one bit per page, bit `i` in word `i >>> 5` at position
 * `i & 31`, in a Uint32Array or (when shared with workers for Atomics) an
 * Int32Array. Every bitmap in Ferry (dirty log, migration bitmap, present
 * bits, touched bits, requested pages) uses this layout and these helpers.
 *
 * They are small and monomorphic so that V8 inlines them in the page loops;
 * none allocates.
 */

export type Bitmap = Uint32Array | Int32Array;

/** Words needed for `bits` bits. */
export function bitmapWords(bits: number): number {
  return (bits + 31) >>> 5;
}

/** A bitmap of `bits` bits, all clear, or all set (the bits past the end stay clear). */
export function newBitmap(bits: number, set = false): Uint32Array {
  const bm = new Uint32Array(bitmapWords(bits));
  if (set) fillBits(bm, bits);
  return bm;
}

/** Set bits [0, bits) and clear the rest of the last word. */
export function fillBits(bm: Bitmap, bits: number): void {
  const full = bits >>> 5;
  bm.fill(-1 as never, 0, full);
  const rest = bits & 31;
  if (rest) bm[full] = (1 << rest) - 1;
  if (full + (rest ? 1 : 0) < bm.length) bm.fill(0, full + (rest ? 1 : 0));
}

export function testBit(bm: Bitmap, i: number): boolean {
  return ((bm[i >>> 5]! >>> (i & 31)) & 1) !== 0;
}

export function setBit(bm: Bitmap, i: number): void {
  bm[i >>> 5] = bm[i >>> 5]! | (1 << (i & 31));
}

export function clearBit(bm: Bitmap, i: number): void {
  bm[i >>> 5] = bm[i >>> 5]! & ~(1 << (i & 31));
}

/** Mask of the valid bits of the last word of a `bits`-bit bitmap (all ones when it is full). */
export function tailMask(bits: number): number {
  return endMask(bits);
}

/** Set bits of a 32-bit word. */
export function popcount32(v: number): number {
  v = v - ((v >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return Math.imul((v + (v >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24;
}

/** Set bits in the whole bitmap. */
export function countBits(bm: Bitmap): number {
  let n = 0;
  for (let i = 0; i < bm.length; i++) {
    const w = bm[i]!;
    if (w !== 0) n += popcount32(w);
  }
  return n;
}

/** Clear bits in [0, bits) (bits past `bits` are not counted). */
export function countClear(bm: Bitmap, bits: number): number {
  let n = 0;
  const full = bits >>> 5;
  for (let i = 0; i < full; i++) {
    const w = bm[i]!;
    if (w !== -1 && w !== 0xffffffff) n += 32 - popcount32(w);
  }
  if (bits & 31) n += (bits & 31) - popcount32((bm[full]! & tailMask(bits)) >>> 0);
  return n;
}

/** Index of the lowest set bit of a non-zero word. */
export function lowestBit(w: number): number {
  return 31 - Math.clz32(w & -w);
}

/** The first set bit at or after `from` and before `bits`, or -1. */
export function nextSetBit(bm: Bitmap, from: number, bits: number): number {
  if (from >= bits) return -1;
  let wi = from >>> 5;
  let w = (bm[wi]! & (0xffffffff << (from & 31))) >>> 0;
  const last = (bits - 1) >>> 5;
  while (w === 0) {
    if (++wi > last) return -1;
    w = bm[wi]! >>> 0;
  }
  const i = (wi << 5) | lowestBit(w);
  return i < bits ? i : -1;
}

/** The first clear bit at or after `from` and before `bits`, or `bits`. */
export function nextClearBit(bm: Bitmap, from: number, bits: number): number {
  if (from >= bits) return bits;
  let wi = from >>> 5;
  let w = (~bm[wi]! & (0xffffffff << (from & 31))) >>> 0;
  const last = (bits - 1) >>> 5;
  while (w === 0) {
    if (++wi > last) return bits;
    w = ~bm[wi]! >>> 0;
  }
  const i = (wi << 5) | lowestBit(w);
  return i < bits ? i : bits;
}

/** The bits at and above `start` in its word. */
function headMask(start: number): number {
  return (0xffffffff << (start & 31)) >>> 0;
}

/** The bits below `end` in the word of bit end - 1. */
function endMask(end: number): number {
  return (end & 31) === 0 ? 0xffffffff : ((1 << (end & 31)) - 1) >>> 0;
}

/**
 * Clear bits [start, end), a word at a time (no call per bit: this runs
 * cold, once per migration, while the guest is stopped).
 */
export function clearRange(bm: Bitmap, start: number, end: number): void {
  if (start >= end) return;
  const head = headMask(start);
  const tail = endMask(end);
  let w = start >>> 5;
  const last = (end - 1) >>> 5;
  if (w === last) {
    bm[w] = bm[w]! & ~(head & tail);
    return;
  }
  bm[w] = bm[w]! & ~head;
  for (w++; w < last; w++) bm[w] = 0;
  bm[last] = bm[last]! & ~tail;
}

/** Set bits [start, end), a word at a time. */
export function setRange(bm: Bitmap, start: number, end: number): void {
  if (start >= end) return;
  const head = headMask(start);
  const tail = endMask(end);
  let w = start >>> 5;
  const last = (end - 1) >>> 5;
  if (w === last) {
    bm[w] = bm[w]! | (head & tail);
    return;
  }
  bm[w] = bm[w]! | head;
  for (w++; w < last; w++) bm[w] = -1;
  bm[last] = bm[last]! | tail;
}

/**
 * The runs of set bits in [0, bits), coalesced, as [first, count] pairs
 * (a discard list, a release list).
 */
export function setRuns(bm: Bitmap, bits: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let p = nextSetBit(bm, 0, bits); p >= 0; ) {
    const end = nextClearBit(bm, p, bits);
    out.push([p, end - p]);
    p = nextSetBit(bm, end, bits);
  }
  return out;
}
