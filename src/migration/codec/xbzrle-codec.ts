/**
 * XBZRLE page deltas (docs/spec/xbzrle.md §2): pairs of (zero-run length, nonzero-run
 * length, nonzero-run bytes), lengths as ULEB128 limited to two bytes.
 * Byte-exact with QEMU's encoder (maximal runs, same overflow rules).
 */

/** Encoded length of v as small ULEB128 (1 or 2 bytes). */
function ulebPut(out: Uint8Array, at: number, v: number): number {
  if (v < 0x80) {
    out[at] = v;
    return 1;
  }
  out[at] = (v & 0x7f) | 0x80;
  out[at + 1] = v >> 7;
  return 2;
}

const EMPTY32 = new Int32Array(0);

/**
 * Encode the delta from `oldPage` to `newPage` (same length, at most 16383)
 * into out[outOffset ..]. `maxLen` is the room QEMU allows (one page).
 * Returns the encoded length (0: the pages are equal, nothing to send) or
 * -1 on overflow.
 *
 * Equal runs are skipped 16 bytes at a time (xor-or of four 32-bit words),
 * then 8, when both pages are 4-byte aligned, and finished byte by byte, so
 * the runs found are exactly those of the byte loop of docs/spec/xbzrle.md §2.1 and the
 * output is the same.
 */
export function xbzrleEncode(
  oldPage: Uint8Array,
  newPage: Uint8Array,
  out: Uint8Array,
  outOffset: number,
  maxLen: number,
): number {
  const n = newPage.length;
  if (oldPage.length !== n) throw new RangeError('xbzrleEncode: page sizes differ');
  if (n > 0x3fff) throw new RangeError('xbzrleEncode: page too large');
  if (outOffset + maxLen > out.length) maxLen = out.length - outOffset;
  const oOff = oldPage.byteOffset;
  const nOff = newPage.byteOffset;
  const words = ((oOff | nOff) & 3) === 0;
  const o32 = words ? new Int32Array(oldPage.buffer, oOff, n >>> 2) : EMPTY32;
  const n32 = words ? new Int32Array(newPage.buffer, nOff, n >>> 2) : EMPTY32;
  const n8 = n & ~7;
  let i = 0;
  let d = 0;
  while (i < n) {
    if (d + 2 > maxLen) return -1;
    const zs = i;
    if (words) {
      // to an 8-byte boundary of the page, then whole words
      while (i < n && (i & 7) !== 0 && oldPage[i] === newPage[i]) i++;
      if ((i & 7) === 0) {
        let w = i >>> 2;
        // 16 bytes per step (xor-or of four words), then 8
        while (i + 16 <= n && ((o32[w]! ^ n32[w]!) | (o32[w + 1]! ^ n32[w + 1]!) | (o32[w + 2]! ^ n32[w + 2]!) | (o32[w + 3]! ^ n32[w + 3]!)) === 0) {
          i += 16;
          w += 4;
        }
        while (i < n8 && o32[w] === n32[w] && o32[w + 1] === n32[w + 1]) {
          i += 8;
          w += 2;
        }
      }
    }
    while (i < n && oldPage[i] === newPage[i]) i++;
    if (i === n) break;
    d += ulebPut(out, outOffset + d, i - zs);
    if (d + 2 > maxLen) return -1;
    const ns = i;
    while (i < n && oldPage[i] !== newPage[i]) i++;
    const nz = i - ns;
    d += ulebPut(out, outOffset + d, nz);
    if (d + nz > maxLen) return -1;
    out.set(newPage.subarray(ns, i), outOffset + d);
    d += nz;
  }
  return d;
}

/**
 * Apply an encoded delta src[srcOffset, srcOffset+srcLen) to `page` in place
 * (QEMU's xbzrle_decode_buffer rules). Returns the number of page bytes
 * covered (the end of the last run), or -1 when the input is malformed.
 */
export function xbzrleDecode(src: Uint8Array, srcOffset: number, srcLen: number, page: Uint8Array): number {
  const dlen = page.length;
  const end = srcOffset + srcLen;
  if (end > src.length) return -1;
  let i = srcOffset;
  let d = 0;
  while (i < end) {
    // zero run
    const first = i === srcOffset;
    if (end - i < 2) return -1;
    let b = src[i]!;
    let count: number;
    if (b & 0x80) {
      const b2 = src[i + 1]!;
      if (b2 & 0x80) return -1;
      count = (b & 0x7f) | (b2 << 7);
      i += 2;
    } else {
      count = b;
      i += 1;
    }
    if (count === 0 && !first) return -1; // only the first zrun may be 0
    d += count;
    if (d > dlen) return -1;
    // nonzero run
    if (end - i < 2) return -1;
    b = src[i]!;
    if (b & 0x80) {
      const b2 = src[i + 1]!;
      if (b2 & 0x80) return -1;
      count = (b & 0x7f) | (b2 << 7);
      i += 2;
    } else {
      count = b;
      i += 1;
    }
    if (count === 0) return -1;
    if (d + count > dlen || i + count > end) return -1;
    page.set(src.subarray(i, i + count), d);
    d += count;
    i += count;
  }
  return d;
}
