/**
 * The errors of block migration: QEMU's texts where QEMU has one (the
 * destination's "Error unknown block device" and "Unknown block migration
 * flags", and the mirror job's "Source and target image have different
 * sizes"), and a failure kind of its own for a disk that cannot be read or
 * written.
 */
import { MigrationFailure } from '../errors.js';
import { hexAlt } from '../wire/errors.js';

/** A read of a source drive or a write of a destination drive failed (ENOSPC, EIO...). */
export class BlockIoError extends MigrationFailure {
  readonly kind = 'io';
  override readonly name = 'BlockIoError';
}

const STRERROR: Record<string, string> = {
  ENOSPC: 'No space left on device',
  EIO: 'Input/output error',
  EDQUOT: 'Disk quota exceeded',
  EROFS: 'Read-only file system',
  EFBIG: 'File too large',
  EACCES: 'Permission denied',
  EPERM: 'Operation not permitted',
};

/** The C library's text for an fs error's code, else the error's own message. */
export function ioReason(e: unknown): string {
  const code = (e as NodeJS.ErrnoException | null)?.code;
  return (code !== undefined ? STRERROR[code] : undefined) ?? (e instanceof Error ? e.message : String(e));
}

export const BLOCK_ERR = {
  /** QEMU's block_load, for a name that no drive here has. */
  unknownDevice: (name: string) => `Error unknown block device ${name}`,
  /** QEMU's block_load, for a record word it does not know (C's %#x). */
  unknownFlags: (flags: number) => `Unknown block migration flags: ${hexAlt(flags)}`,
  /** QEMU's mirror and backup jobs, with the drive and the sizes. */
  sizeMismatch: (name: string, source: number, target: number) =>
    `Block device '${name}': Source and target image have different sizes (source ${source} bytes, target ${target} bytes)`,
  /** A chunk that starts at or past the end of the destination's drive. */
  chunkBeyondEnd: (name: string, offset: number, size: number) =>
    `Block device '${name}': Source and target image have different sizes (a chunk at byte ${offset} lies beyond the target's ${size} bytes)`,
  readOnly: (name: string) => `Block device '${name}' is read-only: it cannot receive block migration data`,
  noBacking: (name: string) =>
    `Block device '${name}' has no backing file: an incremental block migration (inc, block-incremental) needs the source's backing chain on the destination`,
  /** The source named a drive the check section listed twice, or a count beyond reason. */
  badDriveList: (why: string) => `Malformed ferry-block-drives section: ${why}`,
  readFailed: (name: string, offset: number, e: unknown) => `Block device '${name}': read at byte ${offset} failed: ${ioReason(e)}`,
  flushFailed: (name: string, e: unknown) => `Block device '${name}': flush failed: ${ioReason(e)}`,
  writeFailed: (name: string, offset: number, e: unknown) => `Block device '${name}': write at byte ${offset} failed: ${ioReason(e)}`,
} as const;
