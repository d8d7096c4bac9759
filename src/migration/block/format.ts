/**
 * QEMU's `block` section (docs/spec/stream-format.md §13): constants and the
 * record encoders. Every record starts with a be64 word
 *
 *   word = byte offset | flags        (offset = sector << 9, sectors of 512 bytes)
 *
 * with the flags in the low 9 bits. DEVICE_BLOCK is followed by the counted
 * device name and 1 MiB of data (none with ZERO_BLOCK); PROGRESS carries a
 * percentage where the sector would be; EOS ends the section's payload.
 */
import type { ByteSink } from '../stream/writer.js';

export const BLOCK = {
  IDSTR: 'block',
  INSTANCE: 0,
  VERSION: 1,
  /** QEMU's BLK_MIG_BLOCK_SIZE: the unit of block migration and of the dirty-chunk log. */
  CHUNK: 1 << 20,
  SECTOR_BITS: 9,
  /** The flags live in the bits below a sector. */
  FLAGS_MASK: 0x1ff,
  FLAG: {
    DEVICE_BLOCK: 0x01,
    EOS: 0x02,
    PROGRESS: 0x04,
    ZERO_BLOCK: 0x08,
  },
} as const;

const F = BLOCK.FLAG;

/** Bytes of a chunk record's header: the word and the counted name. */
export function chunkHeaderBytes(name: string): number {
  return 8 + 1 + Buffer.byteLength(name, 'utf8');
}

/**
 * A DEVICE_BLOCK record's header: `offset` (a multiple of 512) with the
 * flags, then the device name. The caller puts the 1 MiB of data after it,
 * unless `zero`.
 */
export function putChunkHeader(w: ByteSink, offset: number, name: string, zero: boolean): void {
  w.put64(offset + (zero ? F.DEVICE_BLOCK | F.ZERO_BLOCK : F.DEVICE_BLOCK));
  w.putCountedString(name);
}

/** PROGRESS: `percent` (0..100) stands where the sector would. */
export function putProgress(w: ByteSink, percent: number): void {
  w.put64(percent * 512 + F.PROGRESS);
}

export function putBlockEos(w: ByteSink): void {
  w.put64(F.EOS);
}
