/**
 * The source side of block migration: which 1 MiB chunk of which drive goes
 * next, the reads in flight, and the records they become
 * (docs/spec/stream-format.md §13).
 *
 * Per drive, a bulk walk goes once over every chunk in order (with `inc`,
 * only over chunks the top image holds: the rest is the backing chain the
 * destination already has). Every guest write while the migration runs marks
 * its chunks in the drive's dirty-chunk log (machine/dirty-chunks.ts);
 * sync() moves the log into this migration's `dirty` bitmap. A chunk behind
 * the bulk walk that is dirty is sent again once the bulk walk of every
 * drive has ended (QEMU's order: bulk first, then dirty chunks), in passes
 * over the drives. A chunk's dirty bit is cleared when its read is issued:
 * the read sees every write issued before it (one drive's requests run in
 * issue order), and a write issued after it is in the log again.
 *
 * Reads run ahead of the stream (up to `readAhead` chunks, across iterate()
 * calls), each into its own buffer; the data is copied into the stream's
 * staging buffer when its turn comes. With `zero-blocks`, an all-zero chunk
 * goes as a ZERO_BLOCK record without data.
 */
import { clearBit, countBits, newBitmap, nextSetBit, popcount32 } from '../../base/bitmap.js';
import { isZeroRange } from '../../base/bytes.js';
import type { DrivePort } from '../core/port.js';
import type { StreamWriter } from '../stream/writer.js';
import { BLOCK_ERR, BlockIoError } from './errors.js';
import { BLOCK, chunkHeaderBytes, putChunkHeader, putProgress } from './format.js';

const CHUNK = BLOCK.CHUNK;
/** Chunks read ahead of the stream by default in the bulk walk (QEMU keeps up to 16 reads in flight). */
const READ_AHEAD = 8;
/**
 * Reads in flight while dirty chunks go: few, and none left over between
 * calls. A chunk read early may be written again before it is sent, and
 * every queued read counts as pending, which would keep a small, hot dirty
 * set from ever fitting the downtime.
 */
const DIRTY_READ_AHEAD = 2;

export interface BlockSenderOptions {
  /** `inc` / block-incremental: the bulk walk skips what the top image does not hold. */
  incremental: boolean;
  /** `zero-blocks`: all-zero chunks go as a flag. */
  zeroBlocks: boolean;
  readAhead?: number;
  /** Called after each chunk record of the bulk walk is put (tests aim faults there: the source's `block-bulk` trace point). */
  onBulkChunk?(): void;
}

/** What query-migrate's `disk` shows (QEMU's: the bulk walk's progress). */
export interface DiskProgress {
  transferred: number;
  remaining: number;
  total: number;
}

class DriveState {
  readonly chunks: number;
  /** The next chunk the bulk walk looks at; it has not reached the chunks from here on. */
  bulkNext = 0;
  /** Chunks written since they were last read (what counts is below bulkNext). */
  dirty: Uint32Array;
  /** Where the next dirty pass over this drive goes on. */
  dirtyCursor = 0;

  constructor(
    readonly drive: DrivePort,
    /** Bytes of the drives before this one (for the progress percentage). */
    readonly base: number,
  ) {
    this.chunks = Math.ceil(drive.size / CHUNK);
    this.dirty = newBitmap(this.chunks);
  }

  get bulkDoneWalking(): boolean {
    return this.bulkNext >= this.chunks;
  }

  /** Dirty chunks behind the bulk walk. */
  dirtyBehind(): number {
    const n = this.bulkNext;
    if (n >= this.chunks) return countBits(this.dirty);
    let c = 0;
    const full = n >>> 5;
    for (let i = 0; i < full; i++) c += popcount32(this.dirty[i]!);
    if (n & 31) c += popcount32(this.dirty[full]! & ((1 << (n & 31)) - 1));
    return c;
  }
}

interface ChunkRead {
  d: DriveState;
  chunk: number;
  /** Part of the bulk walk (a PROGRESS record may go before it). */
  bulk: boolean;
  buf: Buffer;
  done: Promise<void>;
  failed: unknown;
}

export class BlockSender {
  private readonly drives: DriveState[];
  private readonly readAhead: number;
  private readonly queue: ChunkRead[] = [];
  private readonly free: Buffer[] = [];
  /** Round-robin position of the dirty passes over the drives. */
  private dirtyDrive = 0;
  private lastProgress = -1;
  private started = false;
  readonly total: number;
  /** Chunk records sent (with data, and as ZERO_BLOCK), those of the bulk walks, and bytes of block records put. */
  readonly counters = { chunks: 0, zeroChunks: 0, bulkChunks: 0, bytes: 0 };

