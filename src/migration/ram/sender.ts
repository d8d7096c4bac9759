/**
 * RamSender: the source side of the `ram` section (docs/spec/stream-format.md §9).
 *
 * Owns one migration bitmap per RAM block (bit set = page must be sent),
 * all ones for the first pass. syncDirtyLog() moves the vCPUs' dirty bits
 * into it; sendPages() walks it from a cursor that survives between calls,
 * emitting ZERO / PAGE records into a StreamWriter, within a budget.
 */
import { clearBit, lowestBit, newBitmap, popcount32, tailMask, testBit } from '../../base/bitmap.js';
import { bufferView, isZeroPage } from '../../base/bytes.js';
import { copyBytes, multifdNative, nativePages, savePageRun, sendPageRun } from '../../base/native.js';
import { hi32, lo32 } from '../../base/u64.js';
import type { RamBlock } from '../../machine/types.js';
import { TARGET_PAGE_SIZE } from '../../machine/types.js';
import type { CompressPool } from '../codec/compress-pool.js';
import type { MultifdSender } from '../multifd/sender.js';
import type { ByteSink, StreamWriter } from '../stream/writer.js';
import { WIRE } from '../wire/constants.js';

const F = WIRE.RAM;

export interface SendBudget {
  /** Stop after this many pages (default unlimited). */
  maxPages?: number;
  /** Stop after about this many milliseconds (default 5; checked every 64 pages). */
  maxMillis?: number;
  /** Stop once this many bytes were written (sendPages only; default unlimited). */
  maxBytes?: number;
}

export interface SendResult {
  /** Pages taken off the bitmap in this call (sent, or skipped by the page hook). */
  pages: number;
  /** The bitmap is empty: nothing left to send until the next sync. */
  done: boolean;
}

/** What a page hook did with a page. */
export enum PageHookResult {
  /** Not handled: the sender sends ZERO or PAGE as usual. */
  Default = 0,
  /** The hook wrote a record for the page (with `cont` honoured). */
  Sent = 1,
  /** Nothing was written (e.g. XBZRLE found the page unchanged). */
  Skipped = 2,
}

/**
 * Per-page encoder choice (XBZRLE, compression later). Called for every page
 * taken off the bitmap; `cont` says whether the record may carry CONTINUE.
 */
export type PageHook = (
  w: StreamWriter,
  block: RamBlock,
  blockIndex: number,
  page: number,
  cont: boolean,
  isZero: boolean,
  bulkStage: boolean,
) => PageHookResult;

/** Write a RAM record header word (+ block name unless `cont`). */
export function putRamRecordHeader(w: ByteSink, block: RamBlock, offset: number, flags: number, cont: boolean): void {
  w.put64Parts(hi32(offset), (lo32(offset) | flags | (cont ? F.CONTINUE : 0)) >>> 0);
  if (!cont) w.putCountedString(block.name);
}

export interface RamSenderCounters {
  /** zero pages sent as ZERO records (QEMU "duplicate") */
  duplicate: number;
  /** full PAGE records */
  normal: number;
  /** normal * page size */
  normalBytes: number;
  /** bytes of RAM records incl. headers, names, block list and EOS words */
  transferred: number;
  /** pages handled by the page hook */
  hooked: number;
  /** COMPRESS_PAGE records (QEMU 2.10 counts them as `normal` too) */
  compressed: number;
  /** bytes of COMPRESS_PAGE records (header word, name, length, data) */
  compressedBytes: number;
}

/** Kinds of the records of a compressed batch, in stream order. */
const enum Item {
  Zero = 0,
  /** plain PAGE: first page after a change of block */
  Page = 1,
  Compressed = 2,
}

export class RamSender {
  readonly blocks: readonly RamBlock[];
  /** Migration bitmap per block: bit p of word p>>5 = page p to send. */
  readonly bitmaps: Uint32Array[];
  private readonly views: Buffer[];
  /** Pages set in the migration bitmaps. */
  dirtyPages = 0;
  /** Number of syncDirtyLog() calls (QEMU dirty-sync-count). */
  dirtySyncCount = 0;
  /** True until the walk has wrapped around once (first complete pass). */
  bulkStage = true;
  readonly counters: RamSenderCounters = {
    duplicate: 0, normal: 0, normalBytes: 0, transferred: 0, hooked: 0, compressed: 0, compressedBytes: 0,
  };
  /** Sum of the blocks' sizes. */
  readonly totalBytes: number;

