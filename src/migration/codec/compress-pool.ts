/**
 * Worker pools for the `compress` capability (docs/spec/xbzrle.md §6): CompressPool on
 * the source (`compress-threads` workers deflating 4 KiB pages at
 * `compress-level`), DecompressPool on the destination (`decompress-threads`
 * workers inflating them, strictly).
 *
 * Batch design: the pool owns SharedArrayBuffers with `capacity` slots
 * (workers × pagesPerWorker; 256 pages per worker, fewer beyond 16 workers). The caller fills input slots [0, n) on the main
 * thread, calls run(n), and reads output slots [0, n) when it resolves. run()
 * splits the range into one contiguous chunk per worker and posts one message
 * per chunk, so there is no message per page and no copy through
 * postMessage. One batch at a time per pool.
 *
 * Workers are spawned lazily (only as many as a batch needs) and unref'd
 * while idle, so an idle pool never keeps the process alive; close()
 * terminates them.
 */
import { copyBytes } from '../../base/native.js';
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import type { CodecReply, CodecTask, CodecWorkerData } from './compress-worker.js';
import { COMPRESS_BOUND, PAGE_SIZE } from './zlib-page.js';

export { COMPRESS_BOUND, PAGE_SIZE };

/** Pages per worker message in a full batch (fewer with many workers, see MAX_BATCH). */
export const DEFAULT_PAGES_PER_WORKER = 256;
/** Largest default batch: 4096 pages = 16 MiB in, 16 MiB out, whatever the thread count. */
const MAX_BATCH = 4096;
/** Smallest chunk worth a message of its own. */
const MIN_CHUNK = 16;

/**
 * Workers actually spawned for `threads`: a worker thread is a whole V8
 * isolate (several MB each), and workers beyond the cores only add memory,
 * so at most 4 per core (at least 8). compress-threads 255 is accepted, as in
 * QEMU, and served by that many workers.
 */
export function maxWorkers(): number {
  return Math.max(8, 4 * availableParallelism());
}

export interface PoolOptions {
  threads: number;
  pagesPerWorker?: number;
}

interface Slot {
  worker: Worker;
  busy: boolean;
  exited: boolean;
}

interface Pending {
  left: number;
  error: Error | null;
  resolve: () => void;
  reject: (e: Error) => void;
}

abstract class CodecPool {
  /** The thread count asked for (compress-threads / decompress-threads). */
  readonly threads: number;
  /** Workers that share a batch: min(threads, maxWorkers()). */
  readonly workers: number;
  /** Slots per batch. */
  readonly capacity: number;
  /** Input slots (stride inStride). */
  readonly input: Uint8Array;
  /** Output slots (stride outStride). */
  readonly output: Uint8Array;
  readonly inStride: number;
  readonly outStride: number;
  /** Input lengths (decompress). */
  readonly inLen: Int32Array;
  /** Output lengths (compress: compressed length; decompress: 4096 or -1). */
  readonly outLen: Int32Array;
  private readonly data: CodecWorkerData;
  private slots: Slot[] = [];
  private pending: Pending | null = null;
  private nextId = 1;
  private closed = false;

  protected constructor(op: 'compress' | 'decompress', opts: PoolOptions) {
    if (!Number.isInteger(opts.threads) || opts.threads < 1 || opts.threads > 255) {
      throw new RangeError(`thread count ${opts.threads} outside 1..255`);
    }
    this.threads = opts.threads;
    this.workers = Math.min(opts.threads, maxWorkers());
    const perWorker = opts.pagesPerWorker ??
      Math.max(MIN_CHUNK, Math.min(DEFAULT_PAGES_PER_WORKER, Math.floor(MAX_BATCH / this.workers)));
    this.capacity = this.workers * perWorker;
    this.inStride = op === 'compress' ? PAGE_SIZE : COMPRESS_BOUND;
    this.outStride = op === 'compress' ? COMPRESS_BOUND : PAGE_SIZE;
    const input = new SharedArrayBuffer(this.capacity * this.inStride);
    const output = new SharedArrayBuffer(this.capacity * this.outStride);
    const inLen = new SharedArrayBuffer(this.capacity * 4);
    const outLen = new SharedArrayBuffer(this.capacity * 4);
    this.input = new Uint8Array(input);
    this.output = new Uint8Array(output);
    this.inLen = new Int32Array(inLen);
    this.outLen = new Int32Array(outLen);
    this.data = { op, input, inStride: this.inStride, output, outStride: this.outStride, inLen, outLen };
  }

  /** Workers currently spawned. */
  get spawned(): number {
    return this.slots.length;
  }

