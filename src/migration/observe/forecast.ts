/**
 * The convergence forecast (`x-query-migrate-forecast`): a model of
 * Ferry's precopy loop run forward in time.
 *
 * The guest's dirtying is the curve f(t): the bytes of distinct pages it
 * dirties in t ms. For random writes into a working set W at a rate ρ it
 * rises as ρt and levels off at W; we fit f(t) = W·(1 − e^(−ρt/W)) to the
 * dirty set's growth that calc-dirty-rate read over its period (or, during
 * a migration without one, to the rate the migration's own syncs found).
 *
 * The loop is simulated as core/outgoing.ts runs it: setup; the bulk pass
 * (every page: the zero ones as small records); then the dirty set is sent
 * until what is left falls under the switchover threshold
 * (core/switchover.ts: the bandwidth's planned share times the limit less
 * the reserve), a sync adds what was dirtied since the last one, and this
 * repeats (near the threshold, every 5 ms slice) until the rest fits; then
 * the stop moves it unthrottled and pays the measured overhead.
 * auto-converge throttles the dirtying as QEMU's rule does (docs/spec/qmp.md
 * E.3), xbzrle shrinks the pages sent again by the ratio measured on the
 * sampled pages, and postcopy switches after the first pass.
 *
 * The band: the same loop with the dirty rate at the low and high ends of
 * its measurement's 90% interval (sampling error) and the bandwidth ±5%,
 * widened by a model margin that bench/forecast.ts calibrated
 * (docs/benchmarks.md, "Forecast").
 */
import type { ForecastBand, MigrationForecastOption } from '../../generated/qapi-types.js';
import { TARGET_PAGE_SIZE } from '../../machine/types.js';

/** Ferry's slice: the loop's decision points near the threshold are this far apart. */
const SLICE_MS = 5;
/**
 * With max-bandwidth set, the writer sends each 100 ms window's budget in a
 * burst and sleeps to the window's end (stream/writer.ts): the dirty log is
 * then read about once a window.
 */
const WINDOW_MS = 100;
/** Record header of a page (be64 address + flags) and a ZERO record's size. */
const PAGE_WIRE = TARGET_PAGE_SIZE + 8;
const ZERO_WIRE = 9;
/** QEMU's dirty-rate period for auto-converge. */
const PERIOD_MS = 1000;
/** Simulated time after which a migration counts as not converging. */
const HORIZON_MS = 3600_000;
const MAX_STEPS = 20000;
/** The band: relative and absolute model margins (calibrated by bench/forecast.ts). */
export const MODEL_MARGIN = 0.1;
export const MODEL_MARGIN_MS = 150;
/** Relative uncertainty of a bandwidth that is a limit or was measured over a run. */
const BANDWIDTH_SPREAD = 0.05;
/** z for a two-sided 90% interval. */
const Z90 = 1.645;

/** The guest's dirtying: f(t) = W·(1 − e^(−ρt/W)). */
export interface DirtyCurve {
  /** bytes per ms over short periods */
  rate: number;
  /** the working set in bytes (Infinity: no levelling off seen) */
  workingSet: number;
}

export function dirtyBytes(c: DirtyCurve, ms: number): number {
  if (!(ms > 0) || !(c.rate > 0)) return 0;
  if (!Number.isFinite(c.workingSet)) return c.rate * ms;
  return c.workingSet * (1 - Math.exp((-c.rate * ms) / c.workingSet));
}

/**
 * Fit the curve to readings of the dirty set (bytes after ms) by least
 * squares on the bytes (so the later, larger readings, which rest on more
 * changed samples, weigh most): for each candidate working set (from the
 * largest reading up to all of RAM, and none) the best rate, and the best
 * pair of all.
 */