  private curBlock = 0;
  private curPage = 0;
  /** Index of the block named by the last record; survives sections. */
  private lastBlock = -1;
  private hook: PageHook | null = null;
  private readonly now: () => number;
  /** Encode runs of records with native/pages (savePageRun) where the JS loop would do the same. */
  private readonly runs: boolean;
  /** PAGE records, ZERO records, bytes (and, for direct runs, bytes left staged and whether the send was short) of the last native run. */
  private readonly runCounts = new Float64Array(5);

  constructor(blocks: readonly RamBlock[], opts: { now?: () => number; nativeRuns?: boolean } = {}) {
    this.blocks = blocks;
    this.now = opts.now ?? (() => performance.now());
    this.runs = (opts.nativeRuns ?? true) && nativePages;
    this.bitmaps = blocks.map((b) => newBitmap(b.pages, true));
    this.views = blocks.map((b) => bufferView(b.bytes));
    let total = 0;
    for (const b of blocks) {
      total += b.size;
      this.dirtyPages += b.pages;
    }
    this.totalBytes = total;
  }

  /** Install (or remove) the per-page encoder hook. */
  setPageHook(hook: PageHook | null): void {
    this.hook = hook;
  }

  /** Forget the last block, so the next record carries a name (postcopy switch). */
  resetLastBlock(): void {
    this.lastBlock = -1;
  }

  /** Bytes still to send (dirty pages * page size). */
  get remainingBytes(): number {
    return this.dirtyPages * TARGET_PAGE_SIZE;
  }

  /**
   * Take-and-clear every word of each block's dirty log (Atomics.exchange)
   * and OR it into the migration bitmap. Returns the number of pages that
   * became dirty in the migration bitmap.
   */
  syncDirtyLog(): number {
    let n = 0;
    for (let b = 0; b < this.blocks.length; b++) {
      const dirty = this.blocks[b]!.dirty;
      const touched = this.blocks[b]!.touched;
      const bm = this.bitmaps[b]!;
      const len = Math.min(bm.length, dirty.length);
      const last = bm.length - 1;
      const mask = tailMask(this.blocks[b]!.pages);
      for (let i = 0; i < len; i++) {
        if (dirty[i] === 0) continue;
        let v = Atomics.exchange(dirty, i, 0) >>> 0;
        touched[i] = (touched[i]! | v) >>> 0;
        if (i === last) v = (v & mask) >>> 0;
        const fresh = (v & ~bm[i]!) >>> 0;
        if (fresh !== 0) {
          n += popcount32(fresh);
          bm[i] = (bm[i]! | v) >>> 0;
        }
      }
    }
    this.dirtyPages += n;
    this.dirtySyncCount++;
    return n;
  }

  /** The START payload: MEM_SIZE block list, then EOS. */
  sendSetup(w: StreamWriter): void {
    this.sendBlockList(w);
    this.sendEos(w);
  }

  /** The MEM_SIZE block list (the START payload before its EOS). */
  sendBlockList(w: StreamWriter): void {
    const start = w.bytesWritten;
    this.lastBlock = -1;
    w.put64Parts(hi32(this.totalBytes), (lo32(this.totalBytes) | F.MEM_SIZE) >>> 0);
    for (const b of this.blocks) {
      w.putCountedString(b.name);
      w.put64(b.size);
    }
    this.counters.transferred += w.bytesWritten - start;
  }

  /** Bytes that went out on the multifd channels (they count as transferred, as in QEMU). */
  countMultifd(bytes: number): void {
    this.counters.transferred += bytes;
  }

  /** End of the RAM payload of a section. */
  sendEos(w: StreamWriter): void {
    w.put64Parts(0, F.EOS);
    this.counters.transferred += 8;
  }

