/**
 * Demand paging (the postcopy destination's userfaultfd): while it is on, a
 * vCPU checks the `present` bit of every page a step touches and, on a
 * missing page, stops before the step, posts one fault and waits on the
 * bitmap word (vcpu-worker.ts PageWaiter). This side turns it on and off,
 * hands the faults to the migration, marks pages present and wakes the
 * blocked vCPUs, and reads the fault statistics the workers record in the
 * shared fault ring. The flags live in the vCPU control block (layout.ts
 * CTL_DEMAND, CTL_FAULT_WAITERS, CTL_FAULT_COUNT, CTL_BLOCKED).
 */
import { BLOCK_PAGES, CTL_BLOCKED, CTL_DEMAND, CTL_FAULT_COUNT, CTL_FAULT_WAITERS, FAULT_RING } from './layout.js';
import type { RamBlock } from './types.js';

/** Error thrown by RAM readers (digest, pmemsave) while demand paging is on. */
export const DEMAND_PAGING_RAM_ERROR = 'Guest memory is still being fetched from the migration source';

export class DemandPaging {
  /** FAULT_RING fault latencies in µs, written by the vCPU workers. */
  readonly faultLat = new Float64Array(new SharedArrayBuffer(FAULT_RING * 8));
  private onFault: ((block: number, page: number) => void) | null = null;

  constructor(
    private readonly ctl: Int32Array,
    private readonly blocks: readonly RamBlock[],
    private readonly smp: number,
  ) {}

  /**
   * Turns demand paging on (postcopy destination). The caller has already
   * cleared the `present` bits of the pages still missing (RamBlock.present).
   * From now on a vCPU that is about to touch a missing page blocks before
   * the access and posts one fault: onFault(block, page) is called on the
   * main thread (block index into the RAM blocks, block-local page). A fault
   * may be reported for a page that arrived meanwhile. Resets stats().
   */
  begin(onFault: (block: number, page: number) => void): void {
    // The ring is read only up to the count, so it needs no clearing (and
    // the first touch of its 512 KiB cost up to 12 ms of downtime here).
    Atomics.store(this.ctl, CTL_FAULT_COUNT, 0);
    this.onFault = onFault;
    Atomics.store(this.ctl, CTL_DEMAND, 1);
  }

  /**
   * Marks a page present (after its bytes were written) and wakes a vCPU
   * waiting for it. Cheap: one Atomics.or, plus a notify only while some
   * vCPU is blocked. (Atomic, unlike the base/bitmap.ts helpers: the vCPUs
   * read the word at the same time.)
   */
  markPresent(block: number, page: number): void {
    const arr = this.blocks[block]!.present;
    const wi = page >>> 5;
    Atomics.or(arr, wi, 1 << (page & 31));
    if (Atomics.load(this.ctl, CTL_FAULT_WAITERS) > 0) Atomics.notify(arr, wi);
  }

  /**
   * Ends demand paging: the vCPUs stop checking present bits (a blocked
   * vCPU is released and does its step), onFault is no longer called.
   * Does not change the present bitmaps.
   */
  end(): void {
    Atomics.store(this.ctl, CTL_DEMAND, 0);
    this.onFault = null;
    this.wakeBlocked();
  }

  get active(): boolean {
    return Atomics.load(this.ctl, CTL_DEMAND) !== 0;
  }

  /** A vCPU reported a fault: hand it on while demand paging is on. */
  fault(block: number, page: number): void {
    this.onFault?.(block, page);
  }

  /**
   * Faults resolved (page arrived) since begin(), and their latencies in µs
   * (fault to page present), oldest first: the newest FAULT_RING samples at
   * most.
   */
  stats(): { faults: number; latenciesUs: Float64Array } {
    const faults = Atomics.load(this.ctl, CTL_FAULT_COUNT);
    if (faults <= FAULT_RING) return { faults, latenciesUs: this.faultLat.slice(0, faults) };
    const out = new Float64Array(FAULT_RING);
    const head = faults % FAULT_RING;
    out.set(this.faultLat.subarray(head), 0);
    out.set(this.faultLat.subarray(0, head), FAULT_RING - head);
    return { faults, latenciesUs: out };
  }

  /** Whether vCPU `index` now waits for a missing page. */
  blocked(index: number): boolean {
    return Atomics.load(this.ctl, CTL_BLOCKED + index) !== 0;
  }

  /** After a vCPU command: wakes the blocked vCPUs (if any) so that they see it. */
  commandPosted(): void {
    // a vCPU blocked on a missing page waits on the page's present word
    if (Atomics.load(this.ctl, CTL_FAULT_WAITERS) > 0) this.wakeBlocked();
  }

  /** Wakes every vCPU blocked on a missing page so that it rechecks the command / demand flag. */
  private wakeBlocked(): void {
    for (let i = 0; i < this.smp; i++) {
      const v = Atomics.load(this.ctl, CTL_BLOCKED + i);
      if (v === 0) continue;
      const p = v - 1;
      const blk = this.blocks[Math.floor(p / BLOCK_PAGES)];
      if (blk) Atomics.notify(blk.present, (p % BLOCK_PAGES) >>> 5);
    }
  }
}
