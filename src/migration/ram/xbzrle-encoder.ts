/**
 * The XBZRLE page encoder of the RAM section, the source side of the
 * `xbzrle` capability (docs/spec/xbzrle.md §1, §3, §5): a page hook for RamSender that sends dirty pages as XBZRLE deltas against the
 * XBZRLE page cache, and the statistics of query-migrate `xbzrle-cache`.
 *
 * As QEMU (2.10 and 7.2): nothing is cached or encoded during the bulk stage
 * (the first complete pass); XBZRLE starts when the walk has wrapped around.
 * Per page after that:
 *
 *   zero page  -> ZERO record as usual; a zero copy goes into the cache slot
 *   miss       -> cache-miss++; insert (may be refused: slot still fresh);
 *                 full PAGE, sent from the cache copy when inserted
 *   hit        -> encode the snapshot against the cached copy:
 *                   empty    -> nothing is sent (the page is unchanged)
 *                   overflow -> overflow++; full PAGE from the updated copy
 *                   ok       -> XBZRLE record; pages++, bytes += record size
 *                 the cached copy becomes the snapshot (not when empty)
 *
 * In the final stop-and-copy pass the cache is only read: misses are not
 * inserted and hits do not update it.
 */
import { copyBytes } from '../../base/native.js';
import type { XBZRLECacheStats } from '../../generated/qapi-types.js';
import type { RamBlock } from '../../machine/types.js';
import { TARGET_PAGE_BITS, TARGET_PAGE_SIZE } from '../../machine/types.js';
import { XbzrleCache } from '../codec/xbzrle-cache.js';
import { xbzrleEncode } from '../codec/xbzrle-codec.js';
import type { StreamWriter } from '../stream/writer.js';
import { WIRE } from '../wire/constants.js';
import { PageHookResult, putRamRecordHeader, type PageHook, type RamSender } from './sender.js';

const F = WIRE.RAM;
/** The miss rate is recomputed at a sync at least this long after the last computation. */
export const MISS_RATE_PERIOD_MS = 1000;

export interface XbzrleCounters {
  /** bytes of XBZRLE records (header word, name, encoding byte, length, data) */
  bytes: number;
  /** XBZRLE records sent */
  pages: number;
  cacheMiss: number;
  cacheMissRate: number;
  overflow: number;
  /** hits whose page was unchanged (nothing sent) */
  unchanged: number;
}

export class XbzrleEncoder {
  readonly cache: XbzrleCache;
  readonly counters: XbzrleCounters = { bytes: 0, pages: 0, cacheMiss: 0, cacheMissRate: 0, overflow: 0, unchanged: 0 };
  /** The page hook to install with RamSender.setPageHook. */
  readonly hook: PageHook;
  /** ram_address / page size of each block's first page (blocks laid out one after another). */
  private readonly basePage: number[];
  private readonly snapshot = new Uint8Array(TARGET_PAGE_SIZE);
  private readonly encoded = new Uint8Array(TARGET_PAGE_SIZE);
  private lastStage = false;
  /** pages the walker saved (everything but unchanged pages), for the miss rate */
  private walked = 0;
  private walkedPrev = 0;
  private missPrev = 0;
  private rateTime: number;

  constructor(
    private readonly sender: RamSender,
    cacheSize: number,
    now: number,
  ) {
    this.cache = new XbzrleCache(cacheSize, TARGET_PAGE_SIZE);
    let base = 0;
    this.basePage = sender.blocks.map((b) => {
      const p = base;
      base += b.size >> TARGET_PAGE_BITS;
      return p;
    });
    this.rateTime = now;
    this.hook = (w, block, b, page, cont, isZero, bulkStage) => this.onPage(w, block, b, page, cont, isZero, bulkStage);
  }

  /** The final stop-and-copy pass starts: the cache is only read from now on. */
  setLastStage(): void {
    this.lastStage = true;
  }

  /** migrate-set-cache-size during the migration (a new size empties the cache). */
  resize(size: number): void {
    this.cache.resize(size);
  }

  /** Migration cleanup: drop the page copies, keep the statistics (and the size the cache had). */
  release(): void {
    this.cache.free();
  }

