/**
 * vCPU worker thread: runs one vCPU's workload against guest RAM under the
 * shared control block (see layout.ts). Compiled to
 * dist/src/machine/vcpu-worker.js and started by VcpuThreads (vcpus.ts).
 *
 * Protocol:
 * - The worker polls ctl[CTL_CMD] after every batch (<= BATCH writes).
 * - On PAUSE/EXIT it writes its full workload state back to vstate, then
 *   Atomics.store(ctl, CTL_ACK+i, ACK_PAUSED/ACK_EXITED) + notify. That store
 *   is sequentially consistent and comes after the last guest write, so once
 *   the main thread sees ACK_PAUSED every write of this vCPU is visible and no
 *   further write happens until the next RUN.
 * - On RUN it (re)loads its workload state from vstate (the main thread may
 *   have loaded migrated state meanwhile) and acks ACK_RUNNING.
 * - Sleeping (paused, idle, throttled, rate-limited) is Atomics.wait on
 *   ctl[CTL_SEQ] with a timeout, so any command wakes it at once.
 * - Demand paging (ctl[CTL_DEMAND] = 1): the loops check the present bit of
 *   every page a step touches and stop before a missing one without doing
 *   the step. The worker then posts { type: 'fault', block, page } once,
 *   counts itself in CTL_FAULT_WAITERS, publishes the page in CTL_BLOCKED+i
 *   and waits on the present word until the bit is set, the command is no
 *   longer RUN or demand paging ends. The step is retried afterwards (after
 *   a resume if it was a pause), so state saved while blocked is consistent.
 */
import { parentPort, workerData } from 'node:worker_threads';
import {
  ACK_EXITED,
  BLOCK_PAGES,
  ACK_PAUSED,
  ACK_RUNNING,
  CMD_EXIT,
  CMD_RUN,
  CTL_ACK,
  CTL_BLOCKED,
  CTL_CMD,
  CTL_DEMAND,
  CTL_FAULT_COUNT,
  CTL_FAULT_WAITERS,
  CTL_SEQ,
  CTL_THROTTLE,
  FAULT_RING,
  KIND_STRESS,
  KIND_SWEEP,
  VS_ACTIVE,
  VS_KIND,
  VS_NACTIVE,
  VS_POS,
  VS_RATE,
  VS_READ,
  VS_RNG0,
  VS_ROUND,
  VS_STEPS,
  VS_STEPS_LIMIT,
  VS_STRIDE,
  VS_STRIPE_END,
  VS_STRIPE_START,
  VS_SUM,
  VS_WRITE,
} from './layout.js';
import { StressLoop, SweepLoop, stressSalt } from './workload.js';

export interface VcpuWorkerData {
  index: number;
  ctlBuf: SharedArrayBuffer;
  vstateBuf: SharedArrayBuffer;
  ramBufs: SharedArrayBuffer[];
  dirtyBufs: SharedArrayBuffer[];
  presentBufs: SharedArrayBuffer[];
  /** FAULT_RING Float64 fault latencies in µs */
  faultBuf: SharedArrayBuffer;
}

const BATCH = 128;
/** Throttle slice: run this long, then sleep slice * p / (1 - p). */
const SLICE_MS = 10;

function main(): void {
  const wd = workerData as VcpuWorkerData;
  const idx = wd.index;
  const ctl = new Int32Array(wd.ctlBuf);
  const vs = new Float64Array(wd.vstateBuf, idx * VS_STRIDE * 8, VS_STRIDE);
  const bytes = wd.ramBufs.map((b) => new Uint8Array(b));
  const dirty = wd.dirtyBufs.map((b) => new Int32Array(b));
  const present = wd.presentBufs.map((b) => new Int32Array(b));
  const faultLat = new Float64Array(wd.faultBuf);
  const ackIdx = CTL_ACK + idx;

  const ack = (v: number): void => {
    Atomics.store(ctl, ackIdx, v);
    Atomics.notify(ctl, ackIdx);
  };

  let stress: StressLoop | null = null;
  let sweep: SweepLoop | null = null;

  const loadState = (): void => {
    stress = null;
    sweep = null;
    if (vs[VS_ACTIVE] !== 1) return;
    const kind = vs[VS_KIND];
    if (kind === KIND_STRESS) {
      const start = vs[VS_STRIPE_START]!;
      const l = new StressLoop(bytes, dirty, start, vs[VS_STRIPE_END]! - start, vs[VS_WRITE]!, stressSalt(idx), true, vs[VS_READ] === 1);
      l.setRng([vs[VS_RNG0]!, vs[VS_RNG0 + 1]!, vs[VS_RNG0 + 2]!, vs[VS_RNG0 + 3]!]);
      l.steps = vs[VS_STEPS]!;
      l.sum = vs[VS_SUM]! >>> 0;
      stress = l;
    } else if (kind === KIND_SWEEP) {
      const l = new SweepLoop(bytes, dirty, vs[VS_STRIPE_START]!, vs[VS_STRIPE_END]!, true);
      l.pos = vs[VS_POS]!;
      l.round = vs[VS_ROUND]!;
      l.steps = vs[VS_STEPS]!;
      sweep = l;
    }
  };

  const saveState = (): void => {
    if (stress) {
      const l: StressLoop = stress;
      vs[VS_RNG0] = l.s0 >>> 0;
      vs[VS_RNG0 + 1] = l.s1 >>> 0;
      vs[VS_RNG0 + 2] = l.s2 >>> 0;
      vs[VS_RNG0 + 3] = l.s3 >>> 0;
      vs[VS_STEPS] = l.steps;
      vs[VS_SUM] = l.sum;
    } else if (sweep) {
      const l: SweepLoop = sweep;
      vs[VS_POS] = l.pos;
      vs[VS_ROUND] = l.round;
      vs[VS_STEPS] = l.steps;
    }
  };

  for (;;) {
    const seq = Atomics.load(ctl, CTL_SEQ);
    const cmd = Atomics.load(ctl, CTL_CMD);
    if (cmd === CMD_EXIT) {
      ack(ACK_EXITED);
      return;
    }
    if (cmd !== CMD_RUN) {
      if (Atomics.load(ctl, ackIdx) !== ACK_PAUSED) ack(ACK_PAUSED);
      Atomics.wait(ctl, CTL_SEQ, seq);
      continue;
    }
    // RUN
    loadState();
    ack(ACK_RUNNING);
    runUntilCommand(ctl, vs, stress, sweep, new PageWaiter(ctl, idx, present, faultLat));
    saveState();
  }
}

