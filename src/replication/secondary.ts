/**
 * The secondary's replicated drive: QEMU's replication filter in
 * secondary mode over the active disk, whose backing is the hidden disk,
 * whose backing is the secondary disk (docs/block-replication.txt).
 *
 * - The primary's mirrored writes arrive over NBD at the secondary disk
 *   (another drive). While replication runs, the old content of every
 *   cluster they touch is first copied into the hidden disk, once per
 *   cluster per checkpoint (QEMU's backup job, sync=none): the hidden disk
 *   keeps the secondary disk as it was at the last checkpoint.
 * - The secondary's own guest reads through active → hidden → secondary
 *   disk and writes into the active disk. So it sees the disk as it was at
 *   the last checkpoint plus its own writes, whatever the primary writes.
 * - A checkpoint empties the active and the hidden disk: the guest now
 *   sees the secondary disk, which holds everything the primary wrote
 *   (COLO then loads the primary's memory: both agree again).
 * - A failover commits the active and the hidden disk into the secondary
 *   disk (QEMU's active commit): afterwards the secondary disk is what the
 *   secondary's guest saw (the last checkpoint plus its own writes since;
 *   the primary's writes since the checkpoint are undone), and the drive
 *   reads and writes the secondary disk directly. If the commit fails, the
 *   stage is failover-failed: writes go to the active disk where the
 *   overlays hold the range, else to the secondary disk (QEMU's rule).
 * - A stop without failover empties the overlays (the secondary disk is the
 *   primary's) and the drive then works on the secondary disk.
 * - Before start the guest may read (through the chain) but not write:
 *   start empties the overlays, and writes made before would be lost.
 *
 * Guest requests and mirrored writes hold the gate shared; start,
 * checkpoint and stop hold it exclusive, so each sees no request half done.
 */
import type { BlockImage, BlockStatus } from '../block/index.js';
import { BlockError } from '../block/index.js';
import type { SecondaryConfig } from './config.js';
import { Gate } from './gate.js';
import {
  BACKUP_CANCELLED,
  NOT_RUNNING,
  ReplicationError,
  mayStart,
  mayStop,
  stageError,
  type FailureSink,
  type ReplicationMode,
  type ReplicationNode,
  type ReplicationStage,
  type SecondaryDisk,
} from './node.js';
import { emptyOverlay, linkBacking, openOverlay, secondaryView, type Overlay } from './overlay.js';

/** QEMU's backup job copies at least 64 KiB at a time. */
const MIN_COPY_CLUSTER = 64 * 1024;
/** Bytes moved per request by the failover commit. */
const COMMIT_CHUNK = 1 << 20;

export class ReplicationSecondary implements BlockImage, ReplicationNode {
  readonly mode = 'secondary' as const;
  private _stage: ReplicationStage = 'none';
  private failure: string | null = null;
  /** The copy-before-write ("backup job") is installed and has not failed. */
  private backupRunning = false;
  private readonly gate = new Gate();
  /** Serialises the copies into the hidden disk. */
  private copyChain: Promise<unknown> = Promise.resolve();
  private copied = new Uint8Array(0);
  private copyCluster = MIN_COPY_CLUSTER;
  private active: Overlay;
  private hidden: Overlay;
  private readonly view: BlockImage;

  private constructor(
    private readonly cfg: SecondaryConfig,
    readonly driveName: string,
    private readonly disk: SecondaryDisk,
    active: Overlay,
    hidden: Overlay,
    private readonly isTop: (topId: string) => boolean,
    private readonly onFailure: FailureSink,
  ) {
    this.view = secondaryView(disk);
    this.active = active;
    this.hidden = hidden;
    linkBacking(this.hidden, this.view);
    linkBacking(this.active, this.hidden.image);
  }

  /** Open the overlays (qcow2, no barriers: they are scratch) and chain them over the secondary disk. */
  static async open(cfg: SecondaryConfig, driveName: string, disk: SecondaryDisk, isTop: (topId: string) => boolean, onFailure: FailureSink): Promise<ReplicationSecondary> {
    const active = await openOverlay(cfg.active);
    let hidden: Overlay;
    try {
      hidden = await openOverlay(cfg.hidden);
    } catch (e) {
      await active.image.close();
      throw e;
    }
    return new ReplicationSecondary(cfg, driveName, disk, active, hidden, isTop, onFailure);
  }

  get stage(): ReplicationStage {
    return this._stage;
  }

  get errorDetail(): string | null {
    return this.failure;
  }

  /** The block backend name of the secondary disk. */
  get diskName(): string {
    return this.disk.name;
  }

