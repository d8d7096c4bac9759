/**
 * An in-memory drive with the shape block migration uses (DrivePort): a
 * byte buffer, the machine's own dirty-chunk log, an allocation map for the
 * incremental mode, and a record of every request, so that tests of the
 * block section's encoder and loader need no image file.
 */
import { DirtyChunks } from '../../src/machine/dirty-chunks.js';
import type { DrivePort } from '../../src/migration/index.js';

export interface MemDriveOptions {
  format?: 'raw' | 'qcow2';
  clusterSize?: number;
  readOnly?: boolean;
  backingDepth?: number;
  /** Bytes the top image holds (incremental mode); default all. */
  allocated?: Array<[number, number]>;
}

export type Request =
  | { op: 'read'; offset: number; length: number }
  | { op: 'write'; offset: number; length: number }
  | { op: 'writev'; offset: number; length: number; parts: number }
  | { op: 'zero'; offset: number; length: number }
  | { op: 'flush' };

export class MemDrive implements DrivePort {
  readonly bytes: Buffer;
  readonly format: 'raw' | 'qcow2';
  readonly clusterSize: number;
  readonly readOnly: boolean;
  readonly backingDepth: number;
  readonly log: Request[] = [];
  readonly dirty: DirtyChunks;
  /** Make the next write (or zero write) fail with this error. */
  failWrites: Error | null = null;
  failReads: Error | null = null;
  /** Writes take this long (ms) before they land. */
  writeDelayMs = 0;
  private readonly allocated: Array<[number, number]> | undefined;

  constructor(
    readonly name: string,
    readonly size: number,
    opts: MemDriveOptions = {},
  ) {
    this.bytes = Buffer.alloc(size);
    this.format = opts.format ?? 'raw';
    this.clusterSize = opts.clusterSize ?? (this.format === 'raw' ? 512 : 65536);
    this.readOnly = opts.readOnly ?? false;
    this.backingDepth = opts.backingDepth ?? 0;
    this.allocated = opts.allocated;
    this.dirty = new DirtyChunks(size);
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    await Promise.resolve();
    this.log.push({ op: 'read', offset, length: buf.length });
    if (this.failReads) throw this.failReads;
    buf.set(this.bytes.subarray(offset, offset + buf.length));
  }

  /** A guest write: marks its chunks, like machine/drives.ts. */
  async write(offset: number, data: Uint8Array): Promise<void> {
    this.dirty.mark(offset, data.length);
    await Promise.resolve();
    this.log.push({ op: 'write', offset, length: data.length });
    if (this.failWrites) throw this.failWrites;
    this.bytes.set(data, offset);
  }

  async writev(offset: number, bufs: readonly Uint8Array[]): Promise<void> {
    const length = bufs.reduce((a, b) => a + b.length, 0);
    this.dirty.mark(offset, length);
    await Promise.resolve();
    if (this.writeDelayMs > 0) await new Promise((r) => setTimeout(r, this.writeDelayMs));
    this.log.push({ op: 'writev', offset, length, parts: bufs.length });
    if (this.failWrites) throw this.failWrites;
    let at = offset;
    for (const b of bufs) {
      this.bytes.set(b, at);
      at += b.length;
    }
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.dirty.mark(offset, length);
    await Promise.resolve();
    this.log.push({ op: 'zero', offset, length });
    if (this.failWrites) throw this.failWrites;
    this.bytes.fill(0, offset, offset + length);
  }

  async blockStatus(offset: number, length: number): Promise<{ allocated: boolean; length: number }> {
    if (this.allocated === undefined) return { allocated: true, length };
    const end = offset + length;
    let next = end;
    for (const [a, n] of this.allocated) {
      if (offset >= a && offset < a + n) return { allocated: true, length: Math.min(end, a + n) - offset };
      if (a > offset) next = Math.min(next, a);
    }
    return { allocated: false, length: next - offset };
  }

  async flush(): Promise<void> {
    this.log.push({ op: 'flush' });
  }

  startDirtyTracking(): void {
    this.dirty.start();
  }

  stopDirtyTracking(): void {
    this.dirty.stop();
  }

  takeDirtyChunks(): Uint32Array {
    return this.dirty.take();
  }

  dirtyChunkCount(): number {
    return this.dirty.count();
  }
}
