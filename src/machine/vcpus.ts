/**
 * The vCPUs: one worker thread each (vcpu-worker.ts) under the shared control
 * block (layout.ts CTL_*): the run / pause / exit commands and their
 * acknowledgements, the throttle, the workload the vCPUs run (their state
 * slots, vcpu-slots.ts) and its counters, and a worker's failure.
 *
 * pause() resolves only when every worker has acknowledged that it is
 * paused: its last guest write is then visible and it writes nothing until
 * the next resume(). That is what makes a switchover copy exact.
 */
import { Worker } from 'node:worker_threads';
import {
  ACK_EXITED,
  ACK_PAUSED,
  ACK_RUNNING,
  CMD_EXIT,
  CMD_PAUSE,
  CMD_RUN,
  CTL_ACK,
  CTL_CMD,
  CTL_LENGTH,
  CTL_SEQ,
  CTL_THROTTLE,
  MAX_VCPUS,
  VS_ACTIVE,
  VS_NSLOTS,
  VS_STEPS,
  VS_STEPS_LIMIT,
  VS_STRIDE,
  VS_SUM,
} from './layout.js';
import type { VcpuWorkerData } from './vcpu-worker.js';
import { decodeWorkload, encodeWorkload, resolveWorkload, validateSlots, type ResolvedWorkload } from './vcpu-slots.js';
import type { RamBlock, WorkloadConfig } from './types.js';

/** Workload counters of one vCPU (x-query-workload). */
export interface VcpuWorkloadInfo {
  cpuIndex: number;
  /** steps done (exact while paused, sampled after every batch while running) */
  steps: number;
  /** stress read=on checksum (0 otherwise) */
  sum: number;
  /** waiting for a missing page (demand paging) */
  blocked: boolean;
}

/** What the vCPU threads report to their owner. */
export interface VcpuEvents {
  /** A vCPU is about to touch a missing page (demand paging). */
  fault(block: number, page: number): void;
  /** A command was posted (a vCPU blocked on a missing page must be woken to see it). */
  commandPosted(): void;
  /** A worker failed (error or non-zero exit); `VcpuThreads.error` is set. */
  failed(index: number, e: Error): void;
  /** Whether vCPU `index` waits for a missing page. */
  blocked(index: number): boolean;
}

type WaitAsyncResult = { async: false; value: 'not-equal' | 'timed-out' } | { async: true; value: Promise<'ok' | 'timed-out'> };
/** Atomics.waitAsync (Node >= 16; not in the ES2023 lib typings). */
const waitAsync = (Atomics as unknown as {
  waitAsync(a: Int32Array, i: number, v: number, t?: number): WaitAsyncResult;
}).waitAsync.bind(Atomics);

/** Throws unless `smp` is a valid vCPU count. */
export function checkVcpuCount(smp: number): void {
  if (!Number.isInteger(smp) || smp < 1 || smp > MAX_VCPUS) {
    throw new Error(`Invalid smp ${smp}: expected 1..${MAX_VCPUS} vCPUs`);
  }
}

export class VcpuThreads {
  /** The shared control block (layout.ts CTL_*). */
  readonly ctl = new Int32Array(new SharedArrayBuffer(CTL_LENGTH * 4));
  /** The vCPUs' state slots, VS_STRIDE per vCPU (layout.ts VS_*). */
  private readonly vstate = new Float64Array(new SharedArrayBuffer(MAX_VCPUS * VS_STRIDE * 8));
  private readonly workers: Worker[] = [];
  private _workload: ResolvedWorkload = { kind: 'idle' };
  private running = false;
  private exiting = false;
  /** The first worker failure; every later command fails with it. */
  error: Error | null = null;
  /** Latency of the last pause() in ms (request to every ack). */
  lastPauseLatencyMs = 0;

  constructor(
    readonly smp: number,
    private readonly events: VcpuEvents,
  ) {
    checkVcpuCount(smp);
    this.ctl[CTL_CMD] = CMD_PAUSE;
  }

  /** Starts the workers (paused); resolves once every one acknowledged. */
  async spawn(ram: readonly RamBlock[], faultLat: Float64Array): Promise<void> {
    const ramBufs = ram.map((b) => b.bytes.buffer as SharedArrayBuffer);
    const dirtyBufs = ram.map((b) => b.dirty.buffer as SharedArrayBuffer);
    const presentBufs = ram.map((b) => b.present.buffer as SharedArrayBuffer);
    const faultBuf = faultLat.buffer as SharedArrayBuffer;
    const url = new URL('./vcpu-worker.js', import.meta.url);
    for (let i = 0; i < this.smp; i++) {
      const workerData: VcpuWorkerData = {
        index: i,
        ctlBuf: this.ctl.buffer as SharedArrayBuffer,
        vstateBuf: this.vstate.buffer as SharedArrayBuffer,
        ramBufs,
        dirtyBufs,
        presentBufs,
        faultBuf,
      };
      const w = new Worker(url, { workerData, name: `vcpu${i}` });
      w.on('message', (m: unknown) => {
        if (typeof m !== 'object' || m === null) return;
        const msg = m as { type?: unknown; block?: unknown; page?: unknown };
        if (msg.type !== 'fault') return;
        this.events.fault(msg.block as number, msg.page as number);
      });
      w.on('error', (e) => this.fail(i, e));
      w.on('exit', (code) => {
        if (code !== 0) this.fail(i, new Error(`vCPU ${i} exited with code ${code}`));
      });
      this.workers.push(w);
    }
    await this.waitAcks(ACK_PAUSED, 30_000);
  }

  private fail(index: number, e: Error): void {
    if (this.exiting) return;
    this.error ??= e;
    this.events.failed(index, e);
  }