  // ---- BlockImage: the active disk's facts (its backing chain is hidden → secondary disk)

  get format() {
    return this.active.image.format;
  }
  get filename(): string {
    return this.active.image.filename;
  }
  get virtualSize(): number {
    return this.active.image.virtualSize;
  }
  get backing(): BlockImage | null {
    return this._stage === 'done' ? null : this.hidden.image;
  }
  get readOnly(): boolean {
    return false;
  }
  get clusterSize(): number {
    return this.active.image.clusterSize;
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.gate.withShared(() => (this._stage === 'done' ? this.disk.image.read(offset, buf) : this.active.image.read(offset, buf)));
  }

  blockStatus(offset: number, length: number): Promise<BlockStatus> {
    return this.gate.withShared(() => (this._stage === 'done' ? this.disk.image.blockStatus(offset, length) : this.active.image.blockStatus(offset, length)));
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.gate.withShared(() =>
      this.guestWrite(offset, data.length, (o, n, toActive) => {
        const part = n === data.length ? data : data.subarray(o - offset, o - offset + n);
        return toActive ? this.active.image.write(o, part) : this.disk.write(o, part);
      }),
    );
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.gate.withShared(() => this.guestWrite(offset, length, (o, n, toActive) => (toActive ? this.active.image.writeZeroes(o, n) : this.disk.writeZeroes(o, n))));
  }

  flush(): Promise<void> {
    return this.gate.withShared(async () => {
      if (this._stage === 'done') return this.disk.flush();
      await this.active.image.flush();
    });
  }

  async close(): Promise<void> {
    this.disk.writeHook = null;
    this.backupRunning = false;
    await this.closeOverlays();
  }

  private async closeOverlays(): Promise<void> {
    // the overlays must not close the secondary disk (another drive) through their backing links
    linkBacking(this.active, null);
    linkBacking(this.hidden, null);
    await Promise.allSettled([this.active.image.close(), this.hidden.image.close()]);
  }

  /**
   * A guest write by stage: refused before start, into the active disk
   * while running or failing over, straight to the secondary disk once done;
   * after a failed failover, split by where the overlays hold the data.
   */
  private async guestWrite(offset: number, length: number, to: (o: number, n: number, toActive: boolean) => Promise<void>): Promise<void> {
    switch (this._stage) {
      case 'none':
        throw new BlockError(`${NOT_RUNNING}: the secondary's guest cannot write before replication starts`);
      case 'running':
      case 'failover':
        return to(offset, length, true);
      case 'done':
        // through the secondary disk's drive (its cache mode, its dirty log)
        return to(offset, length, false);
      case 'failover-failed':
        if (length === 0) return to(offset, 0, true);
        for (let o = offset; o < offset + length; ) {
          const { above, n } = await this.allocatedAbove(o, offset + length - o);
          await to(o, n, above);
          o += n;
        }
    }
  }

  /** Whether the active or the hidden disk holds [o, o + n) (n from o while that stays the same). */
  private async allocatedAbove(o: number, length: number): Promise<{ above: boolean; n: number }> {
    const a = await this.active.image.blockStatus(o, length);
    const h = await this.hidden.image.blockStatus(o, a.length);
    return { above: a.allocated || h.allocated, n: Math.min(a.length, h.length) };
  }

  // ---- the copy before a mirrored write (QEMU's backup job, sync=none)

  private readonly hook = (offset: number, length: number, write: () => Promise<void>): Promise<void> =>
    this.gate.withShared(async () => {
      if (this._stage === 'running' && this.backupRunning && length > 0) {
        try {
          await this.copyBefore(offset, length);
        } catch (e) {
          // QEMU's copy-before-write breaks the guest write when the copy fails, and the job is gone
          this.backupRunning = false;
          this.fail(new Error(`copying the old content of ${length} bytes at offset ${offset} into the hidden disk failed: ${(e as Error).message}`));
          throw e;
        }
      }
      await write();
    });

  private copyBefore(offset: number, length: number): Promise<void> {
    const run = async () => {
      const cs = this.copyCluster;
      const size = this.disk.size;
      const buf = new Uint8Array(cs);
      for (let c = Math.floor(offset / cs); c * cs < offset + length && c * cs < size; c++) {
        if ((this.copied[c >> 3]! & (1 << (c & 7))) !== 0) continue;
        const n = Math.min(cs, size - c * cs);
        const part = n === cs ? buf : buf.subarray(0, n);
        await this.disk.image.read(c * cs, part);
        await this.hidden.image.write(c * cs, part);
        this.copied[c >> 3]! |= 1 << (c & 7);
      }
    };
    const p = this.copyChain.then(run, run);
    this.copyChain = p.catch(() => undefined);
    return p;
  }