  /** Process slots [0, n). Rejects if a worker fails or the pool is closed. */
  protected runBatch(n: number, level: number): Promise<void> {
    if (this.closed) return Promise.reject(new Error('codec pool closed'));
    if (this.pending !== null) return Promise.reject(new Error('codec pool: a batch is already running'));
    if (!Number.isInteger(n) || n < 0 || n > this.capacity) {
      return Promise.reject(new RangeError(`batch of ${n} pages outside 0..${this.capacity}`));
    }
    if (n === 0) return Promise.resolve();
    const chunks = Math.max(1, Math.min(this.workers, Math.ceil(n / MIN_CHUNK)));
    const per = Math.ceil(n / chunks);
    while (this.slots.length < chunks) this.spawn();
    return new Promise<void>((resolve, reject) => {
      const p: Pending = { left: 0, error: null, resolve, reject };
      this.pending = p;
      for (let k = 0, start = 0; start < n; k++, start += per) {
        const slot = this.slots[k]!;
        const task: CodecTask = { id: this.nextId++, start, count: Math.min(per, n - start), level };
        slot.busy = true;
        slot.worker.ref();
        p.left++;
        slot.worker.postMessage(task);
      }
    });
  }

  private spawn(): void {
    const worker = new Worker(new URL('./compress-worker.js', import.meta.url), { workerData: this.data });
    const slot: Slot = { worker, busy: false, exited: false };
    worker.unref();
    worker.on('message', (r: CodecReply) => {
      slot.busy = false;
      worker.unref();
      this.settle(r.ok ? null : new Error(r.error ?? 'codec worker failed'));
    });
    worker.on('error', (e) => this.lose(slot, e));
    worker.on('exit', (code) => this.lose(slot, new Error(`codec worker exited with code ${code}`)));
    this.slots.push(slot);
  }

  private settle(e: Error | null): void {
    const p = this.pending;
    if (p === null) return;
    if (e !== null && p.error === null) p.error = e;
    if (--p.left > 0) return;
    this.pending = null;
    if (p.error !== null) p.reject(p.error);
    else p.resolve();
  }

  /** A worker died: fail the batch at once (its reply will never come). */
  private lose(slot: Slot, e: Error): void {
    if (slot.exited) return;
    slot.exited = true;
    this.slots = this.slots.filter((s) => s !== slot);
    if (this.closed) return;
    const p = this.pending;
    if (p !== null && slot.busy) {
      this.pending = null;
      // the other workers may still be writing into the shared areas: a
      // failed pool is not reused
      this.closed = true;
      p.reject(e);
      void this.close();
    }
  }

  /** Terminate the workers; a running batch rejects. */
  async close(): Promise<void> {
    this.closed = true;
    const p = this.pending;
    this.pending = null;
    p?.reject(new Error('codec pool closed'));
    const ws = this.slots.map((s) => s.worker);
    for (const s of this.slots) s.exited = true;
    this.slots = [];
    await Promise.all(ws.map((w) => w.terminate().catch(() => undefined)));
  }
}

/**
 * Source side: fill `input` slots with pages (slot i at i * PAGE_SIZE), run
 * compress(n, level), then slot i's zlib stream is
 * output[i * COMPRESS_BOUND, + outLen[i]).
 */
export class CompressPool extends CodecPool {
  constructor(opts: PoolOptions) {
    super('compress', opts);
  }

  /** Copy a page into input slot i. */
  putPage(i: number, src: Uint8Array, offset: number): void {
    copyBytes(this.input, i * PAGE_SIZE, src, offset, PAGE_SIZE);
  }

  compress(n: number, level: number): Promise<void> {
    if (!Number.isInteger(level) || level < 0 || level > 9) {
      return Promise.reject(new RangeError(`compress level ${level} outside 0..9`));
    }
    return this.runBatch(n, level);
  }

  /** The zlib stream of slot i (a view into the shared output area). */
  result(i: number): Uint8Array {
    const len = this.outLen[i]!;
    return this.output.subarray(i * COMPRESS_BOUND, i * COMPRESS_BOUND + len);
  }
}

/**
 * Destination side: put compressed streams into slots with putCompressed,
 * run decompress(n), then ok(i) says whether slot i inflated to exactly one
 * page, found at output[i * PAGE_SIZE, + PAGE_SIZE).
 */
export class DecompressPool extends CodecPool {
  constructor(opts: PoolOptions) {
    super('decompress', opts);
  }

  /** Copy `len` compressed bytes into input slot i (len <= COMPRESS_BOUND). */
  putCompressed(i: number, src: Uint8Array, offset: number, len: number): void {
    if (len > COMPRESS_BOUND) throw new RangeError(`compressed length ${len} exceeds ${COMPRESS_BOUND}`);
    copyBytes(this.input, i * COMPRESS_BOUND, src, offset, len);
    this.inLen[i] = len;
  }

  /** The input slot i, for a reader to copy into directly (then setLength). */
  inputSlot(i: number): Uint8Array {
    return this.input.subarray(i * COMPRESS_BOUND, (i + 1) * COMPRESS_BOUND);
  }

  setLength(i: number, len: number): void {
    this.inLen[i] = len;
  }

  decompress(n: number): Promise<void> {
    return this.runBatch(n, 0);
  }

  ok(i: number): boolean {
    return this.outLen[i] === PAGE_SIZE;
  }

  /** The page of slot i (a view into the shared output area). */
  page(i: number): Uint8Array {
    return this.output.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
  }
}