  private command(cmd: number): void {
    Atomics.store(this.ctl, CTL_CMD, cmd);
    Atomics.add(this.ctl, CTL_SEQ, 1);
    Atomics.notify(this.ctl, CTL_SEQ);
    this.events.commandPosted();
  }

  private async waitAcks(want: number, timeoutMs = 10_000): Promise<void> {
    const deadline = performance.now() + timeoutMs;
    for (let i = 0; i < this.smp; i++) {
      for (;;) {
        const cur = Atomics.load(this.ctl, CTL_ACK + i);
        if (cur === want) break;
        if (this.error) throw new Error(`vCPU failed: ${this.error.message}`);
        if (cur === ACK_EXITED && want !== ACK_EXITED) throw new Error(`vCPU ${i} has exited`);
        const left = deadline - performance.now();
        if (left <= 0) throw new Error(`vCPU ${i} did not acknowledge within ${timeoutMs} ms`);
        const r = waitAsync(this.ctl, CTL_ACK + i, cur, Math.min(left, 100));
        if (r.async) await r.value;
      }
    }
  }

  /**
   * Pauses every vCPU; resolves once every worker acknowledged that it is
   * paused (its last write is visible and it will not write again until
   * resume()).
   */
  async pause(): Promise<void> {
    const t0 = performance.now();
    this.command(CMD_PAUSE);
    await this.waitAcks(ACK_PAUSED);
    this.running = false;
    this.lastPauseLatencyMs = performance.now() - t0;
  }

  /** Resumes every vCPU (each reloads its state slots); resolves when all acknowledged. */
  async resume(): Promise<void> {
    this.command(CMD_RUN);
    await this.waitAcks(ACK_RUNNING);
    this.running = true;
  }

  get paused(): boolean {
    return !this.running;
  }

  /** Tells the workers to exit and waits for them (terminating one that does not exit within 2 s). */
  async exit(): Promise<void> {
    this.exiting = true;
    this.command(CMD_EXIT);
    const exits = this.workers.map(
      (w) =>
        new Promise<void>((resolve) => {
          const t = setTimeout(() => void w.terminate().then(() => resolve(), () => resolve()), 2000);
          w.once('exit', () => {
            clearTimeout(t);
            resolve();
          });
        }),
    );
    await Promise.all(exits);
  }

  /** CPU throttle 0..99 percent (QEMU's scheme: run 10 ms, sleep 10ms·p/(1−p)). */
  setThrottle(pct: number): void {
    if (!Number.isInteger(pct) || pct < 0 || pct > 99) {
      throw new RangeError(`throttle percentage ${pct} out of range 0..99`);
    }
    Atomics.store(this.ctl, CTL_THROTTLE, pct);
    Atomics.add(this.ctl, CTL_SEQ, 1);
    Atomics.notify(this.ctl, CTL_SEQ);
  }

  getThrottle(): number {
    return Atomics.load(this.ctl, CTL_THROTTLE);
  }

  /* --------------------------------------------------------- workload */

  /** The workload now configured, defaults filled in (adopted from the source after a state load). */
  get workload(): ResolvedWorkload {
    return { ...this._workload };
  }

  /**
   * Sets the workload (only while the vCPUs are paused): resolves defaults,
   * validates against the RAM size, resets steps and PRNG state.
   */
  setWorkload(w: WorkloadConfig, ramSize: number): void {
    if (this.running) throw new Error('setWorkload: vCPUs must be paused');
    const resolved = resolveWorkload(w, ramSize);
    const slots = encodeWorkload(resolved, this.smp);
    this._workload = resolved;
    for (let i = 0; i < this.smp; i++) this.vstate.set(slots[i]!, i * VS_STRIDE);
  }

  /** A copy of vCPU `index`'s state slots (only while the vCPUs are paused). */
  saveSlots(index: number): Float64Array {
    if (this.running) throw new Error(`ferry-vcpu ${index}: cannot save while the vCPUs run`);
    return this.vstate.slice(index * VS_STRIDE, index * VS_STRIDE + VS_NSLOTS);
  }

  /**
   * Validates and installs vCPU `index`'s state slots from a migration
   * source (only while the vCPUs are paused) and adopts the source's
   * workload, which every vCPU's slots describe alike.
   */
  loadSlots(index: number, s: Float64Array, ramPages: number): void {
    if (this.running) throw new Error(`ferry-vcpu ${index}: cannot load while the vCPUs run`);
    validateSlots(index, s, this.smp, ramPages);
    this.vstate.set(s, index * VS_STRIDE);
    this._workload = decodeWorkload(s);
  }

  /** Steps (writes) done so far by each vCPU (sampled; exact while paused). */
  steps(): number[] {
    const r: number[] = [];
    for (let i = 0; i < this.smp; i++) r.push(this.vstate[i * VS_STRIDE + VS_STEPS]!);
    return r;
  }

  /** True when every active vCPU has reached its steps=N limit (false without a limit). */
  workloadDone(): boolean {
    for (let i = 0; i < this.smp; i++) {
      const o = i * VS_STRIDE;
      if (this.vstate[o + VS_ACTIVE] !== 1) continue;
      const lim = this.vstate[o + VS_STEPS_LIMIT]!;
      if (lim < 0 || this.vstate[o + VS_STEPS]! < lim) return false;
    }
    return true;
  }

  /** Per-vCPU workload counters (x-query-workload). */
  workloadInfo(): VcpuWorkloadInfo[] {
    const r: VcpuWorkloadInfo[] = [];
    for (let i = 0; i < this.smp; i++) {
      const o = i * VS_STRIDE;
      r.push({
        cpuIndex: i,
        steps: this.vstate[o + VS_STEPS]!,
        sum: this.vstate[o + VS_SUM]! >>> 0,
        blocked: this.events.blocked(i),
      });
    }
    return r;
  }
}
