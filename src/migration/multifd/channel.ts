/**
 * The main thread's end of one multifd channel: its socket, the worker
 * that does the channel's I/O (channel-worker.ts) and the control words
 * they share (shared.ts).
 */
import type { Socket } from 'node:net';
import { multifdNative } from '../../base/native.js';
import { CTL, CTL_WORDS, SLOT_COUNT, slotMeta, type ChannelWorkerData, type WorkerBlock, type WorkerMessage } from './shared.js';
import { HEADER_SIZE } from './wire.js';
import type { ChannelWorker, MultifdWorkers } from './workers.js';

/** Atomics.waitAsync (Node 20 has it; TypeScript's ES2022 library does not declare it). */
const waitAsync = (Atomics as unknown as {
  waitAsync(a: Int32Array, index: number, value: number, timeoutMs?: number): { async: boolean; value: Promise<string> | string };
}).waitAsync;

/** How long close() waits for the worker to stop before it terminates it. */
const STOP_MS = 2000;

/** The descriptor under a connected net.Socket (TCP or unix). */
export function socketFd(s: Socket): number {
  const fd = (s as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new Error('multifd: the channel has no socket descriptor');
  return fd;
}

export interface ChannelEvents {
  /** recv: the initial packet checked out. */
  init?(id: number): void;
  /** The channel failed (a bad packet, an I/O error) or its peer closed it: the migration fails. */
  problem(message: string, eof: boolean): void;
}

export class MultifdChannel {
  readonly ctl: Int32Array;
  private readonly slots: Uint8Array;
  private readonly worker: ChannelWorker;
  /** Settles when the worker's run is over (its last message) or the worker has gone. */
  private readonly runOver: Promise<void>;
  private closed = false;
  private closing: Promise<void> | null = null;
  /** The worker's run ended (it reported its end, an error or the peer's end). */
  stopped = false;

  constructor(
    readonly role: 'send' | 'recv',
    readonly socket: Socket,
    readonly id: number,
    private readonly pool: MultifdWorkers,
    worker: ChannelWorker,
    opts: { channels: number; blocks: WorkerBlock[]; uuid: Uint8Array; events: ChannelEvents },
  ) {
    const ctl = new SharedArrayBuffer(CTL_WORDS * 4);
    const slots = new SharedArrayBuffer(role === 'send' ? SLOT_COUNT * HEADER_SIZE : 0);
    this.ctl = new Int32Array(ctl);
    this.slots = new Uint8Array(slots);
    const data: ChannelWorkerData = {
      role, fd: socketFd(socket), id, channels: opts.channels, ctl, slots, slotCount: SLOT_COUNT, blocks: opts.blocks, uuid: opts.uuid,
    };
    this.worker = worker;
    let over!: () => void;
    this.runOver = new Promise<void>((r) => (over = r));
    worker.start(data, (m: WorkerMessage) => {
      if (m.kind === 'init') {
        opts.events.init?.(m.id);
        return;
      }
      this.stopped = true;
      over();
      if (this.closed) return;
      if (m.kind === 'error') opts.events.problem(m.message, false);
      else if (m.kind === 'eof') opts.events.problem(`multifd channel ${id}: the peer closed the connection`, true);
    });
    socket.on('error', () => {});
  }

  // ---- send ----------------------------------------------------------------

  /** Packets queued and not yet sent. */
  get inFlight(): number {
    return Atomics.load(this.ctl, CTL.HEAD) - Atomics.load(this.ctl, CTL.TAIL);
  }

  get hasRoom(): boolean {
    return this.inFlight < SLOT_COUNT;
  }

  /** Bytes of the packet in each slot (header and pages). */
  private readonly slotBytes = new Float64Array(SLOT_COUNT);

  /** Bytes queued and not yet sent. */
  get bytesInFlight(): number {
    const tail = Atomics.load(this.ctl, CTL.TAIL);
    const head = Atomics.load(this.ctl, CTL.HEAD);
    let n = 0;
    for (let i = tail; i < head; i++) n += this.slotBytes[i % SLOT_COUNT]!;
    return n;
  }

  /** Queue a packet (the header as built; pages of block `block`). Only with hasRoom. */
  queue(header: Uint8Array, block: number, pages: number): void {
    const head = Atomics.load(this.ctl, CTL.HEAD);
    const slot = head % SLOT_COUNT;
    this.slotBytes[slot] = HEADER_SIZE + pages * 4096;
    this.slots.set(header.subarray(0, HEADER_SIZE), slot * HEADER_SIZE);
    const m = slotMeta(slot);
    this.ctl[m] = block;
    this.ctl[m + 1] = pages;
    Atomics.store(this.ctl, CTL.HEAD, head + 1);
    Atomics.notify(this.ctl, CTL.HEAD);
  }

  /** Resolves when the worker has sent another packet (or after `ms`). */
  sentMore(ms: number): Promise<unknown> {
    const tail = Atomics.load(this.ctl, CTL.TAIL);
    const r = waitAsync(this.ctl, CTL.TAIL, tail, ms);
    return r.async ? (r.value as Promise<string>) : Promise.resolve();
  }

  // ---- recv ----------------------------------------------------------------

  get syncs(): number {
    return Atomics.load(this.ctl, CTL.SYNCS);
  }

  /** Resolves when the SYNC count changes (or after `ms`). */
  syncedMore(ms: number): Promise<unknown> {
    const r = waitAsync(this.ctl, CTL.SYNCS, this.syncs, ms);
    return r.async ? (r.value as Promise<string>) : Promise.resolve();
  }

  /** Let the worker read past its n-th SYNC packet. */
  release(n: number): void {
    Atomics.store(this.ctl, CTL.RELEASED, n);
    Atomics.notify(this.ctl, CTL.RELEASED);
  }

  get pagesReceived(): number {
    return Atomics.load(this.ctl, CTL.PAGES);
  }

  // ---- both ----------------------------------------------------------------

  /** Stop the worker (QUIT, and the socket shut down to wake it), then close the socket. */
  close(): Promise<void> {
    this.closing ??= this.stop();
    return this.closing;
  }

  private async stop(): Promise<void> {
    this.closed = true;
    Atomics.store(this.ctl, CTL.QUIT, 1);
    for (const i of [CTL.HEAD, CTL.TAIL, CTL.SYNCS, CTL.RELEASED]) Atomics.notify(this.ctl, i);
    try {
      multifdNative?.shutdown(socketFd(this.socket), 2);
    } catch {
      /* already closed */
    }
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([this.runOver, new Promise<void>((r) => (timer = setTimeout(r, STOP_MS)))]);
    clearTimeout(timer);
    if (this.stopped) {
      this.pool.give(this.worker);
    } else {
      // stuck: this worker is not lent again
      this.worker.detach();
      await this.worker.worker.terminate();
    }
    this.socket.destroy();
  }
}
