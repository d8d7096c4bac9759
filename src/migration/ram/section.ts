/**
 * The `ram` section (docs/spec/stream-format.md §9): a live section with its
 * page encoders behind it, and its loader.
 *
 * Source: a RamSender walks a migration bitmap per block (all ones at the
 * start, dirty-log syncs OR the guest's writes in) and encodes pages as ZERO
 * or PAGE records, or, with their capabilities on, as XBZRLE deltas
 * (xbzrle-encoder.ts, after the first pass) or COMPRESS_PAGE records (deflated
 * on the session's worker pool). auto-converge (auto-converge.ts) watches the
 * dirty rate at each sync. With `postcopy-ram` the section also switches to
 * postcopy: the discard list, then background pages with the destination's
 * requests first; with `release-ram` it hands sent pages back to the OS once
 * the destination has its devices.
 *
 * Destination: a RamLoader (loader.ts) reads the records into the guest's
 * RAM blocks; after POSTCOPY_LISTEN it places pages only where they are
 * still missing (postcopy/placement.ts).
 */
import type { MigrationInfo } from '../../generated/qapi-types.js';
import { TARGET_PAGE_SIZE } from '../../machine/types.js';
import { MigrationStreamError, ERR } from '../wire/errors.js';
import { WIRE } from '../wire/constants.js';
import { discardRanges, putDiscards } from '../postcopy/discard.js';
import type { PageRequestSink } from '../return-path/reader.js';
import type { StreamReader } from '../stream/reader.js';
import type { StreamWriter } from '../stream/writer.js';
import type {
  IncomingSectionContext,
  IterateBudget,
  LiveSection,
  OutgoingSectionContext,
  Pending,
  PostcopySection,
  SectionKind,
  SectionLoader,
  SectionType,
} from '../sections/section.js';
import { AutoConverge } from './auto-converge.js';
import { RamLoader } from './loader.js';
import { RamReleaser } from './release.js';
import { RamSender, type SendBudget } from './sender.js';
import { DIRTY_RATE_PERIOD_MS, RamStats } from './stats.js';
import type { MultifdSender } from '../multifd/sender.js';
import { XbzrleEncoder } from './xbzrle-encoder.js';

const F = WIRE.RAM;
/** release-ram: how often the sent pages are handed back during postcopy. */
const RELEASE_EVERY_MS = 20;
/** With `multifd`: how long one RAM section feeds the channels (QEMU's ram_save_iterate stops after 50 ms). */
const MULTIFD_SECTION_MS = 50;

/** The `ram` section type (register it with a SectionRegistry). */
export const RAM_SECTION: SectionType = {
  idstr: F.IDSTR,
  instanceId: 0,
  version: F.VERSION,
  minVersion: F.VERSION,
  save: (ctx) => new RamSaveSection(ctx),
  load: (ctx) => new RamLoadSection(ctx),
};

export class RamSaveSection implements LiveSection, PageRequestSink {
  readonly idstr = F.IDSTR;
  readonly instanceId = 0;
  readonly version = F.VERSION;
  readonly sender: RamSender;
  readonly stats: RamStats;
  /** The XBZRLE encoder when `xbzrle` is on. */
  readonly xbzrle: XbzrleEncoder | null;
  readonly autoConverge: AutoConverge;
  readonly postcopy: PostcopySection | undefined;
  /** The multifd channels (`multifd`), or null. */
  readonly multifd: MultifdSender | null;
  /** now() of the last dirty-log sync (auto-converge's periodic sync). */
  private lastSync = 0;
  /** A sync happened since the last slice (pending(true) need not sync again). */
  private synced = false;
  /** Block of the last REQ_PAGES_ID (REQ_PAGES refers to it). */
  private reqBlock = -1;
  private readonly byName = new Map<string, number>();
  private readonly requests: Array<{ block: number; page: number; pages: number }> = [];
  private reqHead = 0;