/** Blocks a vCPU on a missing page (demand paging). */
class PageWaiter {
  constructor(
    readonly ctl: Int32Array,
    readonly idx: number,
    readonly present: Int32Array[],
    readonly lat: Float64Array,
  ) {}

  /**
   * Reports the fault and waits until the page is present, the command is
   * no longer RUN or demand paging ends. Returns the time blocked in ms.
   */
  wait(block: number, page: number): number {
    const ctl = this.ctl;
    const t0 = performance.now();
    parentPort!.postMessage({ type: 'fault', block, page });
    Atomics.add(ctl, CTL_FAULT_WAITERS, 1);
    Atomics.store(ctl, CTL_BLOCKED + this.idx, block * BLOCK_PAGES + page + 1);
    const arr = this.present[block]!;
    const wi = page >>> 5;
    const bit = 1 << (page & 31);
    let arrived = false;
    for (;;) {
      const w = Atomics.load(arr, wi);
      if ((w & bit) !== 0) {
        arrived = true;
        break;
      }
      if (Atomics.load(ctl, CTL_CMD) !== CMD_RUN || Atomics.load(ctl, CTL_DEMAND) === 0) break;
      Atomics.wait(arr, wi, w, 20);
    }
    Atomics.store(ctl, CTL_BLOCKED + this.idx, 0);
    Atomics.sub(ctl, CTL_FAULT_WAITERS, 1);
    const dt = performance.now() - t0;
    if (arrived) {
      const slot = Atomics.add(ctl, CTL_FAULT_COUNT, 1) % FAULT_RING;
      this.lat[slot] = dt * 1000;
    }
    return dt;
  }
}

/** Runs the workload until ctl[CTL_CMD] is no longer RUN. */
function runUntilCommand(
  ctl: Int32Array,
  vs: Float64Array,
  stress: StressLoop | null,
  sweep: SweepLoop | null,
  waiter: PageWaiter,
): void {
  const loop = stress ?? sweep;
  const limit = vs[VS_STEPS_LIMIT]!;
  const rate = vs[VS_RATE]!;
  const nActive = Math.max(1, vs[VS_NACTIVE]!);
  // pages per ms for this vCPU; 0 = unlimited
  const ppms = rate > 0 ? rate / 4096 / nActive / 1000 : 0;
  // start of the pacing; moved forward by every throttle sleep (below)
  let t0 = performance.now();
  const steps0 = loop ? loop.steps : 0;
  let sliceStart = t0;
  for (;;) {
    const seq = Atomics.load(ctl, CTL_SEQ);
    if (Atomics.load(ctl, CTL_CMD) !== CMD_RUN) return;
    if (!loop || (limit >= 0 && loop.steps >= limit)) {
      // nothing (more) to do: sleep until the next command
      Atomics.wait(ctl, CTL_SEQ, seq);
      continue;
    }
    let n = BATCH;
    if (limit >= 0 && limit - loop.steps < n) n = limit - loop.steps;
    if (ppms > 0) {
      const allowed = Math.floor((performance.now() - t0) * ppms) - (loop.steps - steps0);
      if (allowed < 1) {
        const waitMs = Math.min(50, Math.max(0.05, (1 - allowed) / ppms));
        Atomics.wait(ctl, CTL_SEQ, seq, waitMs);
        continue;
      }
      if (allowed < n) n = allowed;
    }
    const demand = Atomics.load(ctl, CTL_DEMAND) !== 0;
    const done = loop.run(n, demand ? waiter.present : null);
    vs[VS_STEPS] = loop.steps;
    if (stress) vs[VS_SUM] = stress.sum;
    if (done < n) {
      // a missing page (only with demand paging): time spent blocked is
      // not made up afterwards, like the throttle sleep below
      const blocked = waiter.wait(loop.faultBlock, loop.faultPage);
      t0 += blocked;
      if (sliceStart !== 0) sliceStart += blocked;
      continue;
    }
    const thr = Atomics.load(ctl, CTL_THROTTLE);
    if (thr > 0) {
      const now = performance.now();
      if (now - sliceStart >= SLICE_MS) {
        const p = Math.min(99, thr) / 100;
        const sleepMs = (SLICE_MS * p) / (1 - p);
        const until = now + sleepMs;
        // sleep, but wake at once on a command (SEQ bump)
        for (;;) {
          const left = until - performance.now();
          if (left <= 0) break;
          if (Atomics.wait(ctl, CTL_SEQ, seq, left) !== 'timed-out') break;
        }
        sliceStart = performance.now();
        // A rate is paced over the time the vCPU runs: time taken away by
        // the throttle is not made up afterwards, or a rate-limited workload
        // would catch up in its next slice and the throttle would not slow it.
        t0 += sliceStart - now;
      }
    } else {
      sliceStart = 0;
    }
  }
}

main();
parentPort?.close();
