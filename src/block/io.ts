/**
 * File I/O helpers of the block layer: positional reads and writes that
 * finish the whole request, the one-request-at-a-time queue every image
 * uses, a small LRU of metadata tables, and QEMU-style error texts.
 */
import type { FileHandle } from 'node:fs/promises';
import { BlockError } from './types.js';

/**
 * Read buf[0, length) from `position`. Bytes past the end of the file read
 * as zeros (QEMU's block layer does the same). Returns the bytes that came
 * from the file.
 */
export async function preadFull(fh: FileHandle, buf: Uint8Array, position: number, length = buf.length): Promise<number> {
  let done = 0;
  while (done < length) {
    const { bytesRead } = await fh.read(buf, done, length - done, position + done);
    if (bytesRead === 0) {
      buf.fill(0, done, length);
      break;
    }
    done += bytesRead;
  }
  return done;
}

/** Write all of `data` at `position`. */
export async function pwriteFull(fh: FileHandle, data: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const { bytesWritten } = await fh.write(data, done, data.length - done, position + done);
    if (bytesWritten <= 0) throw new Error(`short write at offset ${position + done}`);
    done += bytesWritten;
  }
}

/** Write the buffers back to back at `position` (one pwritev; the rest retried on a short write). */
export async function pwritevFull(fh: FileHandle, bufs: Uint8Array[], position: number): Promise<void> {
  if (bufs.length === 1) return pwriteFull(fh, bufs[0]!, position);
  let total = 0;
  for (const b of bufs) total += b.length;
  const { bytesWritten } = await fh.writev(bufs, position);
  if (bytesWritten === total) return;
  // A short pwritev (rare on regular files): finish buffer by buffer.
  let skip = bytesWritten;
  let pos = position + bytesWritten;
  for (const b of bufs) {
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    const rest = skip > 0 ? b.subarray(skip) : b;
    skip = 0;
    await pwriteFull(fh, rest, pos);
    pos += rest.length;
  }
}

/**
 * Runs async jobs one at a time, in the order they were queued. A failed
 * job fails only its own caller.
 */
export class SerialQueue {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(job: () => Promise<T>): Promise<T> {
    const p = this.tail.then(job);
    this.tail = p.catch(() => undefined);
    return p;
  }
}

/** A least-recently-used map of metadata tables by file offset. */
export class TableCache {
  private readonly map = new Map<number, Buffer>();

  constructor(private readonly capacity: number) {}

  get(offset: number): Buffer | undefined {
    const b = this.map.get(offset);
    if (b !== undefined) {
      this.map.delete(offset);
      this.map.set(offset, b);
    }
    return b;
  }

  set(offset: number, table: Buffer): void {
    this.map.delete(offset);
    this.map.set(offset, table);
    if (this.map.size > this.capacity) {
      const oldest = this.map.keys().next().value as number;
      this.map.delete(oldest);
    }
  }

  delete(offset: number): void {
    this.map.delete(offset);
  }

  clear(): void {
    this.map.clear();
  }
}

const ERRNO_TEXT: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EPERM: 'Operation not permitted',
  EISDIR: 'Is a directory',
  ENOTDIR: 'Not a directory',
  ELOOP: 'Too many levels of symbolic links',
  EROFS: 'Read-only file system',
  EMFILE: 'Too many open files',
  ENAMETOOLONG: 'File name too long',
};

/** The strerror text of an fs error (QEMU prints those), else its message. */
export function errnoText(e: unknown): string {
  const code = (e as NodeJS.ErrnoException | null)?.code;
  if (code !== undefined && ERRNO_TEXT[code] !== undefined) return ERRNO_TEXT[code]!;
  return e instanceof Error ? e.message : String(e);
}

/** 0x-prefixed hex, as QEMU prints offsets. */
export function hex(n: number): string {
  return '0x' + n.toString(16);
}

/** Throws unless [offset, offset + length) is a range of whole bytes inside [0, size). */
export function checkRange(filename: string, size: number, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new BlockError(`Invalid request on '${filename}': offset ${offset}, length ${length}`);
  }
  if (offset + length > size) {
    throw new BlockError(`Request out of range on '${filename}': offset ${offset} + length ${length} is beyond the image's ${size} bytes`);
  }
}

/** A shared all-zero buffer for zero writes and zero fill (never written to). */
let zeroes: Buffer | null = null;
export const ZERO_CHUNK = 1 << 20;
export function zeroChunk(): Buffer {
  zeroes ??= Buffer.alloc(ZERO_CHUNK);
  return zeroes;
}

/**
 * One image file: positional I/O that keeps track of the file's size (the
 * qcow2 driver checks offsets against it) and the write barrier.
 */
export class ImageFile {
  constructor(
    readonly fh: FileHandle,
    /** Bytes in the file (grown by our own writes). */
    public size: number,
    /** Whether barrier() syncs (OpenOptions.barriers). */
    readonly barriers: boolean,
  ) {}

  /** Read buf[0, length) at `position`; zeros past the end of the file. Returns the bytes that came from the file. */
  read(buf: Uint8Array, position: number, length = buf.length): Promise<number> {
    return preadFull(this.fh, buf, position, length);
  }

  async write(data: Uint8Array, position: number): Promise<void> {
    await pwriteFull(this.fh, data, position);
    if (position + data.length > this.size) this.size = position + data.length;
  }

  async writev(bufs: Uint8Array[], position: number): Promise<void> {
    await pwritevFull(this.fh, bufs, position);
    let end = position;
    for (const b of bufs) end += b.length;
    if (end > this.size) this.size = end;
  }

  /** Everything written so far reaches the disk before anything written after (fdatasync), when barriers are on. */
  async barrier(): Promise<void> {
    if (this.barriers) await this.fh.datasync();
  }
}
