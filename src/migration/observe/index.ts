/**
 * Watching a VM's migrations: the dirty-rate meter (dirty-rate.ts), the
 * forecast (forecast.ts) fed with what the meter and the running migration
 * measured, the switchover decisions the session recorded (decisions.ts)
 * and the trace (trace.ts). One per VM process; the QMP handlers and the
 * metrics endpoint ask it.
 */
import type { MigrationForecast, MigrationStatus, MigrationTrace, SwitchoverDecision, TimeUnit } from '../../generated/qapi-types.js';
import { countDirty } from '../../machine/index.js';
import { TARGET_PAGE_SIZE, type RamBlock } from '../../machine/types.js';
import type { MigrationDestination } from '../core/destination.js';
import type { MigrationOptions } from '../core/options.js';
import type { MigrationSource } from '../core/source.js';
import { DEFAULT_OVERHEAD_MS } from '../core/switchover.js';
import type { RamSaveSection } from '../ram/section.js';
import { DirtyRateMeter, type DirtyRateOptions } from './dirty-rate.js';
import { curveBand, fitCurve, outcome, summarize, timeBand, weighOptions, type DirtyCurve, type ForecastModel } from './forecast.js';
import { DEFAULT_INTERVAL_MS, TraceRecorder } from './trace.js';

export { DirtyRateError } from './dirty-rate.js';
export { DecisionLog } from './decisions.js';

/** A forecast cannot be made (a GenericError on QMP). */
export class ForecastError extends Error {}
/** Bad tracing request (a GenericError on QMP). */
export class TraceError extends Error {}

const PAGE_WIRE_SHARE = (TARGET_PAGE_SIZE + 8) / TARGET_PAGE_SIZE;
const ACTIVE: readonly MigrationStatus[] = ['setup', 'active', 'postcopy-active'];

export interface ObserverDeps {
  source: MigrationSource;
  destination: MigrationDestination;
  options: MigrationOptions;
  ram: () => readonly RamBlock[];
  /** demand-paging faults of the vCPUs (destination, postcopy) */
  faultStats?: () => { faults: number; latenciesUs: Float64Array };
  now?: () => number;
}

export class MigrationObserver {
  readonly meter: DirtyRateMeter;
  private tracing = false;
  private interval = DEFAULT_INTERVAL_MS;
  private sourceTrace: TraceRecorder | null = null;
  private destTrace: TraceRecorder | null = null;
  private lastTrace: TraceRecorder | null = null;
  /** The stream throughput (bytes per ms) the last completed outgoing migration of this VM reached. */
  private lastBandwidth = 0;
  private lastSetupMs = 0;
  private readonly now: () => number;

  constructor(private readonly d: ObserverDeps) {
    this.now = d.now ?? (() => performance.now());
    this.meter = new DirtyRateMeter(d.ram, this.now);
    d.source.on('status', (s) => this.onSourceStatus(s));
    d.source.on('pass', (n) => this.sourceTrace?.pass(n));
    d.destination.on('status', (s) => this.onDestinationStatus(s));
  }

  // ---------------------------------------------------------- dirty rate

  calcDirtyRate(o: DirtyRateOptions): void {
    this.meter.start(o, this.d.source.isActive());
  }

  queryDirtyRate(unit?: TimeUnit) {
    return this.meter.info(unit);
  }

  // ----------------------------------------------------------- decisions

  decisions(): SwitchoverDecision[] {
    return this.d.source.current?.decisions.list() ?? [];
  }

  // ------------------------------------------------------------- tracing

  setTracing(enable: boolean, interval = DEFAULT_INTERVAL_MS): void {
    if (!(Number.isInteger(interval) && interval >= 20 && interval <= 10000)) {
      throw new TraceError("Parameter 'interval' expects a number of milliseconds from 20 to 10000");
    }
    this.tracing = enable;
    this.interval = interval;
    if (!enable) {
      this.sourceTrace?.finish();
      this.destTrace?.finish();
      return;
    }
    // a migration already running is traced from now on
    if (this.d.source.isActive() && !this.sourceTrace) this.sourceTrace = this.startSourceTrace();
    if (ACTIVE.includes(this.d.destination.status) && !this.destTrace) this.destTrace = this.startDestTrace();
  }