  constructor(readonly ctx: OutgoingSectionContext) {
    const { machine, options } = ctx;
    this.sender = new RamSender(machine.ram, { now: ctx.now });
    this.stats = new RamStats(ctx.now());
    this.autoConverge = new AutoConverge(machine, options);
    this.xbzrle = options.capability('xbzrle') ? new XbzrleEncoder(this.sender, options.xbzrleCacheSize(), ctx.now()) : null;
    if (this.xbzrle) this.sender.setPageHook(this.xbzrle.hook);
    machine.ram.forEach((b, i) => this.byName.set(b.name, i));
    this.multifd = ctx.multifd ?? null;
    if (options.capability('postcopy-ram')) {
      this.postcopy = new RamPostcopy(this);
      ctx.returnPath?.setPageRequestSink(this);
    }
  }

  /** START: the first sync (the bitmap starts all ones), then the block list. */
  async setup(w: StreamWriter): Promise<void> {
    this.sync(false);
    this.sender.sendBlockList(w);
    await this.syncChannels(w);
    this.sender.sendEos(w);
  }

  /**
   * With `multifd`, before every RAM EOS: the packet being filled and a
   * SYNC packet go out on the channels (multifd/sender.ts).
   */
  async syncChannels(w: StreamWriter): Promise<void> {
    if (this.multifd === null) return;
    this.countChannels(w, await this.multifd.sync());
  }

  /** Bytes sent on the multifd channels count in the stream's figures and in `transferred`. */
  countChannels(w: StreamWriter, bytes: number): void {
    w.addSentElsewhere(bytes);
    this.sender.countMultifd(bytes);
  }

  /** Pages go on the multifd channels (QEMU 7.2: not with `compress`, and not in postcopy). */
  private get pagesOnChannels(): boolean {
    return this.multifd !== null && !this.ctx.options.capability('compress');
  }

  /** (The object is reused: valid until the next call, as the contract says.) */
  pending(exact: boolean): Pending {
    if (exact && !this.synced) this.sync();
    // pages on the multifd channels' queues are not sent yet either
    const bytes = this.sender.remainingBytes + (this.multifd?.bytesPending ?? 0);
    const p = this.pend;
    p.precopy = this.postcopy ? 0 : bytes;
    p.postcopy = this.postcopy ? bytes : 0;
    return p;
  }

  private readonly pend: Pending = { precopy: 0, postcopy: 0 };

  async iterate(w: StreamWriter, budget: IterateBudget): Promise<void> {
    if (this.periodicSyncDue()) this.sync();
    this.synced = false;
    if (this.pagesOnChannels) await this.sendOnChannels(w, MULTIFD_SECTION_MS, false);
    else await this.sendSlice(w, budget);
    await this.syncChannels(w);
    this.sender.sendEos(w);
  }

  async completePrecopy(w: StreamWriter): Promise<void> {
    this.sync();
    this.xbzrle?.setLastStage();
    if (this.pagesOnChannels) {
      await this.sendOnChannels(w, Infinity, true);
    } else {
      for (;;) {
        const r = await this.sendSlice(w, { maxMillis: 50 });
        if (r.done) break;
        if (w.wantsFlush()) await w.flush();
      }
    }
    await this.syncChannels(w);
    // the last packets must be out before the migration can complete
    await this.multifd?.drain();
    this.sender.sendEos(w);
  }

  /**
   * Pages with data on the multifd channels, zero pages on the main stream,
   * for about `ms` (one RAM section, as QEMU's ram_save_iterate), waiting
   * while no channel has room; everything when `all`.
   */
  private async sendOnChannels(w: StreamWriter, ms: number, all: boolean): Promise<void> {
    const mfd = this.multifd!;
    const t0 = this.ctx.now();
    for (;;) {
      mfd.check();
      const r = this.sender.sendPagesMultifd(w, mfd, { maxMillis: 5 });
      if (r.done) return;
      if (r.blocked) {
        await mfd.room();
      } else if (w.wantsFlush()) {
        if (!all) return;
        await w.flush();
      } else if (w.rateLimitExceeded()) {
        return;
      } else if (r.pages === 0) {
        return;
      }
      if (this.ctx.now() - t0 >= ms) return;
    }
  }