  constructor(
    drives: readonly DrivePort[],
    private readonly opts: BlockSenderOptions,
  ) {
    let base = 0;
    this.drives = [];
    // QEMU migrates every drive it can write to; read-only ones are left out
    for (const d of drives) {
      if (d.readOnly) continue;
      this.drives.push(new DriveState(d, base));
      base += d.size;
    }
    this.total = base;
    this.readAhead = Math.max(1, opts.readAhead ?? READ_AHEAD);
  }

  /** The drives this migration copies, in order. */
  get driveList(): readonly DrivePort[] {
    return this.drives.map((s) => s.drive);
  }

  /** Start tracking guest writes on every drive (setup). */
  start(): void {
    for (const s of this.drives) s.drive.startDirtyTracking();
    this.started = true;
  }

  /** Stop tracking (cleanup; idempotent). Reads still in flight finish into buffers nobody reads. */
  stop(): void {
    if (!this.started) return;
    this.started = false;
    for (const s of this.drives) s.drive.stopDirtyTracking();
  }

  /** Move every drive's dirty-chunk log into this migration's bitmaps. */
  sync(): void {
    if (!this.started) return;
    for (const s of this.drives) {
      const got = s.drive.takeDirtyChunks();
      const bm = s.dirty;
      for (let i = 0; i < bm.length; i++) bm[i] = bm[i]! | got[i]!;
    }
  }

  /** Bytes still to send: the bulk walk's rest (an upper bound with `inc`), dirty chunks behind it, reads queued. */
  pendingBytes(): number {
    let chunks = this.queue.length;
    for (const s of this.drives) chunks += s.chunks - s.bulkNext + s.dirtyBehind();
    return chunks * (CHUNK + 16);
  }

  /** Flush every drive this migration copies (a failure is the drive's: BlockIoError). */
  async flushDrives(): Promise<void> {
    for (const s of this.drives) {
      try {
        await s.drive.flush();
      } catch (e) {
        throw new BlockIoError(BLOCK_ERR.flushFailed(s.drive.name, e), { cause: e });
      }
    }
  }

  /** Every drive's bulk walk has ended. */
  get bulkCompleted(): boolean {
    return this.drives.every((s) => s.bulkDoneWalking);
  }

  /**
   * QEMU's figures: the bytes the bulk walk has covered (sent, or with `inc`
   * skipped), up to the first of its chunks still being read.
   */
  progress(): DiskProgress {
    let done = 0;
    for (const s of this.drives) {
      let covered = Math.min(s.drive.size, s.bulkNext * CHUNK);
      for (const r of this.queue) if (r.d === s && r.bulk) covered = Math.min(covered, r.chunk * CHUNK);
      done += covered;
    }
    return { transferred: done, remaining: this.total - done, total: this.total };
  }

  /**
   * Send chunks until the budget is spent, the staging buffer wants a flush
   * or the rate limit is reached. Returns false when nothing is left to send
   * for now.
   */
  async send(w: StreamWriter, budget: { maxMillis: number; maxBytes?: number }, now: () => number): Promise<boolean> {
    const t0 = now();
    const b0 = w.bytesWritten;
    for (;;) {
      await this.fill(w);
      const r = this.queue.shift();
      if (r === undefined) return false;
      await this.put(w, r);
      if (now() - t0 >= budget.maxMillis) break;
      if (budget.maxBytes !== undefined && w.bytesWritten - b0 >= budget.maxBytes) break;
      if (w.wantsFlush() || w.rateLimitExceeded()) break;
    }
    // the next reads of the bulk walk run while the stream is flushed
    if (!this.bulkCompleted) await this.fill(w);
    return true;
  }

  /** Everything that is left (guest stopped): the bulk walk's rest and every dirty chunk. */
  async sendAll(w: StreamWriter): Promise<void> {
    this.sync();
    for (;;) {
      await this.fill(w);
      const r = this.queue.shift();
      if (r === undefined) break;
      await this.put(w, r);
      if (w.wantsFlush()) await w.flush();
    }
    putProgress(w, 100);
    this.lastProgress = 100;
  }