  private fail(e: Error): void {
    if (this.failure === null) this.failure = e.message;
    this.onFailure(this.driveName, e);
  }

  /** The primary's connection ended without a goodbye while replication ran (the peer is gone). */
  peerLost(detail: string): void {
    if (this._stage === 'running' && this.failure === null) this.fail(new Error(`the primary's NBD connection was lost (${detail})`));
  }

  // ---- ReplicationNode

  async start(mode: ReplicationMode): Promise<void> {
    if (!mayStart(this._stage, this.mode, mode)) return;
    const a = this.active.image.virtualSize;
    if (a !== this.hidden.image.virtualSize || a !== this.disk.size) {
      throw new ReplicationError("Active disk, hidden disk, secondary disk's length are not the same");
    }
    if (!this.isTop(this.cfg.topId)) throw new ReplicationError('No top_bs or it is invalid');
    await this.gate.withExclusive(async () => {
      this.copyCluster = Math.max(MIN_COPY_CLUSTER, this.hidden.image.clusterSize);
      this.copied = new Uint8Array(Math.ceil(Math.ceil(a / this.copyCluster) / 8));
      this.disk.writeHook = this.hook;
      this.backupRunning = true;
      this._stage = 'running';
      this.failure = null;
      await this.doCheckpoint();
    });
  }

  async checkpoint(): Promise<void> {
    if (this._stage === 'done' || this._stage === 'failover') return;
    await this.gate.withExclusive(() => this.doCheckpoint());
  }

  /** QEMU's secondary_do_checkpoint: the backup restarts, the overlays are emptied. */
  private async doCheckpoint(): Promise<void> {
    if (!this.backupRunning) throw new ReplicationError(BACKUP_CANCELLED);
    await this.copyChain;
    this.copied.fill(0);
    try {
      this.active = await emptyOverlay(this.active);
      this.hidden = await emptyOverlay(this.hidden);
    } catch (e) {
      throw new ReplicationError(`Could not make the replication overlays empty: ${(e as Error).message}`);
    } finally {
      linkBacking(this.hidden, this.view);
      linkBacking(this.active, this.hidden.image);
    }
  }

  getError(): string | null {
    return stageError(this._stage, this.failure !== null);
  }

  async stop(failover: boolean): Promise<void> {
    if (!mayStop(this._stage)) return;
    await this.gate.withExclusive(async () => {
      // the backup job ends first
      this.disk.writeHook = null;
      await this.copyChain;
      if (!failover) {
        this.backupRunning = false;
        // QEMU 7.2 reports "Backup job was cancelled unexpectedly" here (its
        // own job's cancellation trips the check); Ferry empties the overlays
        await this.emptyForStop();
        this._stage = 'done';
        return;
      }
      this.backupRunning = false;
      this._stage = 'failover';
      try {
        await this.commit();
      } catch (e) {
        this._stage = 'failover-failed';
        this.fail(new Error(`failover: committing the active and hidden disks into '${this.disk.name}' failed: ${(e as Error).message}`));
        return;
      }
      this._stage = 'done';
      this.failure = null;
      await this.closeOverlays();
    });
  }

  private async emptyForStop(): Promise<void> {
    this.active = await emptyOverlay(this.active);
    this.hidden = await emptyOverlay(this.hidden);
    await this.closeOverlays();
  }

  /** Everything the active or the hidden disk holds, as the guest sees it, into the secondary disk. */
  private async commit(): Promise<void> {
    const size = this.active.image.virtualSize;
    const buf = new Uint8Array(COMMIT_CHUNK);
    for (let o = 0; o < size; ) {
      const { above, n } = await this.allocatedAbove(o, size - o);
      if (above) {
        for (let d = 0; d < n; d += COMMIT_CHUNK) {
          const k = Math.min(COMMIT_CHUNK, n - d);
          const part = buf.subarray(0, k);
          await this.active.image.read(o + d, part);
          await this.disk.write(o + d, part);
        }
      }
      o += n;
    }
    await this.disk.flush();
  }

  async reopen(): Promise<void> {
    await this.gate.withExclusive(async () => {
      if (this._stage === 'done') return;
      await this.closeOverlays();
      this.active = await openOverlay(this.cfg.active);
      this.hidden = await openOverlay(this.cfg.hidden);
      linkBacking(this.hidden, this.view);
      linkBacking(this.active, this.hidden.image);
    });
  }
}
