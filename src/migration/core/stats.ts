/**
 * Statistics of one outgoing migration, computed as QEMU computes them
 * (qmp.md Part D.2): throughput windows of at least 100 ms, dirty-rate periods
 * of at least 1 s, expected downtime as remaining bytes over bandwidth (the
 * rule of QEMU 7.2).
 */
import type { MigrationStats } from '../../generated/qapi-types.js';
import { TARGET_PAGE_SIZE } from '../../machine/types.js';

export const WINDOW_MS = 100;
export const DIRTY_RATE_PERIOD_MS = 1000;

export class SourceStats {
  /** performance.now() when `migrate` was issued */
  startTime = 0;
  setupTime = 0;
  totalTime = 0;
  downtime = 0;
  expectedDowntime = 0;
  /** bytes written by the RAM section (page records, headers, EOS words) */
  ramTransferred = 0;
  duplicate = 0;
  normal = 0;
  dirtySyncCount = 0;
  dirtyPagesRate = 0;
  postcopyRequests = 0;
  remainingPages = 0;
  totalBytes = 0;
  mbps = 0;

  /** bytes per millisecond, measured over the last window; 0 before the first */
  bandwidth = 0;
  private windowStart = 0;
  private windowBytes = 0;
  private periodStart = 0;
  private periodDirtied = 0;

  begin(now: number, totalBytes: number): void {
    this.startTime = now;
    this.totalBytes = totalBytes;
  }

  /** Called when the channel is up; starts the first window and period. */
  beginTransfer(now: number, streamBytes: number, downtimeLimit: number): void {
    this.windowStart = now;
    this.windowBytes = streamBytes;
    this.periodStart = now;
    this.expectedDowntime = downtimeLimit;
  }

  /**
   * Close the throughput window if 100 ms have passed. Returns true if a new
   * measurement was taken.
   */
  updateWindow(now: number, streamBytes: number): boolean {
    const elapsed = now - this.windowStart;
    if (elapsed < WINDOW_MS) return false;
    const bytes = streamBytes - this.windowBytes;
    this.bandwidth = bytes / elapsed;
    this.mbps = (bytes * 8) / (elapsed / 1000) / 1e6;
    if (bytes > 10000 && this.bandwidth > 0) {
      this.expectedDowntime = Math.round((this.remainingPages * TARGET_PAGE_SIZE) / this.bandwidth);
    }
    this.windowStart = now;
    this.windowBytes = streamBytes;
    return true;
  }

  /**
   * A dirty-bitmap sync found `newlyDirty` pages. When it closes a period of
   * at least 1 s, returns the pages dirtied in that period (auto-converge
   * looks at the same periods); otherwise undefined.
   */
  onSync(now: number, newlyDirty: number): number | undefined {
    this.dirtySyncCount++;
    this.periodDirtied += newlyDirty;
    const period = now - this.periodStart;
    if (period >= DIRTY_RATE_PERIOD_MS) {
      const dirtied = this.periodDirtied;
      this.dirtyPagesRate = Math.round((dirtied * 1000) / period);
      this.periodDirtied = 0;
      this.periodStart = now;
      return dirtied;
    }
    return undefined;
  }

  ram(completed: boolean): MigrationStats {
    return {
      transferred: this.ramTransferred,
      remaining: completed ? 0 : this.remainingPages * TARGET_PAGE_SIZE,
      total: this.totalBytes,
      duplicate: this.duplicate,
      skipped: 0,
      normal: this.normal,
      'normal-bytes': this.normal * TARGET_PAGE_SIZE,
      'dirty-pages-rate': completed ? 0 : this.dirtyPagesRate,
      mbps: this.mbps,
      'dirty-sync-count': this.dirtySyncCount,
      'postcopy-requests': this.postcopyRequests,
      'page-size': TARGET_PAGE_SIZE,
    };
  }
}