  /**
   * Issue reads until `readAhead` are in flight or nothing is left to read
   * now. As QEMU does, a bulk read puts the walk's PROGRESS record (when the
   * percentage changed) as it is issued, so several may precede their data.
   */
  private async fill(w: StreamWriter): Promise<void> {
    while (this.queue.length < (this.bulkCompleted ? Math.min(DIRTY_READ_AHEAD, this.readAhead) : this.readAhead)) {
      const next = await this.pick();
      if (next === null) return;
      const { d, chunk, bulk } = next;
      if (bulk && this.total > 0) {
        const pct = Math.floor(((d.base + chunk * CHUNK) * 100) / this.total);
        if (pct !== this.lastProgress) {
          const b0 = w.bytesWritten;
          putProgress(w, pct);
          this.counters.bytes += w.bytesWritten - b0;
          this.lastProgress = pct;
        }
      }
      this.queue.push(this.issue(d, chunk, bulk));
    }
  }

  /** The next chunk to read: bulk walks first, drive by drive, then dirty passes. */
  private async pick(): Promise<{ d: DriveState; chunk: number; bulk: boolean } | null> {
    for (const d of this.drives) {
      if (d.bulkDoneWalking) continue;
      if (this.opts.incremental) {
        // what the walk skips is the destination's backing chain: covered
        const at = await this.nextAllocated(d, d.bulkNext * CHUNK);
        d.bulkNext = Math.floor(at / CHUNK);
        if (d.bulkDoneWalking) continue;
      }
      const chunk = d.bulkNext++;
      return { d, chunk, bulk: true };
    }
    const n = this.drives.length;
    for (let k = 0; k < n; k++) {
      const i = (this.dirtyDrive + k) % n;
      const d = this.drives[i]!;
      let c = nextSetBit(d.dirty, d.dirtyCursor, d.chunks);
      if (c < 0 && d.dirtyCursor > 0) c = nextSetBit(d.dirty, 0, d.chunks);
      if (c < 0) continue;
      d.dirtyCursor = c + 1;
      this.dirtyDrive = i;
      return { d, chunk: c, bulk: false };
    }
    return null;
  }

  /** The first byte at or after `from` that the top image holds, or the drive's size. */
  private async nextAllocated(d: DriveState, from: number): Promise<number> {
    const size = d.drive.size;
    let pos = from;
    while (pos < size) {
      let st;
      try {
        st = await d.drive.blockStatus(pos, size - pos);
      } catch (e) {
        throw new BlockIoError(BLOCK_ERR.readFailed(d.drive.name, pos, e), { cause: e });
      }
      if (st.allocated) return pos;
      pos += Math.max(1, st.length);
    }
    return size;
  }

  private issue(d: DriveState, chunk: number, bulk: boolean): ChunkRead {
    // the read below sees every write whose bit this clears
    clearBit(d.dirty, chunk);
    const buf = this.free.pop() ?? Buffer.alloc(CHUNK);
    const offset = chunk * CHUNK;
    const len = Math.min(CHUNK, d.drive.size - offset);
    // a short last chunk still goes as 1 MiB: zeros after the drive's end
    if (len < CHUNK) buf.fill(0, len);
    const r: ChunkRead = { d, chunk, bulk, buf, done: Promise.resolve(), failed: undefined };
    r.done = d.drive.read(offset, len < CHUNK ? buf.subarray(0, len) : buf).catch((e: unknown) => {
      r.failed = e;
    });
    return r;
  }

  /** One chunk record, once its read is done. */
  private async put(w: StreamWriter, r: ChunkRead): Promise<void> {
    await r.done;
    const { d, chunk, buf } = r;
    const offset = chunk * CHUNK;
    if (r.failed !== undefined) throw new BlockIoError(BLOCK_ERR.readFailed(d.drive.name, offset, r.failed), { cause: r.failed });
    const b0 = w.bytesWritten;
    const zero = this.opts.zeroBlocks && isZeroRange(buf, 0, CHUNK);
    putChunkHeader(w, offset, d.drive.name, zero);
    if (r.bulk) this.counters.bulkChunks++;
    if (zero) this.counters.zeroChunks++;
    else {
      w.putBytes(buf, 0, CHUNK);
      this.counters.chunks++;
    }
    this.counters.bytes += w.bytesWritten - b0;
    if (this.free.length < this.readAhead) this.free.push(buf);
    if (r.bulk) this.opts.onBulkChunk?.();
  }
}

/** Bytes a chunk record takes on the wire (header and data). */
export function chunkRecordBytes(name: string, zero: boolean): number {
  return chunkHeaderBytes(name) + (zero ? 0 : CHUNK);
}
