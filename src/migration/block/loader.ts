/**
 * The destination side of block migration: QEMU's block_load
 * (docs/spec/stream-format.md §13). Records until EOS:
 *
 *   DEVICE_BLOCK  the device name must be a drive here ("Error unknown block
 *                 device NAME"), writable, and the chunk must start inside
 *                 it; the 1 MiB of data is written up to the drive's end,
 *                 cluster by cluster for qcow2 (1 MiB at a time for raw:
 *                 straight from the received buffers, one pwritev), and
 *                 what is all zero is written as zeroes (qcow2: zero
 *                 clusters), as QEMU does. With ZERO_BLOCK no data follows
 *                 and the chunk is written as zeroes.
 *   PROGRESS      the source's bulk percentage (kept, nothing else).
 *   EOS           ends the section's payload.
 *   anything else "Unknown block migration flags: 0x.."
 *
 * Writes run behind the stream: up to `window` chunks are in flight (each in
 * its own buffer) while the next records are read; one drive's writes run
 * in the order they were issued, so a chunk sent again later lands last.
 * The END section waits for every write, so the guest never starts on a
 * disk that is still being written; so does
 * loadComplete(), for a stream whose block section has no END. The first
 * failed write fails the load (BlockIoError).
 *
 * Inspection (`drives` null): nothing is written; an observer sees every
 * record.
 */
import { isZeroRange } from '../../base/bytes.js';
import { join64 } from '../../base/u64.js';
import type { DrivePort } from '../core/port.js';
import type { StreamReader } from '../stream/reader.js';
import { MigrationStreamError } from '../wire/errors.js';
import { BLOCK_ERR, BlockIoError } from './errors.js';
import { BLOCK } from './format.js';

const CHUNK = BLOCK.CHUNK;
const F = BLOCK.FLAG;
/** Chunks written behind the stream by default. */
const WRITE_WINDOW = 8;

export interface BlockRecordObserver {
  /** A DEVICE_BLOCK record (`data` null for a ZERO_BLOCK one). */
  chunk(device: string, offset: number, flags: number, data: Buffer | null): void;
  progress(percent: number, flags: number): void;
  eos(flags: number): void;
}

export interface BlockLoaderOptions {
  observer?: BlockRecordObserver;
  /** Keep each chunk's data for the observer (inspection; default false: it sees null). */
  keepData?: boolean;
  window?: number;
}

export class BlockLoader {
  /** The source's last PROGRESS percentage (-1: none yet). */
  progress = -1;
  /** Chunks applied (data and zero), and ZERO_BLOCK records among them. */
  readonly counters = { chunks: 0, zeroChunks: 0 };
  private readonly window: number;
  private readonly inflight: Promise<void>[] = [];
  private readonly free: Buffer[] = [];
  private failure: BlockIoError | undefined;

  constructor(
    /** The drives to write; null inspects. */
    private readonly drives: readonly DrivePort[] | null,
    private readonly opts: BlockLoaderOptions = {},
  ) {
    this.window = Math.max(1, opts.window ?? WRITE_WINDOW);
  }

  /** One section's payload, up to and including its EOS; `end` also waits for the writes. */
  async loadSection(r: StreamReader, end: boolean): Promise<void> {
    for (;;) {
      this.checkFailure();
      if (!r.has(8)) await r.ensure(8);
      const hi = r.get32();
      const lo = r.get32();
      const flags = lo & BLOCK.FLAGS_MASK;
      if (flags & F.DEVICE_BLOCK) {
        // sector << 9: the flag bits are clear in the offset
        await this.chunk(r, hi, lo - flags, flags);
      } else if (flags & F.PROGRESS) {
        this.progress = join64(hi, lo - flags) / 512;
        this.opts.observer?.progress(this.progress, flags);
      } else if (!(flags & F.EOS)) {
        throw new MigrationStreamError(BLOCK_ERR.unknownFlags(flags));
      }
      if (flags & F.EOS) {
        this.opts.observer?.eos(flags);
        break;
      }
    }
    if (end) await this.loadComplete();
  }

  /**
   * Every write done (END, or the end of the stream). Not flushed: as on
   * QEMU's destination, the writes sit in the host's page cache like any
   * guest write under cache=writeback (writethrough modes flushed each);
   * a sync here would only lengthen the downtime.
   */
  async loadComplete(): Promise<void> {
    await Promise.all(this.inflight);
    this.inflight.length = 0;
    this.checkFailure();
  }

  private checkFailure(): void {
    if (this.failure) throw this.failure;
  }

