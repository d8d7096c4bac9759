/**
 * The raw format: the file is the disk. Positional reads and writes on one
 * FileHandle; the virtual size is the file's size at open.
 */
import type { FileHandle } from 'node:fs/promises';
import { bufferView } from '../base/bytes.js';
import { checkRange, preadFull, pwriteFull, pwritevFull, SerialQueue, ZERO_CHUNK, zeroChunk } from './io.js';
import { BlockError, type BlockImage, type BlockStatus } from './types.js';

export class RawImage implements BlockImage {
  readonly format = 'raw' as const;
  readonly backing = null;
  readonly clusterSize = 512;
  private readonly queue = new SerialQueue();
  private closed = false;

  constructor(
    private readonly fh: FileHandle,
    readonly filename: string,
    readonly virtualSize: number,
    readonly readOnly: boolean,
  ) {}

  async read(offset: number, buf: Uint8Array): Promise<void> {
    this.check(offset, buf.length, false);
    return this.queue.run(async () => {
      this.checkOpen();
      // Bytes past the end of the file (it shrank under us) read as zeros.
      await preadFull(this.fh, buf, offset);
    });
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.check(offset, data.length, true);
    return this.queue.run(async () => {
      this.checkOpen();
      await pwriteFull(this.fh, data, offset);
    });
  }

  async writev(offset: number, bufs: readonly Uint8Array[]): Promise<void> {
    let length = 0;
    for (const b of bufs) length += b.length;
    this.check(offset, length, true);
    return this.queue.run(async () => {
      this.checkOpen();
      await pwritevFull(this.fh, [...bufs], offset);
    });
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.check(offset, length, true);
    return this.queue.run(async () => {
      this.checkOpen();
      const z = zeroChunk();
      for (let done = 0; done < length; ) {
        const n = Math.min(ZERO_CHUNK, length - done);
        await pwriteFull(this.fh, bufferView(z).subarray(0, n), offset + done);
        done += n;
      }
    });
  }

  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    this.check(offset, length, false);
    // A raw image has no backing file: every byte is its own.
    return { allocated: true, zero: false, length };
  }

  async flush(): Promise<void> {
    return this.queue.run(async () => {
      this.checkOpen();
      if (!this.readOnly) await this.fh.datasync();
    });
  }

  async close(): Promise<void> {
    return this.queue.run(async () => {
      if (this.closed) return;
      this.closed = true;
      await this.fh.close();
    });
  }

  private check(offset: number, length: number, write: boolean): void {
    this.checkOpen();
    if (write && this.readOnly) throw new BlockError(`Cannot write to '${this.filename}': the image is open read-only`);
    checkRange(this.filename, this.virtualSize, offset, length);
  }

  private checkOpen(): void {
    if (this.closed) throw new BlockError(`Image '${this.filename}' is closed`);
  }
}