  /** The running cache's size (after release: the size it had). */
  get cacheSize(): number {
    return this.cache.size;
  }

  /**
   * A dirty-bitmap sync happened. At most once a second the miss rate is
   * recomputed: misses over pages saved since the last computation.
   */
  onSync(now: number): void {
    if (now - this.rateTime < MISS_RATE_PERIOD_MS) return;
    const c = this.counters;
    if (this.walked !== this.walkedPrev) {
      c.cacheMissRate = (c.cacheMiss - this.missPrev) / (this.walked - this.walkedPrev);
    }
    this.walkedPrev = this.walked;
    this.missPrev = c.cacheMiss;
    this.rateTime = now;
  }

  /**
   * query-migrate `xbzrle-cache`. cache-size is the running cache's size,
   * which is the configured size (QEMU reports the parameter) unless a resize
   * did not reach the cache.
   */
  stats(): XBZRLECacheStats {
    const c = this.counters;
    return {
      'cache-size': this.cacheSize,
      bytes: c.bytes,
      pages: c.pages,
      'cache-miss': c.cacheMiss,
      'cache-miss-rate': c.cacheMissRate,
      overflow: c.overflow,
    };
  }

  private sendPageFrom(w: StreamWriter, block: RamBlock, offset: number, cont: boolean, src: Uint8Array, at: number): void {
    putRamRecordHeader(w, block, offset, F.PAGE, cont);
    w.putBytes(src, at, TARGET_PAGE_SIZE);
    const sc = this.sender.counters;
    sc.normal++;
    sc.normalBytes += TARGET_PAGE_SIZE;
  }

  private onPage(
    w: StreamWriter,
    block: RamBlock,
    b: number,
    page: number,
    cont: boolean,
    isZero: boolean,
    bulkStage: boolean,
  ): PageHookResult {
    if (bulkStage) {
      this.walked++;
      return PageHookResult.Default;
    }
    const cache = this.cache;
    const age = this.sender.dirtySyncCount;
    const addr = this.basePage[b]! + page;
    if (isZero) {
      // the cached copy would be stale: a later small write is a delta against zeros
      if (!this.lastStage) cache.insertZero(addr, age);
      this.walked++;
      return PageHookResult.Default;
    }
    const offset = page * TARGET_PAGE_SIZE;
    const c = this.counters;
    if (!cache.lookup(addr, age)) {
      c.cacheMiss++;
      this.walked++;
      if (this.lastStage) return PageHookResult.Default;
      const at = cache.insert(addr, block.bytes, offset, age);
      if (at < 0) return PageHookResult.Default;
      // send what the cache holds, so both sides agree even if the guest writes now
      this.sendPageFrom(w, block, offset, cont, cache.buffer, at);
      return PageHookResult.Sent;
    }
    // hit: encode a snapshot of the page against the cached copy
    const snap = this.snapshot;
    copyBytes(snap, 0, block.bytes, offset, TARGET_PAGE_SIZE);
    const at = cache.offsetOf(addr);
    const buf = cache.buffer;
    const old = buf.subarray(at, at + TARGET_PAGE_SIZE);
    const len = xbzrleEncode(old, snap, this.encoded, 0, TARGET_PAGE_SIZE);
    if (len === 0) {
      c.unchanged++;
      return PageHookResult.Skipped;
    }
    this.walked++;
    if (len < 0) {
      c.overflow++;
      if (this.lastStage) {
        this.sendPageFrom(w, block, offset, cont, snap, 0);
      } else {
        buf.set(snap, at);
        this.sendPageFrom(w, block, offset, cont, buf, at);
      }
      return PageHookResult.Sent;
    }
    if (!this.lastStage) buf.set(snap, at);
    const start = w.bytesWritten;
    putRamRecordHeader(w, block, offset, F.XBZRLE, cont);
    w.put8(F.XBZRLE_ENCODING);
    w.put16(len);
    w.putBytes(this.encoded, 0, len);
    c.pages++;
    c.bytes += w.bytesWritten - start;
    return PageHookResult.Sent;
  }
}