  private async chunk(r: StreamReader, hi: number, lo: number, flags: number): Promise<void> {
    const name = await r.readCountedString();
    const zero = (flags & F.ZERO_BLOCK) !== 0;
    // ≥ 2^53: beyond any drive (and not a safe integer)
    const offset = hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : join64(hi, lo);
    if (this.drives === null) {
      let data: Buffer | null = null;
      if (!zero) {
        if (!r.has(CHUNK)) await r.ensure(CHUNK);
        if (this.opts.keepData) data = r.getBytes(CHUNK);
        else r.skip(CHUNK);
      }
      this.counters.chunks++;
      if (zero) this.counters.zeroChunks++;
      this.opts.observer?.chunk(name, offset, flags, data);
      return;
    }
    const d = this.drives.find((x) => x.name === name);
    if (d === undefined) throw new MigrationStreamError(BLOCK_ERR.unknownDevice(name));
    if (d.readOnly) throw new MigrationStreamError(BLOCK_ERR.readOnly(name));
    if (offset >= d.size) throw new MigrationStreamError(BLOCK_ERR.chunkBeyondEnd(name, offset, d.size));
    const len = Math.min(CHUNK, d.size - offset);
    this.counters.chunks++;
    if (zero) {
      this.counters.zeroChunks++;
      this.opts.observer?.chunk(name, offset, flags, null);
      await this.schedule(d, offset, () => d.writeZeroes(offset, len));
      return;
    }
    if (!r.has(CHUNK)) await r.ensure(CHUNK);
    if (d.format === 'raw' && !r.pooled) {
      // raw: the received bytes go to the file as they lie in the stream's
      // chunks (one pwritev), without a copy; an all-zero chunk as zeroes.
      // Not with pooled reads: a pool buffer is refilled by a later read
      // while the write is still queued (reader.ts, getBytes), so the chunk
      // is copied into one of our buffers below
      const views = takeViews(r, CHUNK, len);
      this.opts.observer?.chunk(name, offset, flags, this.opts.keepData ? Buffer.concat(views) : null);
      const zeroes = views.every((v) => isZeroRange(v, 0, v.length));
      await this.schedule(d, offset, () => (zeroes ? d.writeZeroes(offset, len) : d.writev(offset, views)));
      return;
    }
    const buf = await this.buffer();
    r.copyTo(buf, 0, CHUNK);
    this.opts.observer?.chunk(name, offset, flags, this.opts.keepData ? Buffer.from(buf) : null);
    await this.schedule(d, offset, () => writeChunk(d, offset, buf, len), buf);
  }

  /** A free chunk buffer, waiting for the oldest write when all are in use. */
  private async buffer(): Promise<Buffer> {
    const b = this.free.pop();
    if (b !== undefined) return b;
    if (this.inflight.length >= this.window) await this.inflight.shift();
    return this.free.pop() ?? Buffer.allocUnsafe(CHUNK);
  }

  /** Start a write behind the stream; at most `window` run at once. */
  private async schedule(d: DrivePort, offset: number, write: () => Promise<void>, buf?: Buffer): Promise<void> {
    while (this.inflight.length >= this.window) await this.inflight.shift();
    this.checkFailure();
    const p = write().then(
      () => {
        if (buf !== undefined) this.free.push(buf);
      },
      (e: unknown) => {
        this.failure ??= new BlockIoError(BLOCK_ERR.writeFailed(d.name, offset, e), { cause: e });
      },
    );
    this.inflight.push(p);
  }

  /** Exactly once when the migration ends: writes still running finish by themselves. */
  cleanup(): void {
    this.inflight.length = 0;
    this.free.length = 0;
  }
}

/**
 * The next `n` bytes of the stream as views into its received chunks (valid
 * for good: the reader never reuses a chunk), keeping the first `keep` of
 * them; the rest are consumed and dropped.
 */
function takeViews(r: StreamReader, n: number, keep: number): Buffer[] {
  const views: Buffer[] = [];
  let kept = 0;
  while (n > 0) {
    const c = r.chunk;
    const off = r.chunkOffset;
    const take = Math.min(n, c.length - off);
    const want = Math.min(take, keep - kept);
    if (want > 0) views.push(c.subarray(off, off + want));
    kept += Math.max(0, want);
    r.consumeInChunk(take);
    n -= take;
  }
  return views;
}

/**
 * One chunk onto a drive, as QEMU's block_load does: in pieces of the
 * image's cluster size (qcow2; 1 MiB for raw), each all-zero piece as
 * zeroes, runs of like pieces in one request.
 */
async function writeChunk(d: DrivePort, offset: number, buf: Buffer, len: number): Promise<void> {
  const piece = d.format === 'qcow2' && d.clusterSize <= CHUNK && CHUNK % d.clusterSize === 0 ? d.clusterSize : CHUNK;
  let start = 0;
  let end = Math.min(piece, len);
  let zero = isZeroRange(buf, 0, end);
  for (;;) {
    // grow the run over the pieces of its kind
    while (end < len) {
      const n = Math.min(piece, len - end);
      if (isZeroRange(buf, end, n) !== zero) break;
      end += n;
    }
    if (zero) await d.writeZeroes(offset + start, end - start);
    else await d.write(offset + start, buf.subarray(start, end));
    if (end >= len) return;
    // the piece at `end` starts a run of the other kind
    start = end;
    end = Math.min(start + piece, len);
    zero = !zero;
  }
}