export function fitCurve(readings: readonly { ms: number; bytes: number }[], ramBytes: number): DirtyCurve {
  const pts = readings.filter((r) => r.ms > 0).sort((a, b) => a.ms - b.ms);
  if (pts.length === 0 || pts.every((p) => p.bytes === 0)) return { rate: 0, workingSet: Infinity };
  const last = pts[pts.length - 1]!;
  const err = (c: DirtyCurve): number => {
    let e = 0;
    for (const p of pts) {
      const d = dirtyBytes(c, p.ms) - p.bytes;
      e += d * d;
    }
    return e;
  };
  // the rate's search range: what the readings imply, widened
  const implied = pts.filter((p) => p.bytes > 0).map((p) => p.bytes / p.ms);
  const rLo = Math.min(...implied) / 2;
  const rHi = Math.max(...implied) * 8;
  const bestRate = (w: number): DirtyCurve => {
    let lo = Math.log(rLo);
    let hi = Math.log(rHi);
    for (let i = 0; i < 60; i++) {
      const a = lo + (hi - lo) / 3;
      const b = hi - (hi - lo) / 3;
      if (err({ rate: Math.exp(a), workingSet: w }) <= err({ rate: Math.exp(b), workingSet: w })) hi = b;
      else lo = a;
    }
    return { rate: Math.exp((lo + hi) / 2), workingSet: w };
  };
  let best = bestRate(Infinity);
  let bestErr = err(best);
  for (let w = Math.max(last.bytes, 1); w <= ramBytes * 1.0001; w *= 1.05) {
    const c = bestRate(w);
    const e = err(c);
    if (e < bestErr * (1 - 1e-9)) {
      best = c;
      bestErr = e;
    }
  }
  return best;
}

export interface SimOptions {
  ramBytes: number;
  zeroShare: number;
  curve: DirtyCurve;
  /** bytes per ms while the guest runs */
  bandwidth: number;
  /** bytes per ms after the stop (the writer runs unlimited then) */
  stopBandwidth: number;
  /** the bandwidth is max-bandwidth's limit (100 ms windows), not the engine's pace */
  limited?: boolean;
  limitMs: number;
  reserveMs: number;
  /** share of the bandwidth the switchover plans with */
  plannedShare: number;
  overheadMs: number;
  setupMs: number;
  autoConverge?: { initial: number; increment: number; throttle?: number };
  /** xbzrle: bytes per page sent again, as a share of a page, and the share of pages the cache holds */
  xbzrle?: { ratio: number; hit: number };
  /** switch to postcopy after the bulk pass */
  postcopy?: boolean;
  /** continue a running migration: ms already spent, bytes left, and whether the bulk pass is on */
  from?: { elapsedMs: number; remaining: number; bulk: boolean; sinceSyncMs: number; throttle?: number };
}

export interface SimResult {
  converges: boolean;
  totalMs: number;
  downtimeMs: number;
  passes: number;
  throttle: number;
  /** postcopy: ms the guest runs on the destination while pages arrive */
  postcopyMs?: number;
}

/** Wire bytes of `bytes` of guest pages sent again. */
function resendWire(bytes: number, o: SimOptions): number {
  const pages = bytes / TARGET_PAGE_SIZE;
  if (!o.xbzrle) return pages * PAGE_WIRE;
  const { ratio, hit } = o.xbzrle;
  return pages * (hit * (ratio * TARGET_PAGE_SIZE + 11) + (1 - hit) * PAGE_WIRE);
}

