/**
 * `calc-dirty-rate` / `query-dirty-rate` (QEMU 5.2+): how fast the guest
 * dirties its memory, measured before a migration.
 *
 * page-sampling (the default): a random sample of pages (sample-pages per
 * GiB of RAM, spread over every block) is copied at the start; at readings
 * through the period (1/8, 1/4, 1/2 and all of it) the pages that differ
 * from their copy are counted. The share that changed, times RAM, is the
 * dirty set. The copies also tell the share of zero pages and the XBZRLE
 * delta size of the pages that changed (our own encoder), which the
 * forecast uses.
 *
 * dirty-bitmap: the guest's dirty log is cleared at the start and its set
 * bits counted at each reading (exact). It must not race a migration, which
 * takes the same log: it is refused while one runs, and a `migrate` during
 * the period ends it early, before the migration's first sync.
 *
 * dirty-ring does not exist here (QEMU needs KVM's dirty ring for it).
 *
 * The readings over the period are Ferry's addition: the dirty set's growth
 * (it levels off at the working set), which the forecast extrapolates.
 * Errors carry QEMU's texts.
 */
import type { DirtyRateInfo, DirtyRateMeasureMode, TimeUnit } from '../../generated/qapi-types.js';
import { countDirty, clearDirty } from '../../machine/index.js';
import { TARGET_PAGE_SIZE, type RamBlock } from '../../machine/types.js';
import { xbzrleEncode } from '../codec/xbzrle-codec.js';

export const MIN_CALC_TIME_MS = 50;
export const MAX_CALC_TIME_MS = 60000;
export const MIN_SAMPLE_PAGES = 128;
export const MAX_SAMPLE_PAGES = 16384;
export const DEFAULT_SAMPLE_PAGES = 512;
/** The fractions of the period at which the dirty set is read. */
const READINGS = [1 / 8, 1 / 4, 1 / 2, 1];
const GIB = 1 << 30;

/** A usage error with QEMU's text (a GenericError on QMP). */
export class DirtyRateError extends Error {}

/** The dirty set after `ms` milliseconds of the period. */
export interface DirtyReading {
  ms: number;
  bytes: number;
}

/** What the last measurement found, for the forecast. */
export interface DirtyMeasurement {
  mode: DirtyRateMeasureMode;
  /** The dirty set's growth over the period (bytes of RAM). */
  readings: DirtyReading[];
  /** Pages compared (page-sampling) or RAM pages (dirty-bitmap). */
  samples: number;
  /** Share of RAM in zero pages (of the sampled pages at the start). */
  zeroShare: number;
  /** XBZRLE bytes per changed page, as a share of a page (page-sampling; undefined when none changed). */
  xbzrleRatio?: number;
  ramBytes: number;
  /** performance.now() at the end. */
  endedAt: number;
}

interface Sample {
  block: number;
  page: number;
  copy: Uint8Array;
}

export interface DirtyRateOptions {
  calcTimeMs: number;
  samplePages?: number;
  mode?: DirtyRateMeasureMode;
}

export class DirtyRateMeter {
  private status: DirtyRateInfo['status'] = 'unstarted';
  private mode: DirtyRateMeasureMode = 'page-sampling';
  private samplePages = DEFAULT_SAMPLE_PAGES;
  private calcTimeMs = 0;
  private startTime = 0;
  private startedAt = 0;
  private samples: Sample[] = [];
  private readings: DirtyReading[] = [];
  private timers: NodeJS.Timeout[] = [];
  private zeroShare = 0;
  private rateMiBs: number | undefined;
  /** The last finished measurement. */
  last: DirtyMeasurement | undefined;

  constructor(
    private readonly ram: () => readonly RamBlock[],
    private readonly now: () => number = () => performance.now(),
    private readonly random: () => number = Math.random,
  ) {}

  get measuring(): boolean {
    return this.status === 'measuring';
  }

  /** calc-dirty-rate; `migrationActive`: an outgoing migration runs (dirty-bitmap is refused then). */
  start(o: DirtyRateOptions, migrationActive: boolean): void {
    if (this.status === 'measuring') throw new DirtyRateError('the dirty rate is already being measured.');
    if (!(o.calcTimeMs >= MIN_CALC_TIME_MS && o.calcTimeMs <= MAX_CALC_TIME_MS)) {
      throw new DirtyRateError(`Calculation time is out of range [${MIN_CALC_TIME_MS}ms, ${MAX_CALC_TIME_MS}ms].`);
    }
    const mode = o.mode ?? 'page-sampling';
    if (o.samplePages !== undefined && mode !== 'page-sampling') throw new DirtyRateError('sample-pages is used only in page-sampling mode');
    if (o.samplePages !== undefined && !(o.samplePages >= MIN_SAMPLE_PAGES && o.samplePages <= MAX_SAMPLE_PAGES)) {
      throw new DirtyRateError(`sample-pages is out of range[${MIN_SAMPLE_PAGES}, ${MAX_SAMPLE_PAGES}].`);
    }
    if (mode === 'dirty-ring') throw new DirtyRateError('mode dirty-ring is not enabled, use other method instead.');
    if (mode === 'dirty-bitmap' && migrationActive) {
      throw new DirtyRateError('mode dirty-bitmap is not enabled while a migration runs (it takes the same dirty log), use other method instead.');
    }
    this.mode = mode;
    this.samplePages = o.samplePages ?? DEFAULT_SAMPLE_PAGES;
    this.calcTimeMs = o.calcTimeMs;
    this.rateMiBs = undefined;
    this.readings = [];
    this.status = 'measuring';
    this.startTime = Number(process.hrtime.bigint() / 1_000_000_000n);
    const blocks = this.ram();
    if (mode === 'page-sampling') this.takeSamples(blocks);
    else {
      for (const b of blocks) clearDirty(b);
      this.zeroShare = this.sampleZeroShare(blocks, 1024);
    }
    this.startedAt = this.now();
    for (const f of READINGS) {
      const t = setTimeout(() => this.read(f === 1), Math.max(1, Math.round(o.calcTimeMs * f)));
      t.unref?.();
      this.timers.push(t);
    }
  }

