/**
 * The VM's multifd channel workers (channel-worker.ts), kept between
 * migrations. A worker thread takes about 75 ms of CPU and 40 ms or more
 * to start (a V8 isolate, Node's bootstrap, our modules); QEMU's channel
 * threads cost nothing like it. So the VM starts its workers when
 * `multifd` is turned on (warm()), and a migration borrows started ones
 * (take()) and hands them back when its channels close. Idle workers are
 * unref'd: they never keep the process alive.
 */
import { Worker } from 'node:worker_threads';
import type { ChannelWorkerData, WorkerMessage } from './shared.js';

const WORKER_URL = new URL('./channel-worker.js', import.meta.url);

/** One started worker, lent to one channel at a time. */
export class ChannelWorker {
  readonly worker: Worker;
  /** Settles when the worker has loaded (its `ready` message) or has gone. */
  readonly loaded: Promise<void>;
  /** The worker exited (it cannot be lent again). */
  gone = false;
  private listener: ((m: WorkerMessage) => void) | null = null;

  constructor() {
    this.worker = new Worker(WORKER_URL);
    this.worker.unref();
    let loaded!: () => void;
    this.loaded = new Promise<void>((r) => (loaded = r));
    this.worker.on('message', (m: WorkerMessage | { kind: 'ready' }) => {
      if (m.kind === 'ready') {
        loaded();
        return;
      }
      this.listener?.(m);
    });
    this.worker.on('error', (e) => this.listener?.({ kind: 'error', message: `multifd worker: ${e.message}` }));
    this.worker.once('exit', () => {
      this.gone = true;
      loaded();
      this.listener?.({ kind: 'error', message: 'multifd worker exited' });
    });
  }

  /** Start one channel's run; `listener` gets its messages until the run's last one. */
  start(data: ChannelWorkerData, listener: (m: WorkerMessage) => void): void {
    this.listener = listener;
    this.worker.postMessage(data);
  }

  /** The run is over: messages go nowhere until the next start(). */
  detach(): void {
    this.listener = null;
  }
}

export class MultifdWorkers {
  private idle: ChannelWorker[] = [];

  /** Have at least `n` workers started and waiting (multifd was turned on, or multifd-channels grew). */
  warm(n: number): void {
    while (this.idle.length < n) this.idle.push(new ChannelWorker());
  }

  /** `n` workers for a migration's channels: started ones first, new ones for the rest. */
  take(n: number): ChannelWorker[] {
    this.idle = this.idle.filter((w) => !w.gone);
    const out = this.idle.splice(0, n);
    while (out.length < n) out.push(new ChannelWorker());
    return out;
  }

  /** A worker whose run is over goes back to wait for the next migration. */
  give(w: ChannelWorker): void {
    w.detach();
    if (!w.gone) this.idle.push(w);
  }

  /** multifd was turned off: the waiting workers stop (once loaded, so that no module file stays open). */
  async release(): Promise<void> {
    const idle = this.idle;
    this.idle = [];
    await Promise.all(idle.map(async (w) => {
      await w.loaded;
      await w.worker.terminate();
    }));
  }
}
