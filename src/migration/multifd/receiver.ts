/**
 * The destination's multifd channels (docs/spec/multifd.md). After the main
 * connection, the incoming listener takes `multifd-channels` more; a worker
 * per channel checks its initial packet and then reads packets, their pages
 * straight into guest RAM. The main stream's RAM loader calls sync() at
 * every RAM EOS: it waits until every channel has reached its SYNC packet
 * for that section (so every page sent before the EOS is in place) and then
 * lets the channels read on.
 */
import type { Socket } from 'node:net';
import type { RamBlock } from '../../machine/types.js';
import { MigrationStreamError } from '../wire/errors.js';
import { MultifdChannel } from './channel.js';
import type { MultifdWorkers } from './workers.js';

const WAIT_MS = 200;

export class MultifdReceiver {
  readonly channels: MultifdChannel[];
  /** RAM EOS records passed (each one a sync). */
  private synced = 0;
  private failure: Error | null = null;
  /** A channel whose peer closed it (fails the next sync). */
  private ended: string | null = null;
  private readonly inits = new Set<number>();
  private initWaiter: (() => void) | null = null;
  /** Rejects a pending ready()/sync() at once when a channel fails. */
  private wake: (() => void) | null = null;

  /** `onFailure`: a channel failed (the main stream should stop: the source may be waiting on that channel). */
  constructor(
    sockets: readonly Socket[],
    blocks: readonly RamBlock[],
    uuid: Uint8Array,
    pool: MultifdWorkers,
    private readonly onFailure?: (e: Error) => void,
  ) {
    const workers = pool.take(sockets.length);
    this.channels = sockets.map((s, i) => new MultifdChannel('recv', s, i, pool, workers[i]!, {
      channels: sockets.length,
      blocks: blocks.map((b) => ({ name: b.name, bytes: b.bytes, touched: b.touched })),
      uuid,
      events: {
        init: (id) => {
          this.inits.add(id);
          this.initWaiter?.();
        },
        problem: (m, eof) => {
          if (eof) {
            this.ended ??= m;
          } else if (this.failure === null) {
            this.failure = new MigrationStreamError(m);
            this.onFailure?.(this.failure);
          }
          this.initWaiter?.();
          this.wake?.();
        },
      },
    }));
  }

  /** The failure of a channel, if one failed. */
  get error(): Error | null {
    return this.failure;
  }

  private check(): void {
    if (this.failure !== null) throw this.failure;
  }

  /** Resolves once every channel's initial packet checked out (QEMU starts the load only then). */
  async ready(): Promise<void> {
    while (this.inits.size < this.channels.length) {
      this.check();
      if (this.ended !== null) throw new MigrationStreamError(this.ended);
      await new Promise<void>((r) => (this.initWaiter = r));
      this.initWaiter = null;
    }
    this.check();
  }

  /** A RAM EOS on the main stream: every channel's pages up to its SYNC are in; then they read on. */
  async sync(): Promise<void> {
    const n = ++this.synced;
    for (;;) {
      this.check();
      const behind = this.channels.filter((c) => c.syncs < n);
      if (behind.length === 0) break;
      if (this.ended !== null) throw new MigrationStreamError(this.ended);
      await Promise.race([
        ...behind.map((c) => c.syncedMore(WAIT_MS)),
        new Promise<void>((r) => (this.wake = r)),
      ]);
      this.wake = null;
    }
    for (const c of this.channels) c.release(n);
  }

  /** Pages the channels have placed. */
  get pages(): number {
    let n = 0;
    for (const c of this.channels) n += c.pagesReceived;
    return n;
  }

  async close(): Promise<void> {
    this.wake?.();
    await Promise.all(this.channels.map((c) => c.close()));
  }
}