  /** A migration is starting: a dirty-bitmap measurement ends now, before the migration takes the log. */
  migrationStarting(): void {
    if (this.status === 'measuring' && this.mode === 'dirty-bitmap') this.read(true);
  }

  /** query-dirty-rate */
  info(unit: TimeUnit = 'second'): DirtyRateInfo {
    const calc = unit === 'second' ? Math.floor(this.calcTimeMs / 1000) : this.calcTimeMs;
    const info: DirtyRateInfo = {
      status: this.status,
      'start-time': this.startTime,
      'calc-time': calc,
      'calc-time-unit': unit,
      'sample-pages': this.mode === 'page-sampling' ? this.samplePages : 0,
      mode: this.mode,
    };
    if (this.status === 'measured' && this.rateMiBs !== undefined) info['dirty-rate'] = this.rateMiBs;
    return info;
  }

  /** Stop timers (the VM quits). */
  close(): void {
    for (const t of this.timers) clearTimeout(t);
    this.timers = [];
  }

  private takeSamples(blocks: readonly RamBlock[]): void {
    const total = blocks.reduce((s, b) => s + b.size, 0);
    const samples: Sample[] = [];
    let zero = 0;
    for (let bi = 0; bi < blocks.length; bi++) {
      const b = blocks[bi]!;
      // sample-pages per GiB, at least one page per block
      const n = Math.min(b.pages, Math.max(1, Math.round((this.samplePages * b.size) / GIB)));
      const chosen = new Set<number>();
      while (chosen.size < n) chosen.add(Math.floor(this.random() * b.pages));
      for (const page of chosen) {
        const copy = b.bytes.slice(page * TARGET_PAGE_SIZE, (page + 1) * TARGET_PAGE_SIZE);
        if (isZero(copy)) zero++;
        samples.push({ block: bi, page, copy });
      }
    }
    this.samples = samples;
    this.zeroShare = samples.length > 0 ? zero / samples.length : 0;
    void total;
  }

  private sampleZeroShare(blocks: readonly RamBlock[], n: number): number {
    let zero = 0;
    let seen = 0;
    for (const b of blocks) {
      const k = Math.max(1, Math.round((n * b.size) / blocks.reduce((s, x) => s + x.size, 0)));
      for (let i = 0; i < k; i++) {
        const page = Math.floor(this.random() * b.pages);
        if (isZero(b.bytes.subarray(page * TARGET_PAGE_SIZE, (page + 1) * TARGET_PAGE_SIZE))) zero++;
        seen++;
      }
    }
    return seen > 0 ? zero / seen : 0;
  }

  private read(final: boolean): void {
    if (this.status !== 'measuring') return;
    const ms = Math.max(1, this.now() - this.startedAt);
    const blocks = this.ram();
    const ramBytes = blocks.reduce((s, b) => s + b.size, 0);
    let bytes: number;
    let xbzrleRatio: number | undefined;
    let samples: number;
    if (this.mode === 'page-sampling') {
      let changed = 0;
      let encoded = 0;
      const out = new Uint8Array(TARGET_PAGE_SIZE);
      for (const s of this.samples) {
        const b = blocks[s.block]!;
        const now = b.bytes.subarray(s.page * TARGET_PAGE_SIZE, (s.page + 1) * TARGET_PAGE_SIZE);
        if (Buffer.compare(now, s.copy) === 0) continue;
        changed++;
        if (final) {
          const n = xbzrleEncode(s.copy, now, out, 0, TARGET_PAGE_SIZE);
          encoded += n < 0 ? TARGET_PAGE_SIZE : n;
        }
      }
      samples = this.samples.length;
      bytes = samples > 0 ? (changed / samples) * ramBytes : 0;
      if (final && changed > 0) xbzrleRatio = encoded / changed / TARGET_PAGE_SIZE;
    } else {
      let pages = 0;
      for (const b of blocks) pages += countDirty(b);
      bytes = pages * TARGET_PAGE_SIZE;
      samples = ramBytes / TARGET_PAGE_SIZE;
    }
    this.readings.push({ ms, bytes });
    if (!final) return;
    this.close();
    this.calcTimeMs = Math.round(ms);
    this.rateMiBs = Math.round(bytes / (1 << 20) / (ms / 1000));
    this.status = 'measured';
    this.last = {
      mode: this.mode,
      readings: this.readings.slice(),
      samples,
      zeroShare: this.zeroShare,
      xbzrleRatio,
      ramBytes,
      endedAt: this.now(),
    };
    this.samples = [];
  }
}

function isZero(p: Uint8Array): boolean {
  for (let i = 0; i < p.length; i++) if (p[i] !== 0) return false;
  return true;
}