/** Run the loop forward (see the file header). */
export function simulate(o: SimOptions): SimResult {
  const B = o.bandwidth;
  const threshold = B * o.plannedShare * Math.max(0, o.limitMs - o.reserveMs);
  const step = o.limited ? WINDOW_MS : SLICE_MS;
  let throttle = o.from?.throttle ?? o.autoConverge?.throttle ?? 0;
  // random writes never dirty more than all of RAM
  const curve: DirtyCurve = { rate: o.curve.rate, workingSet: Math.min(o.curve.workingSet, o.ramBytes) };
  const dirty = (ms: number) => dirtyBytes(curve, ms * (1 - throttle / 100));
  const wireOf = (bytes: number) => resendWire(bytes, o);
  const stop = (t: number, rest: number, passes: number): SimResult => {
    const down = rest / Math.max(o.stopBandwidth, B) + o.overheadMs;
    return { converges: true, totalMs: t + down, downtimeMs: down, passes, throttle };
  };
  if (!(B > 0)) return { converges: false, totalMs: Infinity, downtimeMs: Infinity, passes: 0, throttle };

  let t: number;
  let R: number; // wire bytes left in the migration bitmap
  let since: number; // ms since the last sync
  let passes = 1;
  if (!o.from || o.from.bulk) {
    const all = o.ramBytes * (1 - o.zeroShare) * (PAGE_WIRE / TARGET_PAGE_SIZE) + (o.ramBytes * o.zeroShare * ZERO_WIRE) / TARGET_PAGE_SIZE;
    const left = o.from ? Math.min(o.from.remaining, all) : all;
    t = o.from ? o.from.elapsedMs : o.setupMs;
    since = o.from ? o.from.sinceSyncMs : 0;
    const bulk = left / B;
    t += bulk;
    since += bulk;
    R = wireOf(dirty(since));
    since = 0;
    passes = 2;
  } else {
    t = o.from.elapsedMs;
    R = o.from.remaining;
    since = o.from.sinceSyncMs;
  }
  if (o.postcopy) {
    // the switch: the device state goes, the guest runs there, the rest follows
    const pc = R / B;
    return { converges: true, totalMs: t + o.overheadMs + pc, downtimeMs: o.overheadMs, passes, throttle, postcopyMs: pc };
  }
  // auto-converge periods
  let periodStart = t;
  let periodDirty = 0;
  let periodSent = 0;
  let high = 0;
  let rising = 0;
  let prevR = R;
  let lastSync = t - since;
  /** A dirty-log sync at `now`: what was dirtied since the last one joins the bitmap. */
  const sync = (now: number): void => {
    // pages still waiting in the bitmap are not new when dirtied again
    const fresh = wireOf(dirty(now - lastSync)) * Math.max(0, 1 - R / wireOf(curve.workingSet));
    R += fresh;
    periodDirty += fresh;
    lastSync = now;
    passes++;
    if (o.autoConverge && now - periodStart >= PERIOD_MS) {
      if (periodDirty > periodSent / 2 && ++high >= 2) {
        high = 0;
        throttle = Math.min(99, throttle === 0 ? o.autoConverge.initial : throttle + o.autoConverge.increment);
      }
      periodStart = now;
      periodDirty = 0;
      periodSent = 0;
    }
  };
  // the engine's own pace: how fast a window's budget goes out
  const burst = Math.max(o.stopBandwidth, B * 8);
  for (let step = 0; step < MAX_STEPS && t < HORIZON_MS; step++) {
    if (o.limited) {
      // one 100 ms window: the budget in a burst; a sync whenever the bitmap
      // falls under the threshold (and again after each crossing), then the
      // rest of the window asleep
      let budget = B * WINDOW_MS;
      let now = t;
      for (let k = 0; k < 64; k++) {
        if (R < threshold) {
          sync(now);
          if (R < threshold) return stop(now, R, passes);
        }
        if (budget <= 0) break;
        const x = Math.min(budget, R, R - threshold + TARGET_PAGE_SIZE);
        now += x / burst;
        R -= x;
        budget -= x;
        periodSent += x;
      }
      t = Math.max(now, t + WINDOW_MS);
    } else {
      if (R < threshold) {
        sync(t);
        if (R < threshold) return stop(t, R, passes);
      }
      // send until the estimate falls under the threshold
      const dt = Math.max(SLICE_MS, (R - threshold) / B + SLICE_MS / 2);
      const sent = Math.min(R, B * dt);
      t += dt;
      R -= sent;
      periodSent += sent;
    }
    // no progress for a long time and nothing left to change: it does not converge
    if (R >= prevR - 1) rising++;
    else rising = 0;
    prevR = R;
    if (rising > 400 && (!o.autoConverge || throttle >= 99)) break;
  }
  return { converges: false, totalMs: Infinity, downtimeMs: Infinity, passes, throttle };
}

/** The inputs of a forecast, with their uncertainty. */
export interface ForecastModel extends Omit<SimOptions, 'curve' | 'bandwidth'> {
  curve: DirtyCurve;
  /** the dirty curve's rate at the ends of its 90% interval */
  curveLow: DirtyCurve;
  curveHigh: DirtyCurve;
  bandwidth: number;
  bandwidthSpread?: number;
}