  trace(): MigrationTrace {
    const t = this.lastTrace;
    if (!t) throw new TraceError('No migration was traced: enable tracing with x-trace-migration before the migration starts');
    return t.snapshot();
  }

  /** The trace being recorded on this side, if any (metrics). */
  get tracingOn(): boolean {
    return this.tracing;
  }

  private startSourceTrace(): TraceRecorder {
    const { options, source } = this.d;
    let forecast: MigrationForecast | undefined;
    try {
      if (this.meter.last) forecast = this.forecast(undefined, true);
    } catch {
      forecast = undefined;
    }
    const rec = new TraceRecorder(
      {
        side: 'source',
        info: () => source.info(),
        eta: () => this.eta(),
        decisions: () => this.decisions(),
        ramSize: this.ramBytes(),
        capabilities: options.capabilityList(),
        parameters: options.parameters(),
        forecast,
      },
      this.interval,
      this.now,
    );
    this.lastTrace = rec;
    return rec;
  }

  private startDestTrace(): TraceRecorder {
    const { options, destination } = this.d;
    const rec = new TraceRecorder(
      {
        side: 'destination',
        info: () => destination.info(),
        faults: this.d.faultStats,
        ramSize: this.ramBytes(),
        capabilities: options.capabilityList(),
        parameters: options.parameters(),
      },
      this.interval,
      this.now,
    );
    this.lastTrace = rec;
    return rec;
  }

  /** The guest stopped or runs again on this VM (vm.ts reports its run state changes). */
  runState(now: string, old: string): void {
    const rec = this.sourceTrace ?? this.destTrace;
    if (!rec) return;
    if (old === 'running') rec.event('stop');
    if (now === 'running') rec.event('resume');
  }

  private onSourceStatus(s: MigrationStatus): void {
    if (s === 'setup') {
      // a dirty-bitmap measurement ends before the migration takes the dirty log
      this.meter.migrationStarting();
      if (this.tracing) {
        this.sourceTrace?.finish();
        this.sourceTrace = this.startSourceTrace();
      }
    }
    this.sourceTrace?.status(s);
    if (s === 'completed') {
      const st = this.d.source.current?.stats;
      if (st && st.totalTime > 0) {
        // the average stream rate while the guest ran
        const ram = this.d.source.info().ram;
        if (ram) this.lastBandwidth = ram.transferred / Math.max(1, st.totalTime - st.setupTime - st.downtime);
        this.lastSetupMs = st.setupTime;
      }
    }
    if (this.sourceTrace?.done) this.sourceTrace = null;
  }

  private onDestinationStatus(s: MigrationStatus): void {
    if (this.tracing && !this.destTrace && ACTIVE.includes(s)) this.destTrace = this.startDestTrace();
    this.destTrace?.status(s);
    if (this.destTrace?.done) this.destTrace = null;
  }

  private ramBytes(): number {
    return this.d.ram().reduce((s, b) => s + b.size, 0);
  }

  // ------------------------------------------------------------ forecast

  /** The ETA (ms) of the running outgoing migration, as set up; undefined when none runs. */
  eta(): number | undefined {
    try {
      const m = this.model();
      if (!m.running) return undefined;
      const o = outcome(m.model);
      return o.expected.converges ? Math.max(0, o.expected.totalMs - (m.model.from?.elapsedMs ?? 0)) : undefined;
    } catch {
      return undefined;
    }
  }

