/** Byte-range helpers shared by the RAM code on both sides. */

/** A zero buffer to compare against (one page; longer ranges compare in steps). */
const ZERO = Buffer.alloc(4096);

/**
 * Whether buf[offset, offset + length) is all zero. A native memcmp against
 * a zero page: the fastest way measured (bench/codec-ram.ts).
 */
export function isZeroRange(buf: Buffer, offset: number, length: number): boolean {
  for (let o = offset, end = offset + length; o < end; o += ZERO.length) {
    const n = Math.min(ZERO.length, end - o);
    if (ZERO.compare(buf, o, o + n, 0, n) !== 0) return false;
  }
  return true;
}

/** Whether the 4 KiB page at buf[offset] is all zero (one memcmp; the RAM hot paths). */
export function isZeroPage(buf: Buffer, offset: number): boolean {
  return ZERO.compare(buf, offset, offset + 4096) === 0;
}

/** A Buffer view of a typed array's bytes (no copy). */
export function bufferView(a: Uint8Array): Buffer {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}