  addInfo(info: MigrationInfo, completed: boolean): void {
    info.ram = this.stats.info(this.sender, completed, this.ctx.throughputMbps());
    if (this.multifd !== null) info.ram['multifd-bytes'] = this.multifd.bytes;
    if (this.ctx.options.capability('xbzrle')) {
      info['xbzrle-cache'] = this.xbzrle?.stats() ?? emptyXbzrleStats(this.ctx.options.xbzrleCacheSize());
    }
    const pct = this.autoConverge.throttle;
    if (pct > 0) info['cpu-throttle-percentage'] = pct;
  }

  cleanup(): void {
    // the migration left its loop, whatever the outcome: unthrottle (docs/spec/qmp.md E.3)
    this.autoConverge.lift();
    this.ctx.returnPath?.setPageRequestSink(null);
    this.xbzrle?.release();
  }

  /** migrate-set-cache-size during the migration: the running cache takes the new size (emptied). */
  resizeXbzrleCache(size: number): void {
    this.xbzrle?.resize(size);
  }

  /** Dirty-log sync; `count` false for the setup sync (nothing can be new in an all-ones bitmap). */
  sync(count = true): number {
    const found = this.sender.syncDirtyLog();
    const now = this.ctx.now();
    this.lastSync = now;
    this.synced = true;
    const dirtied = this.stats.onSync(now, count ? found : 0);
    if (dirtied !== undefined) this.autoConverge.onPeriod(dirtied, this.sender.counters.transferred);
    this.xbzrle?.onSync(now);
    this.ctx.onPass(this.sender.dirtySyncCount);
    return found;
  }

  /**
   * auto-converge only looks at the guest when a sync closes a ≥ 1 s period.
   * Like QEMU we sync when the rest may fit the threshold or a pass is over
   * (pending 0), so a workload that never converges still gets one sync per
   * pass. A pass lasts (dirty set / bandwidth), which can be many seconds:
   * with auto-converge on, after the bulk stage, we also sync once a period
   * is due, so the trigger is evaluated about every second whatever the pass
   * length. The rule compares bytes dirtied with bytes sent in the same
   * period, so the shorter periods change how soon it answers, not what.
   * During the bulk stage there is no extra sync (QEMU does not throttle
   * then: its first sync after setup comes at the end of the bulk pass).
   */
  private periodicSyncDue(): boolean {
    return this.autoConverge.enabled && !this.sender.bulkStage && this.ctx.now() - this.lastSync >= DIRTY_RATE_PERIOD_MS;
  }

  /** One batch of dirty pages: compressed on the pool with `compress` on (docs/spec/xbzrle.md §6). */
  private sendSlice(w: StreamWriter, budget: SendBudget) {
    const o = this.ctx.options;
    if (o.capability('compress')) {
      return this.sender.sendPagesCompressed(w, this.ctx.compressPool(), o.get('compress-level'), budget);
    }
    return this.sender.sendPages(w, budget);
  }

  // ---- page requests (postcopy; PageRequestSink) --------------------------

  /** Check a page request (docs/spec/stream-format.md §12) and queue it. */
  request(blockName: string | null, start: number, length: number): void {
    let block: number;
    if (blockName !== null) {
      const b = this.byName.get(blockName);
      if (b === undefined) throw new MigrationStreamError(ERR.rpNoBlock(blockName));
      this.reqBlock = block = b;
    } else {
      if (this.reqBlock < 0) throw new MigrationStreamError(ERR.rpNoPreviousBlock());
      block = this.reqBlock;
    }
    const size = this.sender.blocks[block]!.size;
    if (start % TARGET_PAGE_SIZE !== 0 || length % TARGET_PAGE_SIZE !== 0) {
      throw new MigrationStreamError(ERR.rpMisaligned(start, length));
    }
    if (start + length > size) throw new MigrationStreamError(ERR.rpOverrun(start, length, size));
    this.stats.postcopyRequests++;
    if (length > 0) this.requests.push({ block, page: start / TARGET_PAGE_SIZE, pages: length / TARGET_PAGE_SIZE });
  }

