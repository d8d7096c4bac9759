/**
 * The migration trace (`x-trace-migration`, `x-query-migration-trace`):
 * what one side of a migration looked like over time, for `ferry report`.
 *
 * While tracing is on, each migration on this VM (outgoing or incoming)
 * is recorded from its start (or from the moment tracing was switched on)
 * to its end: query-migrate every `interval` ms, with the forecast's ETA on
 * the source; status changes, passes, throttle steps, the guest's stop and
 * resume as events; on the destination, the postcopy page faults resolved
 * in each interval with their latency percentiles. A long trace is thinned
 * out (every other sample dropped, the interval doubled) so that it stays
 * under MAX_SAMPLES.
 */
import type {
  MigrationInfo,
  MigrationStatus,
  MigrationTrace,
  MigrationTraceEvent,
  MigrationTraceSide,
  PageFaultWindow,
  SwitchoverDecision,
  MigrationForecast,
  MigrationCapabilityStatus,
  MigrationParameters,
} from '../../generated/qapi-types.js';

export const MAX_SAMPLES = 4096;
export const DEFAULT_INTERVAL_MS = 100;
const ENDED: readonly MigrationStatus[] = ['completed', 'failed', 'cancelled'];

/** What a recorder reads from its side. */
export interface TraceSource {
  side: MigrationTraceSide;
  info(): MigrationInfo;
  /** the forecast's expected ms to completion (source) */
  eta?(): number | undefined;
  /** the switchover decisions so far (source) */
  decisions?(): SwitchoverDecision[];
  /** faults resolved so far and the latest latencies in µs, oldest first (destination) */
  faults?(): { faults: number; latenciesUs: Float64Array };
  ramSize: number;
  capabilities: MigrationCapabilityStatus[];
  parameters: MigrationParameters;
  forecast?: MigrationForecast;
}

/** One trace being recorded (or done). */
export class TraceRecorder {
  readonly trace: MigrationTrace;
  private readonly t0: number;
  private timer: NodeJS.Timeout | null = null;
  private lastThrottle = 0;
  private lastFaults = 0;

  constructor(
    private readonly src: TraceSource,
    interval: number,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.t0 = now();
    this.trace = {
      side: src.side,
      start: Date.now(),
      interval,
      'ram-size': src.ramSize,
      capabilities: src.capabilities,
      parameters: src.parameters,
      samples: [],
      events: [],
      decisions: [],
      faults: [],
      complete: false,
    };
    if (src.forecast) this.trace.forecast = src.forecast;
    this.lastFaults = src.faults?.().faults ?? 0;
    this.sample();
    this.schedule();
  }

  get done(): boolean {
    return this.trace.complete;
  }

  private ms(): number {
    return Math.round(this.now() - this.t0);
  }

  private schedule(): void {
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.trace.complete) return;
      this.sample();
      this.schedule();
    }, this.trace.interval);
    this.timer.unref?.();
  }

  /** Record an event now. */
  event(kind: MigrationTraceEvent['kind'], more: Partial<MigrationTraceEvent> = {}): void {
    if (this.trace.complete) return;
    this.trace.events.push({ time: this.ms(), kind, ...more });
  }

  /** The status changed: recorded, with a sample; an end status ends the trace. */
  status(s: MigrationStatus): void {
    if (this.trace.complete) return;
    this.event('status', { status: s });
    this.sample();
    if (ENDED.includes(s)) this.finish();
  }

  /** A new pass (the dirty-sync count went up). */
  pass(n: number): void {
    this.event('pass', { pass: n });
    this.checkThrottle(this.src.info());
  }

  /** Take a sample now. */
  sample(): void {
    if (this.trace.complete) return;
    const info = this.src.info();
    const s: MigrationTrace['samples'][number] = { time: this.ms(), info };
    const eta = this.src.eta?.();
    if (eta !== undefined && Number.isFinite(eta)) s.eta = Math.round(eta);
    this.trace.samples.push(s);
    this.checkThrottle(info);
    this.sampleFaults();
    if (this.trace.samples.length > MAX_SAMPLES) this.thin();
  }

  private checkThrottle(info: MigrationInfo): void {
    const pct = info['cpu-throttle-percentage'] ?? 0;
    if (pct !== this.lastThrottle && (info.status === 'active' || pct === 0)) {
      this.lastThrottle = pct;
      this.event('throttle', { throttle: pct });
    }
  }

  private sampleFaults(): void {
    const f = this.src.faults?.();
    if (!f) return;
    const n = f.faults - this.lastFaults;
    if (n <= 0) return;
    this.lastFaults = f.faults;
    const lat = Float64Array.from(f.latenciesUs.subarray(Math.max(0, f.latenciesUs.length - n))).sort();
    const pct = (q: number): number => (lat.length === 0 ? 0 : lat[Math.min(lat.length - 1, Math.max(0, Math.ceil(q * lat.length) - 1))]!);
    const w: PageFaultWindow = { time: this.ms(), faults: n, 'p50-us': round2(pct(0.5)), 'p99-us': round2(pct(0.99)), 'max-us': round2(pct(1)) };
    this.trace.faults.push(w);
  }

  private thin(): void {
    this.trace.samples = this.trace.samples.filter((_, i) => i % 2 === 0);
    this.trace.interval *= 2;
  }

  /** The migration ended (or tracing was stopped): the last figures, the decisions. */
  finish(): void {
    if (this.trace.complete) return;
    this.sampleFaults();
    this.trace.decisions = this.src.decisions?.() ?? [];
    this.trace.complete = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  /** The trace as it stands (decisions up to now while it runs). */
  snapshot(): MigrationTrace {
    if (!this.trace.complete) return { ...this.trace, decisions: this.src.decisions?.() ?? [] };
    return this.trace;
  }
}

function round2(v: number): number {
  return Math.round(v * 100) / 100;
}