  /** x-query-migrate-forecast */
  forecast(bandwidthArg?: number, beforeStart = false): MigrationForecast {
    const { model, running, status, bandwidthSource, rateSource, elapsed } = this.model(bandwidthArg, beforeStart);
    const { options } = this.d;
    const asSetUp = outcome(model);
    const opts = weighOptions(
      model,
      {
        capabilities: { autoConverge: options.capability('auto-converge'), xbzrle: options.capability('xbzrle'), postcopy: options.capability('postcopy-ram') },
        throttleInitial: options.get('cpu-throttle-initial'),
        throttleIncrement: options.get('cpu-throttle-increment'),
        xbzrleRatio: this.meter.last?.xbzrleRatio,
        xbzrleCacheSize: options.xbzrleCacheSize(),
      },
      asSetUp,
    );
    const f: MigrationForecast = {
      status,
      'dirty-rate': Math.round(model.curve.rate * 1000),
      'zero-share': Math.round(model.zeroShare * 1000) / 1000,
      'dirty-rate-source': rateSource,
      bandwidth: Math.round(model.bandwidth * 1000),
      'bandwidth-source': bandwidthSource,
      'ram-size': model.ramBytes,
      'downtime-limit': model.limitMs,
      converges: asSetUp.expected.converges,
      options: opts,
      summary: summarize(asSetUp, opts, running),
    };
    if (Number.isFinite(model.curve.workingSet)) f['working-set'] = Math.round(model.curve.workingSet);
    const tt = timeBand(asSetUp);
    if (tt) f['total-time'] = tt;
    const dt = timeBand(asSetUp, (r) => r.downtimeMs);
    if (dt) f.downtime = dt;
    if (running) {
      f.elapsed = Math.round(elapsed);
      if (tt) {
        const left = (v: number) => Math.max(0, Math.round(v - elapsed));
        f.eta = { low: left(tt.low), expected: left(tt.expected) };
        if (tt.high !== undefined) f.eta.high = left(tt.high);
      }
    }
    return f;
  }

