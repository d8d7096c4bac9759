/**
 * The statistics of one outgoing migration that belong to no section,
 * computed as QEMU computes them (docs/spec/qmp.md Part D.2): times,
 * throughput over windows of at least 100 ms, and the expected downtime as
 * what remains over the bandwidth (QEMU 7.2's rule). The sections add their
 * own figures (ram/stats.ts).
 */

export const WINDOW_MS = 100;
/** Windows the low bandwidth looks back over. */
const RECENT_WINDOWS = 2;

export class SourceStats {
  /** now() when `migrate` was issued */
  startTime = 0;
  setupTime = 0;
  totalTime = 0;
  downtime = 0;
  expectedDowntime = 0;
  mbps = 0;
  /** Bytes every section still has to send (their pending sum, at the last decision point). */
  remaining = 0;
  /** bytes per millisecond, measured over the last window; 0 before the first */
  bandwidth = 0;
  /** The lowest of the last RECENT_WINDOWS window bandwidths (bytes/ms): what the switchover plans with. */
  lowBandwidth = 0;
  private readonly recent: number[] = [];
  private windowStart = 0;
  private windowBytes = 0;

  begin(now: number): void {
    this.startTime = now;
  }

  /** Called when the channel is up; starts the first window. */
  beginTransfer(now: number, streamBytes: number, downtimeLimit: number): void {
    this.windowStart = now;
    this.windowBytes = streamBytes;
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
    this.recent.push(this.bandwidth);
    if (this.recent.length > RECENT_WINDOWS) this.recent.shift();
    this.lowBandwidth = Math.min(...this.recent);
    this.mbps = (bytes * 8) / (elapsed / 1000) / 1e6;
    if (bytes > 10000 && this.bandwidth > 0) {
      this.expectedDowntime = Math.round(this.remaining / this.bandwidth);
    }
    this.windowStart = now;
    this.windowBytes = streamBytes;
    return true;
  }

  /** The final figures: total time and the average throughput of the whole stream. */
  finish(end: number, streamBytes: number): void {
    this.totalTime = Math.round(end - this.startTime);
    this.mbps = this.totalTime > 0 ? (streamBytes * 8) / this.totalTime / 1000 : 0;
    this.remaining = 0;
  }
}
