/**
 * When to stop the guest: the switchover budget of a precopy migration.
 *
 * QEMU switches over once what remains fits in downtime-limit at the
 * measured bandwidth. Ferry's downtime also pays for things that estimate
 * does not see: the vCPUs' acknowledgement of the stop, the device
 * sections, the bytes still queued in the writer and the socket, and the
 * destination's last load and its SHUT on the return path. The old rule
 * reserved half of the limit for them, blindly, and so needed many more
 * passes than QEMU on a guest that keeps dirtying memory.
 *
 * Now the reserve is measured. Each completed switchover reports its
 * downtime and the bytes it had to move after the stop; what the downtime
 * took beyond moving those bytes at the bandwidth that was measured before
 * the stop is the overhead, kept as a moving average per VM process (so it
 * follows the machine and the transport). The reserve is that overhead
 * with a margin, and never more than half of the limit (the old rule is
 * the upper bound); the transfer itself is planned at 90% of the lowest
 * bandwidth of the last two 100 ms windows. Until a switchover has been
 * measured, a default overhead stands in, measured on our 2-core hosts (stop 1-8 ms, devices
 * and EOF under 1 ms, SHUT 3-10 ms on a loaded machine).
 */

/** The overhead assumed before any switchover of this process was measured. */
export const DEFAULT_OVERHEAD_MS = 20;
/** Reserve = overhead × this. */
const MARGIN = 1.5;
/** The reserve never exceeds this share of downtime-limit. */
const MAX_RESERVE_SHARE = 0.5;
/**
 * The share of the measured bandwidth the final transfer is planned with:
 * when the guest stops with hundreds of MB left (a fast link), a few percent
 * less throughput after the stop than before it is tens of ms of downtime.
 */
const BANDWIDTH_SHARE = 0.9;
/** Weight of the newest measurement in the moving average. */
const ALPHA = 0.5;

export class SwitchoverBudget {
  private overhead = DEFAULT_OVERHEAD_MS;
  /** Switchovers measured so far. */
  measured = 0;

  /** The overhead (ms) the next switchover is expected to add to its transfer. */
  get overheadMs(): number {
    return this.overhead;
  }

  /** Milliseconds of downtime-limit kept for the overhead. */
  reserveMs(limitMs: number): number {
    return Math.min(this.overhead * MARGIN, limitMs * MAX_RESERVE_SHARE);
  }

  /**
   * Bytes that may still have to move when the guest stops, so that the
   * downtime stays within `limitMs` at `bandwidth` bytes per ms.
   */
  thresholdBytes(bandwidth: number, limitMs: number): number {
    return bandwidth * BANDWIDTH_SHARE * Math.max(0, limitMs - this.reserveMs(limitMs));
  }

  /**
   * The downtime (ms) a stop with `bytes` left would cost by this plan:
   * the transfer at the planned share of `bandwidth` plus the reserve
   * (Infinity before the bandwidth is known). Below `limitMs` exactly when
   * `bytes` is below thresholdBytes().
   */
  expectedDowntimeMs(bytes: number, bandwidth: number, limitMs: number): number {
    if (!(bandwidth > 0)) return bytes === 0 ? this.reserveMs(limitMs) : Infinity;
    return bytes / (bandwidth * BANDWIDTH_SHARE) + this.reserveMs(limitMs);
  }

  /** The bandwidth (bytes per ms) the final transfer is planned with. */
  plannedBandwidth(bandwidth: number): number {
    return bandwidth * BANDWIDTH_SHARE;
  }

  /**
   * A switchover ended: it took `downtimeMs`, moving `bytes` after the stop,
   * with `bandwidth` (bytes per ms) measured before it. Ignored when the
   * bandwidth is unknown.
   */
  record(downtimeMs: number, bytes: number, bandwidth: number): void {
    if (!(bandwidth > 0) || !Number.isFinite(downtimeMs)) return;
    const overhead = Math.max(0, downtimeMs - bytes / bandwidth);
    // starts from the default, so one lucky switchover cannot halve the reserve
    this.overhead = ALPHA * overhead + (1 - ALPHA) * this.overhead;
    this.measured++;
  }
}
