/**
 * The `auto-converge` capability (docs/spec/qmp.md Part E.3): when the guest dirties
 * memory faster than half of what the migration sends, throttle its vCPUs,
 * and throttle harder while that goes on.
 */
import { TARGET_PAGE_SIZE } from '../../machine/types.js';
import type { MigrationOptions } from '../core/options.js';
import type { MachinePort } from '../core/port.js';

/** QEMU's CPU_THROTTLE_PCT_MIN / CPU_THROTTLE_PCT_MAX. */
const THROTTLE_MIN = 1;
const THROTTLE_MAX = 99;

export class AutoConverge {
  /** Current throttle in percent; 0 = not throttling. */
  private pct = 0;
  /** Qualifying periods since the last throttle change (dirty_rate_high_cnt). */
  private highCount = 0;
  /** RAM bytes transferred when the last period closed (bytes_xfer_prev). */
  private bytesPrev = 0;

  constructor(
    private readonly machine: MachinePort,
    private readonly options: MigrationOptions,
  ) {}

  get enabled(): boolean {
    return this.options.capability('auto-converge');
  }

  /** Throttle in percent, 0 when the guest is not throttled. */
  get throttle(): number {
    return this.pct;
  }

  /**
   * A bitmap sync closed a dirty-rate period (≥ 1 s) in which the guest
   * dirtied `dirtiedPages` pages; `transferred` is the RAM section's byte
   * counter now. Applies QEMU's rule; the throttle parameters are read here,
   * so changes made during the migration take effect at the next step.
   */
  onPeriod(dirtiedPages: number, transferred: number): void {
    const xfer = transferred - this.bytesPrev;
    this.bytesPrev = transferred;
    if (!this.enabled) return;
    if (dirtiedPages * TARGET_PAGE_SIZE > xfer / 2 && ++this.highCount >= 2) {
      this.highCount = 0;
      const next = this.pct === 0
        ? this.options.get('cpu-throttle-initial')
        : this.pct + this.options.get('cpu-throttle-increment');
      this.set(Math.min(THROTTLE_MAX, Math.max(THROTTLE_MIN, next)));
    }
  }

  /** The migration left its loop (any outcome): the guest runs at full speed again. */
  lift(): void {
    this.highCount = 0;
    if (this.pct !== 0) this.set(0);
  }

  private set(pct: number): void {
    this.pct = pct;
    this.machine.setThrottle(pct);
  }
}