  /** Whether page `p` of block `b` is zero: never written since boot (no read, no fault-in), or all zero bytes. */
  private isZero(block: RamBlock, b: number, p: number): boolean {
    return !testBit(block.touched, p) || isZeroPage(this.views[b]!, p * TARGET_PAGE_SIZE);
  }

  /**
   * Send dirty pages from the cursor on. Stops when the bitmap is empty, the
   * writer's rate limit is hit, the staging buffer wants a flush, or the
   * budget (pages / milliseconds) is spent.
   */
  sendPages(w: StreamWriter, budget: SendBudget = {}): SendResult {
    const maxPages = budget.maxPages ?? Infinity;
    const maxMs = budget.maxMillis ?? 5;
    const startBytes = w.bytesWritten;
    const endBytes = startBytes + (budget.maxBytes ?? Infinity);
    const t0 = this.now();
    let pages = 0;

    while (pages < maxPages) {
      if (w.rateLimitExceeded() || w.wantsFlush() || w.bytesWritten >= endBytes) break;
      if (!this.seekDirty()) break;
      // take the page under the cursor
      const b = this.curBlock;
      const p = this.curPage;
      if (this.runs && this.hook === null && this.lastBlock === b) {
        // the records the loop below would write (CONTINUE ZERO/PAGE), a run at a time
        const taken = this.saveRun(w, b, p, maxPages - pages, endBytes);
        if (taken > 0) {
          pages += taken;
          if (this.now() - t0 >= maxMs) break;
          continue;
        }
      }
      clearBit(this.bitmaps[b]!, p);
      this.dirtyPages--;

      const block = this.blocks[b]!;
      const cont = this.lastBlock === b;
      const zero = this.isZero(block, b, p);
      let handled = PageHookResult.Default;
      if (this.hook !== null) {
        handled = this.hook(w, block, b, p, cont, zero, this.bulkStage);
        if (handled !== PageHookResult.Default) this.counters.hooked++;
      }
      if (handled === PageHookResult.Default) {
        this.putPage(w, b, p, cont, zero);
      } else if (handled === PageHookResult.Sent) {
        this.lastBlock = b;
      }
      this.curPage = p + 1;
      pages++;
      if ((pages & 63) === 0 && this.now() - t0 >= maxMs) break;
    }
    this.counters.transferred += w.bytesWritten - startBytes;
    return { pages, done: this.dirtyPages === 0 };
  }

  /**
   * Encode pages of block b from page p on (at most maxPages, within the
   * staging buffer, the rate-limit window and endBytes) with native/pages;
   * returns how many were taken.
   */
  private saveRun(w: StreamWriter, b: number, p: number, maxPages: number, endBytes: number): number {
    const block = this.blocks[b]!;
    const c = this.runCounts;
    c.fill(0);
    const fd = sendPageRun !== null ? w.directFd() : -1;
    if (fd >= 0) {
      // straight from guest RAM to the socket, after what is staged
      const room = Math.min(endBytes - w.bytesWritten, w.windowRoom(), Number.MAX_SAFE_INTEGER);
      if (room < 9) return 0;
      const next = sendPageRun!(fd, this.bitmaps[b]!, block.touched, block.bytes, p, block.pages, Math.min(maxPages, 0x7fffffff), room,
        w.buf, w.stageStart, w.offset, w.capacity, c);
      w.afterDirect(c[2]!, c[3]!, c[4] === 1);
      return this.tookRun(next, c);
    }
    const room = Math.min(w.spaceLeft, endBytes - w.bytesWritten, w.windowRoom());
    if (room < 9) return 0;
    const at = w.offset;
    const next = savePageRun(this.bitmaps[b]!, block.touched, block.bytes, p, block.pages, Math.min(maxPages, 0x7fffffff), w.buf, at, at + room, c);
    if (c[0]! + c[1]! > 0) w.commit(c[2]!);
    return this.tookRun(next, c);
  }

