/**
 * 64-bit values as JavaScript numbers. Migration streams carry be64 fields
 * (RAM offsets with flags in the low bits, lengths); every value Ferry uses
 * fits in 2^53, so it travels as two 32-bit halves and is joined as a double.
 */

/** 2^32. */
export const TWO32 = 4294967296;

/** High 32 bits of a non-negative safe integer. */
export function hi32(v: number): number {
  return v >= TWO32 ? Math.floor(v / TWO32) : 0;
}

/** Low 32 bits of a non-negative safe integer, as an unsigned number. */
export function lo32(v: number): number {
  return (v - hi32(v) * TWO32) >>> 0;
}

/** hi * 2^32 + lo (lo taken as unsigned). */
export function join64(hi: number, lo: number): number {
  return hi * TWO32 + (lo >>> 0);
}