/** The curve's 90% interval from a sampling measurement of `samples` pages. */
export function curveBand(c: DirtyCurve, readings: readonly { ms: number; bytes: number }[], ramBytes: number, samples: number): [DirtyCurve, DirtyCurve] {
  const last = readings[readings.length - 1];
  if (!last || samples <= 0) return [c, c];
  const p = Math.min(1, last.bytes / ramBytes);
  // a binomial share; at least one page's worth of doubt
  const sd = Math.max(Math.sqrt((p * (1 - p)) / samples), 1 / samples);
  const rel = p > 0 ? (Z90 * sd) / p : 0;
  const k = Math.min(rel, 0.9);
  const scale = (f: number): DirtyCurve => ({ rate: c.rate * f, workingSet: Number.isFinite(c.workingSet) ? Math.min(ramBytes, c.workingSet * f) : c.workingSet });
  return [scale(1 - k), scale(1 + k)];
}

export function band(low: number, expected: number, high: number): ForecastBand {
  const b: ForecastBand = {
    low: Math.max(0, Math.round(low * (1 - MODEL_MARGIN) - MODEL_MARGIN_MS)),
    expected: Math.round(expected),
  };
  if (Number.isFinite(high)) b.high = Math.round(high * (1 + MODEL_MARGIN) + MODEL_MARGIN_MS);
  return b;
}

export interface Outcome {
  expected: SimResult;
  low: SimResult;
  high: SimResult;
}

/** The loop at the expected inputs and at the two ends of the band. */
export function outcome(m: ForecastModel, extra: Partial<SimOptions> = {}): Outcome {
  const spread = m.bandwidthSpread ?? BANDWIDTH_SPREAD;
  const base: SimOptions = { ...m, ...extra, curve: m.curve, bandwidth: extra.bandwidth ?? m.bandwidth };
  const B = base.bandwidth;
  return {
    expected: simulate(base),
    low: simulate({ ...base, curve: m.curveLow, bandwidth: B * (1 + spread) }),
    high: simulate({ ...base, curve: m.curveHigh, bandwidth: B * (1 - spread) }),
  };
}

export function timeBand(o: Outcome, pick: (r: SimResult) => number = (r) => r.totalMs): ForecastBand | undefined {
  if (!o.expected.converges) return undefined;
  return band(Math.min(pick(o.low), pick(o.expected)), pick(o.expected), Math.max(pick(o.high), pick(o.expected)));
}

/** The least bandwidth (bytes per ms) at which the migration converges (within 64× the given one). */
export function requiredBandwidth(m: ForecastModel): number | undefined {
  const ok = (b: number) => simulate({ ...m, curve: m.curveHigh, bandwidth: b, stopBandwidth: Math.max(m.stopBandwidth, b) }).converges;
  let hi = m.bandwidth;
  let n = 0;
  while (!ok(hi)) {
    hi *= 2;
    if (++n > 6) return undefined;
  }
  let lo = n === 0 ? hi / 64 : hi / 2;
  if (ok(lo)) return lo;
  for (let i = 0; i < 12; i++) {
    const mid = (lo + hi) / 2;
    if (ok(mid)) hi = mid;
    else lo = mid;
  }
  return hi;
}

export interface OptionsContext {
  capabilities: { autoConverge: boolean; xbzrle: boolean; postcopy: boolean };
  throttleInitial: number;
  throttleIncrement: number;
  xbzrleRatio?: number;
  xbzrleCacheSize: number;
}

function secs(ms: number): string {
  return ms >= 10000 ? `${(ms / 1000).toFixed(0)} s` : `${(ms / 1000).toFixed(1)} s`;
}