  /** Counters and cursor after a native run; returns the pages taken. */
  private tookRun(next: number, c: Float64Array): number {
    const taken = c[0]! + c[1]!;
    if (taken === 0) return 0;
    this.curPage = next;
    this.dirtyPages -= taken;
    this.counters.normal += c[0]!;
    this.counters.normalBytes += c[0]! * TARGET_PAGE_SIZE;
    this.counters.duplicate += c[1]!;
    return taken;
  }

  /** A ZERO or PAGE record for page p of block b; the block becomes the last block. */
  private putPage(w: StreamWriter, b: number, p: number, cont: boolean, zero: boolean): void {
    const block = this.blocks[b]!;
    const offset = p * TARGET_PAGE_SIZE;
    if (zero) {
      putRamRecordHeader(w, block, offset, F.ZERO, cont);
      w.put8(0);
      this.counters.duplicate++;
    } else {
      putRamRecordHeader(w, block, offset, F.PAGE, cont);
      const at = w.reserve(TARGET_PAGE_SIZE);
      copyBytes(w.buf, at, block.bytes, offset, TARGET_PAGE_SIZE);
      this.counters.normal++;
      this.counters.normalBytes += TARGET_PAGE_SIZE;
    }
    this.lastBlock = b;
  }

  /**
   * sendPages with `multifd` (docs/spec/multifd.md): pages with data go into
   * the channels' packets (`mfd`), zero pages stay ZERO records on the main
   * stream. The packet bytes are accounted in the writer (rate limit,
   * throughput) and in `transferred`. Stops like sendPages, and also when
   * a full packet finds no channel with room (`blocked`: wait with
   * mfd.room() and call again).
   */
  sendPagesMultifd(w: StreamWriter, mfd: MultifdSender, budget: SendBudget = {}): SendResult & { blocked: boolean } {
    const native = multifdNative!;
    const maxPages = budget.maxPages ?? Infinity;
    const maxMs = budget.maxMillis ?? 5;
    const t0 = this.now();
    const c = this.runCounts;
    let pages = 0;
    let blocked = false;
    let packetBytes = 0;
    while (pages < maxPages) {
      if (w.rateLimitExceeded() || w.wantsFlush()) break;
      if (!this.seekDirty()) break;
      const b = this.curBlock;
      const p = this.curPage;
      if (mfd.mustDispatch(b)) {
        const n = mfd.dispatch();
        if (n < 0) {
          blocked = true;
          break;
        }
        w.addSentElsewhere(n);
        packetBytes += n;
        continue;
      }
      const block = this.blocks[b]!;
      if (this.lastBlock !== b && this.isZero(block, b, p)) {
        // the first ZERO record of a block names it
        clearBit(this.bitmaps[b]!, p);
        this.dirtyPages--;
        const before = w.bytesWritten;
        this.putPage(w, b, p, false, true);
        this.counters.transferred += w.bytesWritten - before;
        this.curPage = p + 1;
        pages++;
        continue;
      }
      mfd.fillFor(b);
      c.fill(0);
      c[0] = mfd.packetPages;
      const room = Math.min(w.spaceLeft, w.windowRoom());
      const at = w.offset;
      const next = native.walk(this.bitmaps[b]!, block.touched, block.bytes, p, block.pages, Math.min(maxPages - pages, 0x7fffffff),
        w.buf, at, at + Math.max(0, room), this.lastBlock === b, mfd.packet, c);
      const zeros = c[1]!;
      const added = c[3]!;
      if (c[2]! > 0) w.commit(c[2]!);
      mfd.packetPages = c[0]!;
      this.curPage = next;
      this.dirtyPages -= zeros + added;
      this.counters.duplicate += zeros;
      this.counters.normal += added;
      this.counters.normalBytes += added * TARGET_PAGE_SIZE;
      this.counters.transferred += c[2]!;
      pages += zeros + added;
      if (zeros + added === 0 && !mfd.mustDispatch(b)) break; // a zero page with no room for its record
      if (this.now() - t0 >= maxMs) break;
    }
    this.counters.transferred += packetBytes;
    return { pages, done: this.dirtyPages === 0 && mfd.packetPages === 0, blocked };
  }