  /** Everything the model needs, from the meter, the parameters and the running migration. */
  private model(bandwidthArg?: number, beforeStart = false) {
    const { source, options } = this.d;
    const session = source.current;
    const status = beforeStart ? 'none' : source.status;
    const running = !beforeStart && source.isActive() && session !== null;
    const ramBytes = this.ramBytes();
    const meas = this.meter.last;
    const limitMs = options.get('downtime-limit');
    const budget = source.switchover;

    // the dirty curve: the last measurement's readings, and while a migration
    // runs, the guest's dirty log since the last sync (read, not taken: the
    // distinct pages dirtied since then, a reading for free)
    const ram = running ? session.section<RamSaveSection>('ram') : undefined;
    const readings = [...(meas?.readings ?? [])];
    if (ram && session) {
      const st = session.stats;
      const now = this.now() - st.startTime;
      const since = ram.sender.bulkStage ? now - st.setupTime : now - (session.decisions.last?.time ?? st.setupTime);
      if (since >= 200) {
        let pages = 0;
        for (const b of this.d.ram()) pages += countDirty(b);
        readings.push({ ms: since, bytes: pages * TARGET_PAGE_SIZE });
      }
    }
    let curve: DirtyCurve | undefined;
    let curveLow: DirtyCurve | undefined;
    let curveHigh: DirtyCurve | undefined;
    let rateSource = 'calc-dirty-rate';
    if (readings.length > 0) {
      curve = fitCurve(readings, ramBytes);
      if (meas) [curveLow, curveHigh] = curveBand(curve, readings, ramBytes, meas.samples);
      else {
        // one exact reading, but of a guest that may change its pace
        curveLow = { rate: curve.rate * 0.7, workingSet: curve.workingSet };
        curveHigh = { rate: curve.rate * 1.3, workingSet: curve.workingSet };
      }
      if (readings.length > (meas?.readings.length ?? 0)) rateSource = meas ? 'both' : 'migration';
    }
    if (!curve || !curveLow || !curveHigh) {
      if (!running) throw new ForecastError('No dirty rate was measured yet: run calc-dirty-rate first');
      rateSource = 'migration';
      // nothing known yet (the migration just began): no dirtying assumed, and no upper bound
      curve = { rate: 0, workingSet: Infinity };
      curveLow = curve;
      curveHigh = { rate: Infinity, workingSet: Infinity };
    }

    // the bandwidth
    let bandwidth: number;
    let bandwidthSource: string;
    const maxBw = options.get('max-bandwidth');
    let elapsed = 0;
    let from: ForecastModel['from'];
    let spread = 0.05;
    if (running) {
      const st = session.stats;
      elapsed = this.now() - st.startTime;
      const w = session.writer;
      const sending = elapsed - st.setupTime;
      bandwidth = w && sending > 200 ? w.bytesWritten / sending : st.bandwidth > 0 ? st.bandwidth : maxBw > 0 ? maxBw / 1000 : this.lastBandwidth;
      bandwidthSource = 'measured';
      if (!(bandwidth > 0)) {
        bandwidth = maxBw > 0 ? maxBw / 1000 : 0;
        bandwidthSource = 'max-bandwidth';
      }
      if (!(bandwidth > 0)) throw new ForecastError('The bandwidth is not measured yet: ask again once the migration has sent for a moment');
      const zero = meas?.zeroShare ?? 0;
      if (ram) {
        const bulk = ram.sender.bulkStage;
        const left = ram.sender.remainingBytes;
        const last = session.decisions.last;
        from = {
          elapsedMs: elapsed,
          remaining: bulk ? left * ((1 - zero) * PAGE_WIRE_SHARE + (zero * 9) / TARGET_PAGE_SIZE) : left * PAGE_WIRE_SHARE,
          bulk,
          sinceSyncMs: bulk ? Math.max(0, elapsed - st.setupTime) : Math.max(0, elapsed - (last?.time ?? st.setupTime)),
          throttle: ram.autoConverge.throttle,
        };
      }
      if (status === 'postcopy-active' || session.inPostcopy) {
        // everything left streams once: no more dirtying on this side
        curve = curveLow = curveHigh = { rate: 0, workingSet: Infinity };
      }
    } else if (bandwidthArg !== undefined) {
      if (!(bandwidthArg > 0)) throw new ForecastError("Parameter 'bandwidth' expects a positive number of bytes per second");
      bandwidth = bandwidthArg / 1000;
      bandwidthSource = 'argument';
    } else if (maxBw > 0) {
      bandwidth = maxBw / 1000;
      bandwidthSource = 'max-bandwidth';
    } else if (this.lastBandwidth > 0) {
      bandwidth = this.lastBandwidth;
      bandwidthSource = 'last-migration';
      spread = 0.15;
    } else {
      throw new ForecastError('The bandwidth is unknown: set max-bandwidth or give the bandwidth argument');
    }
    if (bandwidthSource === 'measured' && maxBw === 0) spread = 0.15;

    const model: ForecastModel = {
      ramBytes,
      zeroShare: meas?.zeroShare ?? 0,
      curve,
      curveLow,
      curveHigh,
      bandwidth,
      bandwidthSpread: spread,
      stopBandwidth: Math.max(bandwidth, this.lastBandwidth),
      limited: maxBw > 0 && bandwidth <= (maxBw / 1000) * 1.1,
      limitMs,
      reserveMs: budget.reserveMs(limitMs),
      plannedShare: budget.plannedBandwidth(1),
      overheadMs: budget.measured > 0 ? budget.overheadMs : DEFAULT_OVERHEAD_MS,
      setupMs: this.lastSetupMs > 0 ? this.lastSetupMs : 15,
      autoConverge: options.capability('auto-converge')
        ? { initial: options.get('cpu-throttle-initial'), increment: options.get('cpu-throttle-increment') }
        : undefined,
      xbzrle:
        options.capability('xbzrle') && meas?.xbzrleRatio !== undefined
          ? { ratio: meas.xbzrleRatio, hit: Math.min(1, options.xbzrleCacheSize() / Math.max(1, Number.isFinite(curve.workingSet) ? curve.workingSet : ramBytes)) }
          : undefined,
      postcopy: running && (session.postcopyRequested || session.inPostcopy) ? true : undefined,
      from,
    };
    return { model, running, status, bandwidthSource, rateSource, elapsed };
  }
}
