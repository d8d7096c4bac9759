/**
 * The RAM section's statistics, computed as QEMU computes them
 * (docs/spec/qmp.md Part D.2): the dirty page rate over periods of at least
 * 1 s (auto-converge looks at the same periods), postcopy page requests, and
 * query-migrate's `ram` object.
 */
import type { MigrationStats } from '../../generated/qapi-types.js';
import { TARGET_PAGE_SIZE } from '../../machine/types.js';
import type { RamSender } from './sender.js';

export const DIRTY_RATE_PERIOD_MS = 1000;

export class RamStats {
  dirtyPagesRate = 0;
  postcopyRequests = 0;
  private periodStart: number;
  private periodDirtied = 0;

  constructor(now: number) {
    this.periodStart = now;
  }

  /**
   * A dirty-log sync found `newlyDirty` pages. When it closes a period of at
   * least 1 s, returns the pages dirtied in that period; otherwise undefined.
   */
  onSync(now: number, newlyDirty: number): number | undefined {
    this.periodDirtied += newlyDirty;
    const period = now - this.periodStart;
    if (period < DIRTY_RATE_PERIOD_MS) return undefined;
    const dirtied = this.periodDirtied;
    this.dirtyPagesRate = Math.round((dirtied * 1000) / period);
    this.periodDirtied = 0;
    this.periodStart = now;
    return dirtied;
  }

  /** query-migrate `ram` (`completed`: nothing remains, no dirty rate). */
  info(sender: RamSender, completed: boolean, mbps: number): MigrationStats {
    const c = sender.counters;
    return {
      transferred: c.transferred,
      remaining: completed ? 0 : sender.dirtyPages * TARGET_PAGE_SIZE,
      total: sender.totalBytes,
      duplicate: c.duplicate,
      skipped: 0,
      normal: c.normal,
      'normal-bytes': c.normal * TARGET_PAGE_SIZE,
      'dirty-pages-rate': completed ? 0 : this.dirtyPagesRate,
      mbps,
      'dirty-sync-count': sender.dirtySyncCount,
      'postcopy-requests': this.postcopyRequests,
      'page-size': TARGET_PAGE_SIZE,
    };
  }
}
