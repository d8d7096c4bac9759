/**
 * The `block` live section: QEMU's block migration (docs/spec/stream-format.md
 * §13, docs/spec/qmp.md B.2, B.6), on the section contract.
 *
 * It takes part when the `block` capability is on (`migrate` with `blk` or
 * `inc` turns it on for one migration; source.ts). Source:
 *
 *   setup            start the drives' dirty-chunk logs; EOS
 *   pending          the bulk walk's rest, the dirty chunks behind it and the
 *                    reads queued, all `precopy`: block migration cannot go
 *                    on after the destination runs, so a postcopy switch
 *                    waits until this fits the downtime too, and the switch
 *                    sends the END with the guest stopped (as QEMU, whose
 *                    block handler has no postcopy hooks)
 *   iterate          chunks: the bulk walks, then dirty chunks; EOS (after
 *                    the bulk walk the drives are flushed about every
 *                    second, so that the stop has little left to sync)
 *   completePrecopy  guest stopped: everything left, PROGRESS 100, EOS
 *   addInfo          `disk` (transferred, remaining, total: QEMU's figures,
 *                    the bulk walk's progress) while the section is active
 *   cleanup          the dirty-chunk logs stop
 *
 * Destination: a BlockLoader (loader.ts) writes the chunks into the drives.
 * The drives come from the machine (MachinePort.drives): the migration
 * layer never opens an image itself.
 */
import type { MigrationInfo } from '../../generated/qapi-types.js';
import type {
  IncomingSectionContext,
  IterateBudget,
  LiveSection,
  OutgoingSectionContext,
  Pending,
  SectionKind,
  SectionLoader,
  SectionType,
} from '../sections/section.js';
import type { StreamReader } from '../stream/reader.js';
import type { StreamWriter } from '../stream/writer.js';
import { BLOCK, putBlockEos } from './format.js';
import { BlockLoader } from './loader.js';
import { BlockSender } from './sender.js';

/**
 * Once the bulk walk is done, the source's drives are flushed this often
 * while the guest runs: the stop flushes them too (QEMU's vm_stop does), and
 * what it has left to write then counts in the downtime. Measured
 * (docs/benchmarks.md): a 256 MiB image freshly written took 256 ms to sync
 * at the stop, past a 300 ms downtime-limit with everything else.
 */
const FLUSH_EVERY_MS = 1000;

/** The `block` section type (register it with a SectionRegistry). */
export const BLOCK_SECTION: SectionType = {
  idstr: BLOCK.IDSTR,
  instanceId: BLOCK.INSTANCE,
  version: BLOCK.VERSION,
  minVersion: BLOCK.VERSION,
  save: (ctx) => (ctx.options.capability('block') ? new BlockSaveSection(ctx) : null),
  load: (ctx) => new BlockLoadSection(ctx),
};

export class BlockSaveSection implements LiveSection {
  readonly idstr = BLOCK.IDSTR;
  readonly instanceId = BLOCK.INSTANCE;
  readonly version = BLOCK.VERSION;
  readonly sender: BlockSender;
  /** The END went out: QEMU stops showing `disk` then. */
  private completed = false;
  /** now() of the last flush of the drives (-Infinity: none yet). */
  private lastFlush = -Infinity;
  private readonly pend: Pending = { precopy: 0, postcopy: 0 };

  constructor(private readonly ctx: OutgoingSectionContext) {
    const o = ctx.options;
    this.sender = new BlockSender(ctx.machine.drives, {
      incremental: o.get('block-incremental'),
      zeroBlocks: o.capability('zero-blocks'),
      onBulkChunk: () => ctx.trace?.('block-bulk'),
    });
  }

  setup(w: StreamWriter): void {
    this.sender.start();
    putBlockEos(w);
  }

  /** (Reused object, as the contract allows.) */
  pending(): Pending {
    this.sender.sync();
    this.pend.precopy = this.completed ? 0 : this.sender.pendingBytes();
    return this.pend;
  }

  async iterate(w: StreamWriter, budget: IterateBudget): Promise<void> {
    if (this.sender.bulkCompleted && this.ctx.now() - this.lastFlush >= FLUSH_EVERY_MS) {
      await this.sender.flushDrives();
      this.lastFlush = this.ctx.now();
    }
    this.sender.sync();
    await this.sender.send(w, budget, this.ctx.now);
    putBlockEos(w);
  }

  async completePrecopy(w: StreamWriter): Promise<void> {
    await this.sender.sendAll(w);
    putBlockEos(w);
    this.completed = true;
    this.sender.stop();
  }

  addInfo(info: MigrationInfo, completed: boolean): void {
    if (completed || this.completed) return;
    const p = this.sender.progress();
    info.disk = {
      transferred: p.transferred,
      remaining: p.remaining,
      total: p.total,
      duplicate: 0,
      skipped: 0,
      normal: 0,
      'normal-bytes': 0,
      'dirty-pages-rate': 0,
      mbps: 0,
      'dirty-sync-count': 0,
      'postcopy-requests': 0,
      'page-size': 0,
    };
  }

  cleanup(): void {
    this.sender.stop();
  }
}

/** The destination's `block` loader for one incoming migration. */
export class BlockLoadSection implements SectionLoader {
  readonly loader: BlockLoader;

  constructor(ctx: IncomingSectionContext) {
    this.loader = new BlockLoader(ctx.machine.drives);
  }

  load(r: StreamReader, kind: SectionKind): Promise<void> {
    return this.loader.loadSection(r, kind === 'end' || kind === 'full');
  }

  loadComplete(): Promise<void> {
    return this.loader.loadComplete();
  }

  cleanup(): void {
    this.loader.cleanup();
  }
}
