/**
 * The primary's replicated drive: QEMU's quorum (vote-threshold=1,
 * read-pattern=fifo) over the local image and the replication filter in
 * primary mode over an NBD client.
 *
 * - Reads come from the local image.
 * - While replication runs, every write (and write-zeroes, and flush) goes
 *   to the local image and, at the same time, to the secondary's export;
 *   the guest's request completes when both are done. A mirrored write
 *   that fails does not fail the guest's request (the local one decides):
 *   replication is marked failed ("I/O error occurred", as QEMU's filter
 *   records it), no further writes are mirrored, and the toolstack sees it
 *   in query-xen-replication-status. A connection that drops while idle
 *   marks it failed too (QEMU notices only at the next write).
 * - Before start and after stop, writes go to the local image only.
 * - The NBD connection is made when replication starts (QEMU attaches the
 *   NBD child at run time, after the secondary is ready) and closed when
 *   it stops.
 */
import type { BlockImage, BlockStatus } from '../block/index.js';
import { NbdClient, describeAddress } from '../nbd/index.js';
import type { PrimaryConfig } from './config.js';
import { Gate } from './gate.js';
import { ReplicationError, mayStart, mayStop, stageError, type FailureSink, type ReplicationMode, type ReplicationNode, type ReplicationStage } from './node.js';

export class ReplicationPrimary implements BlockImage, ReplicationNode {
  readonly mode = 'primary' as const;
  private _stage: ReplicationStage = 'none';
  private client: NbdClient | null = null;
  private failure: string | null = null;
  private readonly gate = new Gate();

  constructor(
    private local: BlockImage,
    private readonly cfg: PrimaryConfig,
    readonly driveName: string,
    private readonly reopenLocal: (old: BlockImage) => Promise<BlockImage>,
    private readonly onFailure: FailureSink,
  ) {}

  get stage(): ReplicationStage {
    return this._stage;
  }

  get errorDetail(): string | null {
    return this.failure;
  }

  /** The NBD target, for messages. */
  describeTarget(): string {
    return `${describeAddress(this.cfg.nbd)} export '${this.cfg.exportName}'`;
  }

  // ---- BlockImage: the local image's facts

  get format() {
    return this.local.format;
  }
  get filename(): string {
    return this.local.filename;
  }
  get virtualSize(): number {
    return this.local.virtualSize;
  }
  get backing(): BlockImage | null {
    return this.local.backing;
  }
  get readOnly(): boolean {
    return this.local.readOnly;
  }
  get clusterSize(): number {
    return this.local.clusterSize;
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.local.read(offset, buf);
  }

  blockStatus(offset: number, length: number): Promise<BlockStatus> {
    return this.local.blockStatus(offset, length);
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.gate.withShared(() => this.both(() => this.local.write(offset, data), (c) => c.write(offset, data), `write of ${data.length} bytes at offset ${offset}`));
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.gate.withShared(() => this.both(() => this.local.writeZeroes(offset, length), (c) => c.writeZeroes(offset, length), `write-zeroes of ${length} bytes at offset ${offset}`));
  }

  flush(): Promise<void> {
    return this.gate.withShared(() => this.both(() => this.local.flush(), (c) => c.flush(), 'flush'));
  }

  async close(): Promise<void> {
    const c = this.client;
    this.client = null;
    c?.destroy();
    await this.local.close();
  }

  /** The local request and, while replication runs healthy, its mirror; the local result decides. */
  private async both(local: () => Promise<void>, mirror: (c: NbdClient) => Promise<void>, what: string): Promise<void> {
    const c = this._stage === 'running' && this.failure === null ? this.client : null;
    if (c === null) return local();
    const m = mirror(c).catch((e: unknown) => this.fail(new Error(`${what} could not be mirrored to ${this.describeTarget()}: ${(e as Error).message}`)));
    const [l] = await Promise.allSettled([local(), m]);
    if (l.status === 'rejected') throw l.reason;
  }

  private fail(e: Error): void {
    if (this.failure !== null || this._stage !== 'running') return;
    this.failure = e.message;
    this.onFailure(this.driveName, e);
    // nothing more will be mirrored; the connection is of no further use
    this.client?.destroy();
  }

  // ---- ReplicationNode

  async start(mode: ReplicationMode): Promise<void> {
    if (!mayStart(this._stage, this.mode, mode)) return;
    const c = await NbdClient.connect(this.cfg.nbd, this.cfg.exportName, { timeoutMs: 10000 }).catch((e: unknown) => {
      throw new ReplicationError((e as Error).message);
    });
    if (c.size !== this.local.virtualSize || c.readOnly) {
      c.destroy();
      throw new ReplicationError(
        c.readOnly
          ? `The secondary's export ${this.describeTarget()} is read-only (nbd-server-add writable=true)`
          : `The secondary's export ${this.describeTarget()} has ${c.size} bytes, the local disk ${this.local.virtualSize}`,
      );
    }
    await this.gate.withExclusive(async () => {
      this.client = c;
      c.on('lost', (e: Error) => this.fail(new Error(`lost the connection to ${this.describeTarget()}: ${e.message}`)));
      this.failure = null;
      this._stage = 'running';
    });
  }

  async checkpoint(): Promise<void> {
    // the primary keeps nothing per checkpoint (QEMU's filter does nothing either)
  }

  getError(): string | null {
    return stageError(this._stage, this.failure !== null);
  }

  async stop(failover: boolean): Promise<void> {
    if (!mayStop(this._stage)) return;
    // writes in flight finish (and are mirrored) first
    await this.gate.withExclusive(async () => {
      this._stage = 'done';
      this.failure = null;
      const c = this.client;
      this.client = null;
      if (c === null) return;
      // a failover means the secondary is gone: no goodbye; else a clean NBD_CMD_DISC
      if (failover || c.error !== null) c.destroy();
      else await c.close().catch(() => undefined);
    });
  }

  async reopen(): Promise<void> {
    await this.gate.withExclusive(async () => {
      this.local = await this.reopenLocal(this.local);
    });
  }
}