  /**
   * Postcopy page request: send the pages of [page, page + n) of block b that
   * are still in the bitmap (a page already sent is not sent again, the
   * destination has it or it is on its way), as plain ZERO/PAGE records, and
   * move the background walk's cursor behind them. Returns the pages sent.
   */
  sendRequested(w: StreamWriter, b: number, page: number, n: number): number {
    const startBytes = w.bytesWritten;
    const bm = this.bitmaps[b]!;
    const block = this.blocks[b]!;
    let sent = 0;
    for (let p = page; p < page + n; p++) {
      if (!testBit(bm, p)) continue;
      clearBit(bm, p);
      this.dirtyPages--;
      this.putPage(w, b, p, this.lastBlock === b, this.isZero(block, b, p));
      sent++;
    }
    if (page + n < block.pages) {
      this.curBlock = b;
      this.curPage = page + n;
    }
    this.counters.transferred += w.bytesWritten - startBytes;
    return sent;
  }

  // ---- compressed pages (`compress`, docs/spec/xbzrle.md §6) ------------------------

  /** Batch bookkeeping for sendPagesCompressed, sized on first use. */
  private batchKind: Uint8Array = new Uint8Array(0);
  private batchBlock: Uint32Array = new Uint32Array(0);
  private batchPage: Uint32Array = new Uint32Array(0);
  /** Average bytes of a COMPRESS_PAGE record so far (sizes batches to the rate limit). */
  private compressedAvg = TARGET_PAGE_SIZE;

  /**
   * Move the cursor (curBlock, curPage) to the next page whose bit is set,
   * without taking it. Wrapping around ends the bulk stage. False when the
   * bitmaps are empty.
   */
  private seekDirty(): boolean {
    if (this.dirtyPages === 0) return false;
    const nblocks = this.blocks.length;
    let b = this.curBlock;
    let p = this.curPage;
    let bm = this.bitmaps[b]!;
    let wi = p >>> 5;
    let word = wi < bm.length ? (bm[wi]! & (0xffffffff << (p & 31))) >>> 0 : 0;
    while (word === 0) {
      wi++;
      if (wi >= bm.length) {
        b++;
        if (b >= nblocks) {
          b = 0;
          this.bulkStage = false;
        }
        bm = this.bitmaps[b]!;
        wi = 0;
        if (bm.length === 0) {
          wi = -1;
          continue;
        }
      }
      word = bm[wi]!;
    }
    this.curBlock = b;
    this.curPage = (wi << 5) | lowestBit(word);
    return true;
  }