/** Every way weighed (as set up first), with what it costs. */
export function weighOptions(m: ForecastModel, ctx: OptionsContext, asSetUp: Outcome): MigrationForecastOption[] {
  const out: MigrationForecastOption[] = [];
  const opt = (method: MigrationForecastOption['method'], o: Outcome, cost: string, more: Partial<MigrationForecastOption> = {}) => {
    const e: MigrationForecastOption = { method, converges: o.expected.converges, cost, ...more };
    const tt = timeBand(o);
    if (tt) e['total-time'] = tt;
    const dt = timeBand(o, (r) => r.downtimeMs);
    if (dt) e.downtime = dt;
    out.push(e);
  };
  opt('as-set-up', asSetUp, asSetUp.expected.converges ? 'nothing beyond the settings made' : 'it would run until cancelled', {
    bandwidth: Math.round(m.bandwidth * 1000),
  });
  // a wider link
  const need = requiredBandwidth(m);
  if (need !== undefined) {
    const o = outcome(m, { bandwidth: Math.max(need, m.bandwidth), stopBandwidth: Math.max(m.stopBandwidth, need) });
    opt('wider-link', o, need <= m.bandwidth ? 'none: the link is wide enough' : `a link of at least ${(need / 1000).toFixed(1)} MB/s (now ${(m.bandwidth / 1000).toFixed(1)} MB/s)`, {
      bandwidth: Math.round(need * 1000),
    });
  } else {
    out.push({ method: 'wider-link', converges: false, cost: `more than 64 times the link (${((m.bandwidth * 64) / 1000).toFixed(0)} MB/s) would be needed` });
  }
  // auto-converge
  const ac = outcome(m, { autoConverge: { initial: ctx.throttleInitial, increment: ctx.throttleIncrement } });
  const thr = ac.expected.throttle;
  opt(
    'auto-converge',
    ac,
    ac.expected.converges
      ? thr > 0
        ? `the guest's vCPUs throttled up to ${thr}% (they run ${100 - thr}% of the time) until the switchover`
        : 'none: it converges before the throttle would start'
      : 'even a 99% throttle would not converge it',
    { 'throttle-percentage': thr },
  );
  // xbzrle
  if (ctx.xbzrleRatio !== undefined) {
    const ws = Number.isFinite(m.curve.workingSet) ? m.curve.workingSet : m.ramBytes;
    const cache = Math.max(ctx.xbzrleCacheSize, Math.min(m.ramBytes, 2 ** Math.ceil(Math.log2(Math.max(ws, TARGET_PAGE_SIZE)))));
    const hit = Math.min(1, cache / Math.max(ws, 1));
    const xo = outcome(m, { xbzrle: { ratio: ctx.xbzrleRatio, hit } });
    opt(
      'xbzrle',
      xo,
      `a ${(cache / (1 << 20)).toFixed(0)} MiB page cache on the source (xbzrle-cache-size) and the CPU to encode; pages sent again shrink to ${(ctx.xbzrleRatio * 100).toFixed(ctx.xbzrleRatio < 0.1 ? 1 : 0)}% of a page (measured)`,
      { 'cache-size': cache, 'xbzrle-ratio': Math.round(ctx.xbzrleRatio * 1000) / 1000 },
    );
  } else {
    out.push({ method: 'xbzrle', converges: false, cost: 'unknown: the delta size was not measured (calc-dirty-rate in page-sampling mode measures it)' });
  }
  // postcopy
  const pc = outcome(m, { postcopy: true });
  const pcMs = pc.expected.postcopyMs ?? 0;
  opt(
    'postcopy',
    pc,
    `the guest runs on the destination for about ${secs(pcMs)} while the rest arrives: each first touch of a missing page waits for it, and a failure in that time loses the guest`,
    { 'postcopy-time': Math.round(pcMs) },
  );
  return out;
}

/** The verdict in words. */
export function summarize(asSetUp: Outcome, options: readonly MigrationForecastOption[], running: boolean): string {
  if (asSetUp.expected.converges) {
    const tt = timeBand(asSetUp)!;
    return `converges as set up${running ? ', ends' : ''} in about ${secs(tt.expected)} (${secs(tt.low)}–${tt.high !== undefined ? secs(tt.high) : '?'}), ${asSetUp.expected.passes} passes`;
  }
  const helps = options.filter((o) => o.method !== 'as-set-up' && o.converges).map((o) => {
    const t = o['total-time'];
    return `${o.method}${t ? ` (~${secs(t.expected)})` : ''}`;
  });
  return `does not converge as set up: the guest dirties memory faster than the link drains it${helps.length ? `; it would converge with ${helps.join(', ')}` : ''}`;
}