  /** Pages the destination asked for go out before any background page. */
  serveRequests(w: StreamWriter): void {
    const q = this.requests;
    while (this.reqHead < q.length) {
      const r = q[this.reqHead++]!;
      this.sender.sendRequested(w, r.block, r.page, r.pages);
    }
    q.length = 0;
    this.reqHead = 0;
  }
}

/** The RAM section after the switch to postcopy (docs/spec/stream-format.md §11). */
class RamPostcopy implements PostcopySection {
  private releaser: RamReleaser | null = null;
  private released = -Infinity;

  constructor(private readonly ram: RamSaveSection) {}

  /** Guest stopped: the last sync, then every page the destination must not trust (never sent, or dirtied since). */
  switchOver(w: StreamWriter): void {
    const { sender } = this.ram;
    // after the switch the destination takes ZERO and PAGE records only
    sender.setPageHook(null);
    this.ram.sync();
    for (let b = 0; b < sender.blocks.length; b++) {
      const block = sender.blocks[b]!;
      putDiscards(w, block.name, discardRanges(sender.bitmaps[b]!, block.pages));
    }
    sender.resetLastBlock();
    const ctx = this.ram.ctx;
    if (ctx.options.capability('release-ram')) this.releaser = new RamReleaser(sender.blocks, sender.bitmaps);
  }

  iterate(w: StreamWriter, budget: IterateBudget): void {
    const ctx = this.ram.ctx;
    // release-ram frees only once the destination has loaded the devices
    // (PONG 3): until then a failure can still give the guest back to us.
    // A walk over the bitmaps, so not on every (small) slice.
    if (this.releaser && ctx.now() - this.released >= RELEASE_EVERY_MS && ctx.returnPath?.ponged(3)) {
      this.releaser.releaseSent();
      this.released = ctx.now();
    }
    this.ram.serveRequests(w);
    this.ram.sender.sendPages(w, budget);
    this.ram.serveRequests(w);
    this.syncChannels(w);
    this.ram.sender.sendEos(w);
  }

  complete(w: StreamWriter): void {
    this.syncChannels(w);
    this.ram.sender.sendEos(w);
  }

  /** In postcopy no page goes on the multifd channels, but every RAM EOS still has its SYNC packets. */
  private syncChannels(w: StreamWriter): void {
    const mfd = this.ram.multifd;
    if (mfd !== null) this.ram.countChannels(w, mfd.syncNow());
  }

  done(): void {
    this.releaser?.releaseSent();
  }

}

function emptyXbzrleStats(size: number) {
  return { 'cache-size': size, bytes: 0, pages: 0, 'cache-miss': 0, 'cache-miss-rate': 0, overflow: 0 };
}

/** The destination's `ram` loader for one incoming migration. */
export class RamLoadSection implements SectionLoader {
  readonly loader: RamLoader;

  constructor(ctx: IncomingSectionContext) {
    const pool = ctx.decompressPool;
    const mfd = ctx.multifd ?? null;
    this.loader = new RamLoader(ctx.machine.ram, {
      compress: ctx.options.capability('compress'),
      decompressPool: pool ?? undefined,
      placed: (b, page) => ctx.machine.markPresent(b, page),
      // with `multifd`, every RAM EOS waits for the channels' pages of the section
      eos: mfd === null ? undefined : () => mfd.sync(),
    });
  }

  load(r: StreamReader, _kind: SectionKind, version: number): Promise<void> {
    return this.loader.loadSection(r, version);
  }

  /** POSTCOPY_LISTEN: from now on pages are placed only where they are still missing. */
  postcopyListen(): void {
    this.loader.postcopy = true;
  }
}