  /**
   * sendPages with the `compress` capability: non-zero pages go out as
   * COMPRESS_PAGE records deflated on `pool`'s workers; zero pages stay ZERO
   * records; the first page after a change of block is a plain PAGE (as
   * QEMU 7.2 sends it), so every compressed record carries CONTINUE and
   * CONTINUE stays valid across sections.
   *
   * One call is one batch: pages are taken off the bitmap in walk order
   * (at most pool.capacity, ~maxMillis of main-thread work, and about what
   * the rate-limit window has left), the non-zero ones copied into the pool,
   * compressed in parallel while the event loop runs, and then all records
   * are written in walk order, so the stream is deterministic.
   *
   * Compression is used in the bulk stage, and afterwards only when no page
   * hook is installed (QEMU: XBZRLE, when on, takes over after the bulk
   * stage); with a hook the walk stops at the end of the bulk stage and
   * later calls go to sendPages.
   */
  async sendPagesCompressed(w: StreamWriter, pool: CompressPool, level: number, budget: SendBudget = {}): Promise<SendResult> {
    if (w.error) throw w.error;
    if (this.hook !== null && !this.bulkStage) return this.sendPages(w, budget);
    if (w.rateLimitExceeded() || w.wantsFlush()) return { pages: 0, done: this.dirtyPages === 0 };
    const maxMs = budget.maxMillis ?? 5;
    let maxPages = Math.min(budget.maxPages ?? Infinity, pool.capacity);
    if (w.maxBandwidth > 0) {
      // about what is left of this window's budget (the writer carries an overshoot over)
      const left = w.maxBandwidth / 10 - w.windowBytes;
      maxPages = Math.min(maxPages, Math.max(1, Math.ceil(left / this.compressedAvg)));
    }
    if (this.batchKind.length < pool.capacity) {
      this.batchKind = new Uint8Array(pool.capacity);
      this.batchBlock = new Uint32Array(pool.capacity);
      this.batchPage = new Uint32Array(pool.capacity);
    }
    const kind = this.batchKind;
    const blockOf = this.batchBlock;
    const pageOf = this.batchPage;
    const t0 = this.now();

    // 1. take pages off the bitmap, in walk order
    let n = 0;
    let slots = 0;
    let last = this.lastBlock;
    while (n < maxPages && this.seekDirty()) {
      if (this.hook !== null && !this.bulkStage) break;
      const b = this.curBlock;
      const p = this.curPage;
      clearBit(this.bitmaps[b]!, p);
      this.dirtyPages--;
      this.curPage = p + 1;
      const block = this.blocks[b]!;
      const zero = this.isZero(block, b, p);
      if (zero) {
        kind[n] = Item.Zero;
      } else if (last !== b) {
        kind[n] = Item.Page;
      } else {
        kind[n] = Item.Compressed;
        pool.putPage(slots++, block.bytes, p * TARGET_PAGE_SIZE);
      }
      last = b;
      blockOf[n] = b;
      pageOf[n] = p;
      n++;
      if ((n & 63) === 0 && this.now() - t0 >= maxMs) break;
    }

    // 2. compress the batch on the workers
    if (slots > 0) await pool.compress(slots, level);

    // 3. write every record in walk order. The page hook still sees every
    // page (in the bulk stage; XBZRLE only counts it there); if it handles
    // one, its record takes the page's place in the order.
    const startBytes = w.bytesWritten;
    const hook = this.hook;
    let cbytes = 0;
    for (let i = 0, s = 0; i < n; i++) {
      const b = blockOf[i]!;
      const block = this.blocks[b]!;
      const page = pageOf[i]!;
      const offset = page * TARGET_PAGE_SIZE;
      const cont = this.lastBlock === b;
      let k = kind[i]!;
      const slot = k === Item.Compressed ? s++ : -1;
      if (hook !== null) {
        const handled = hook(w, block, b, page, cont, k === Item.Zero, true);
        if (handled !== PageHookResult.Default) {
          this.counters.hooked++;
          if (handled === PageHookResult.Sent) this.lastBlock = b;
          continue;
        }
      }
      // a compressed record must carry CONTINUE (only a skipping hook can change that)
      if (k === Item.Compressed && !cont) k = Item.Page;
      switch (k) {
        case Item.Zero:
          putRamRecordHeader(w, block, offset, F.ZERO, cont);
          w.put8(0);
          this.counters.duplicate++;
          break;
        case Item.Page: {
          putRamRecordHeader(w, block, offset, F.PAGE, cont);
          const at = w.reserve(TARGET_PAGE_SIZE);
          copyBytes(w.buf, at, block.bytes, offset, TARGET_PAGE_SIZE);
          this.counters.normal++;
          this.counters.normalBytes += TARGET_PAGE_SIZE;
          break;
        }
        default: {
          const before = w.bytesWritten;
          const z = pool.result(slot);
          putRamRecordHeader(w, block, offset, F.COMPRESS_PAGE, cont);
          w.put32(z.length);
          w.putBytes(z);
          this.counters.compressed++;
          // QEMU 2.10 counts compressed pages as `normal`
          this.counters.normal++;
          this.counters.normalBytes += TARGET_PAGE_SIZE;
          cbytes += w.bytesWritten - before;
        }
      }
      this.lastBlock = b;
    }
    if (slots > 0) {
      this.counters.compressedBytes += cbytes;
      this.compressedAvg = Math.max(16, (this.compressedAvg * 3 + cbytes / slots) / 4);
    }
    this.counters.transferred += w.bytesWritten - startBytes;
    return { pages: n, done: this.dirtyPages === 0 };
  }
}

