/**
 * A small pool of helper worker threads (helper-worker.ts) for the boot fill,
 * the prefault of an incoming VM's RAM and the memory digest (ram.ts). Workers are created lazily and unref'd while idle,
 * so an idle pool never keeps the process alive.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import type { HelperResult, HelperTask } from './helper-worker.js';

type DistributiveOmit<T, K extends keyof never> = T extends unknown ? Omit<T, K> : never;
export type HelperRequest = DistributiveOmit<HelperTask, 'id'>;

interface Slot {
  worker: Worker;
  busy: boolean;
  /** Settles once the worker has loaded its modules (its first message), or has gone. */
  loaded: Promise<void>;
}

/** How long close() lets a worker that is still loading its modules finish before it terminates it. */
const LOAD_WAIT_MS = 5000;

export class HelperPool {
  private slots: Slot[] = [];
  private queue: { task: HelperTask; resolve: (r: HelperResult) => void; reject: (e: Error) => void }[] = [];
  private pending = new Map<number, { resolve: (r: HelperResult) => void; reject: (e: Error) => void; slot: Slot }>();
  private nextId = 1;
  private closed = false;
  readonly size: number;

  constructor(size = Math.max(1, Math.min(4, availableParallelism()))) {
    this.size = size;
  }

  run(req: HelperRequest): Promise<HelperResult> {
    if (this.closed) return Promise.reject(new Error('helper pool closed'));
    const task = { ...req, id: this.nextId++ } as HelperTask;
    return new Promise((resolve, reject) => {
      this.queue.push({ task, resolve, reject });
      this.pump();
    });
  }

  private spawn(): Slot {
    const worker = new Worker(new URL('./helper-worker.js', import.meta.url));
    let loaded!: () => void;
    const slot: Slot = { worker, busy: false, loaded: new Promise<void>((r) => (loaded = r)) };
    // Terminating a worker while the module loader still has its files open
    // leaves those descriptors open in this process; close() waits for this.
    worker.once('message', () => loaded());
    worker.once('exit', () => loaded());
    worker.on('message', (r: HelperResult) => {
      const p = this.pending.get(r.id);
      if (!p) return;
      this.pending.delete(r.id);
      slot.busy = false;
      if (r.ok) p.resolve(r);
      else p.reject(new Error(r.error ?? 'helper task failed'));
      this.pump();
    });
    worker.on('error', (e) => this.failSlot(slot, e));
    worker.on('exit', (code) => {
      if (!this.closed) this.failSlot(slot, new Error(`helper worker exited with code ${code}`));
    });
    this.slots.push(slot);
    return slot;
  }

  private failSlot(slot: Slot, e: Error): void {
    this.slots = this.slots.filter((s) => s !== slot);
    for (const [id, p] of this.pending) {
      if (p.slot === slot) {
        this.pending.delete(id);
        p.reject(e);
      }
    }
    this.pump();
  }

  private pump(): void {
    while (this.queue.length > 0) {
      let slot = this.slots.find((s) => !s.busy);
      if (!slot && this.slots.length < this.size) slot = this.spawn();
      if (!slot) break;
      const q = this.queue.shift()!;
      slot.busy = true;
      slot.worker.ref();
      this.pending.set(q.task.id, { resolve: q.resolve, reject: q.reject, slot });
      slot.worker.postMessage(q.task);
    }
    for (const s of this.slots) if (!s.busy) s.worker.unref();
  }

  async close(): Promise<void> {
    this.closed = true;
    const slots = this.slots;
    this.slots = [];
    for (const q of this.queue) q.reject(new Error('helper pool closed'));
    this.queue = [];
    for (const p of this.pending.values()) p.reject(new Error('helper pool closed'));
    this.pending.clear();
    await Promise.all(slots.map(async (s) => {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([s.loaded, new Promise<void>((r) => (timer = setTimeout(r, LOAD_WAIT_MS)))]);
      clearTimeout(timer);
      await s.worker.terminate();
    }));
  }
}
