/**
 * The guest's disk workload (`-disk-workload`): writes to one drive at a
 * set rate, fixed by its seed. It runs on the main thread, where the
 * drives' images live, paced by the virtual clock, and pauses and resumes
 * with the vCPUs (Machine's stop/start; a step in flight finishes first, so
 * a pause leaves no write half done).
 *
 * Step s (from 0), over the working set [start, start + wss) of 512-byte
 * sectors, with an xorshift128 stream seeded by seedXorshift(seed, stream
 * DISK_STREAM):
 *   1. draw w: the write goes to sector (w mod (wss - write) / 512 + 1 slots);
 *   2. with read on, draw r: read sector r mod (wss / 512) of the working
 *      set and fold its 512 bytes into the checksum, sum = sum * 31 + byte
 *      (uint32), as the RAM stress workload folds its reads;
 *   3. write `write` bytes: little-endian 32-bit word k is
 *      mix32(key(seed, s) + k), a pure function of seed and step.
 * A step that fails (an I/O error) changes nothing and stops the workload.
 * The whole state (configuration, PRNG, steps, checksum) migrates in the
 * ferry-disk-workload device (device-state.ts), so a destination goes on
 * with step `steps` exactly where the source stopped.
 */
import { Xorshift128, mix32 } from './workload.js';
import { isNoSpace, type Drive } from './drives.js';

export const SECTOR = 512;
/** The PRNG stream of the disk workload (the vCPUs use their index). */
const DISK_STREAM = 0xd15c;
/** At most this much virtual time of steps is made up at once after a stall. */
const MAX_BURST_NS = 50e6;
const MAX_WRITE = 1 << 20;

/** `-disk-workload`, as parsed (machine/config.ts). Sizes in bytes. */
export interface DiskWorkloadConfig {
  /** The drive's block backend name (query-block's device). */
  drive: string;
  /** Bytes written per second of virtual time; 0 = as fast as the drive goes. Default 1 MiB. */
  rate?: number;
  /** Start of the working set. Default 0. */
  start?: number;
  /** Bytes of the working set. Default: the rest of the drive. */
  wss?: number;
  /** Bytes per step, a multiple of 512 up to 1 MiB. Default 4 KiB. */
  write?: number;
  seed?: number;
  /** Stop after this many steps. */
  steps?: number;
  /** Read one sector per step into the checksum. */
  read?: boolean;
}

export interface ResolvedDiskWorkload {
  drive: string;
  rate: number;
  start: number;
  wss: number;
  write: number;
  seed: number;
  /** -1: no limit */
  steps: number;
  read: boolean;
}

/** A -disk-workload this machine cannot run (the CLI names the option). */
export class DiskWorkloadError extends Error {
  override name = 'DiskWorkloadError';
}

/** Defaults filled in and checked against the drive; throws DiskWorkloadError. */
export function resolveDiskWorkload(c: DiskWorkloadConfig, drive: Drive | undefined, driveNames: readonly string[]): ResolvedDiskWorkload {
  const fail = (m: string) => new DiskWorkloadError(m);
  if (drive === undefined) {
    throw fail(`drive '${c.drive}' not found (drives: ${driveNames.length ? driveNames.join(', ') : 'none'})`);
  }
  if (drive.readOnly) throw fail(`drive '${c.drive}' is read-only`);
  const int = (v: number, what: string) => {
    if (!Number.isSafeInteger(v) || v < 0) throw fail(`${what} ${v} is not a non-negative integer`);
    return v;
  };
  const write = int(c.write ?? 4096, 'write');
  if (write === 0 || write % SECTOR !== 0 || write > MAX_WRITE) throw fail(`write ${write} must be a multiple of 512 from 512 to 1M`);
  const start = int(c.start ?? 0, 'start');
  if (start % SECTOR !== 0) throw fail(`start ${start} is not a multiple of 512`);
  if (start >= drive.size) throw fail(`start ${start} is beyond the drive's ${drive.size} bytes`);
  const wss = int(c.wss ?? drive.size - start, 'wss');
  if (wss % SECTOR !== 0) throw fail(`wss ${wss} is not a multiple of 512`);
  if (wss < write) throw fail(`wss ${wss} is smaller than write ${write}`);
  if (start + wss > drive.size) throw fail(`start ${start} + wss ${wss} is beyond the drive's ${drive.size} bytes`);
  if (wss / SECTOR > 2 ** 32) throw fail(`wss ${wss} is larger than 2T`);
  const seed = int(c.seed ?? 0, 'seed');
  if (seed > 0xffffffff) throw fail(`seed ${seed} is larger than 4294967295`);
  const steps = c.steps === undefined ? -1 : int(c.steps, 'steps');
  return { drive: c.drive, rate: int(c.rate ?? 1 << 20, 'rate'), start, wss, write, seed, steps, read: c.read ?? false };
}

/** The 32-bit key of step `s`: every word written by the step derives from it. */
function stepKey(seed: number, s: number): number {
  return mix32(seed ^ mix32((s >>> 0) ^ mix32(Math.floor(s / 4294967296) + 0x2545f491)));
}

/** Fill `buf` (length a multiple of 4) with step `s`'s content. */
export function fillStep(buf: Uint8Array, seed: number, s: number): void {
  const key = stepKey(seed, s);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  for (let k = 0, o = 0; o < buf.length; k++, o += 4) dv.setUint32(o, mix32((key + k) | 0), true);
}

/** Counters of the disk workload (x-query-disk-workload). */
export interface DiskWorkloadInfo {
  drive: string;
  steps: number;
  bytesWritten: number;
  sum: number;
  /** Writing now (the guest runs and the step limit is not reached). */
  running: boolean;
  /** The step limit was reached. */
  done: boolean;
  /** Why the workload stopped early (an I/O error), if it did. */
  error?: string;
}

export interface DiskWorkloadHost {
  vclockNs(): number;
  /** A step failed; the workload has stopped. */
  failed(e: Error): void;
}

const MAGIC = 0x4644574c; // "FDWL"
/** f64 fields after the name: rate start wss write seed steps-limit read s0 s1 s2 s3 steps sum */
const NFIELDS = 13;

export class DiskWorkload {
  /** The PRNG that picks each step's sectors. */
  private rng: Xorshift128;
  private _steps = 0;
  private _sum = 0;
  private _error: string | null = null;
  private running = false;
  private pump: Promise<void> | null = null;
  private wake: (() => void) | null = null;
  private sleepTimer: NodeJS.Timeout | null = null;
  private baseNs = 0;
  private baseSteps = 0;
  private readonly wbuf: Uint8Array;
  private readonly rbuf = new Uint8Array(SECTOR);
  /** write positions: sectors of the working set where a write fits */
  private readonly slots: number;
  private readonly stepsPerNs: number;

  constructor(
    readonly cfg: ResolvedDiskWorkload,
    private readonly drive: Drive,
    private readonly host: DiskWorkloadHost,
  ) {
    this.rng = Xorshift128.seeded(cfg.seed, DISK_STREAM);
    this.wbuf = new Uint8Array(cfg.write);
    this.slots = (cfg.wss - cfg.write) / SECTOR + 1;
    this.stepsPerNs = cfg.rate / cfg.write / 1e9;
  }

  get steps(): number {
    return this._steps;
  }

  get sum(): number {
    return this._sum;
  }

  get done(): boolean {
    return this.cfg.steps >= 0 && this._steps >= this.cfg.steps;
  }

  info(): DiskWorkloadInfo {
    const i: DiskWorkloadInfo = {
      drive: this.cfg.drive,
      steps: this._steps,
      bytesWritten: this._steps * this.cfg.write,
      sum: this._sum,
      running: this.running && !this.done,
      done: this.done,
    };
    if (this._error !== null) i.error = this._error;
    return i;
  }

  /** Start writing (the guest runs). The pace counts from now. No-op when running or stopped by an error. */
  resume(): void {
    if (this.running || this._error !== null) return;
    this.running = true;
    this.baseNs = this.host.vclockNs();
    this.baseSteps = this._steps;
    this.pump = this.loop();
  }

  /** Stop writing; resolves once the step in flight (if any) has finished. */
  async pause(): Promise<void> {
    this.running = false;
    if (this.sleepTimer !== null) clearTimeout(this.sleepTimer);
    this.sleepTimer = null;
    this.wake?.();
    const p = this.pump;
    this.pump = null;
    if (p !== null) await p;
  }

  private async loop(): Promise<void> {
    while (this.running && !this.done) {
      const allowed = this.allowedSteps();
      if (allowed < 1) {
        await this.sleep(Math.min(50, Math.max(1, (1 - allowed) / this.stepsPerNs / 1e6)));
        continue;
      }
      for (let i = 0; i < allowed && this.running && !this.done; i++) {
        try {
          await this.step();
        } catch (e) {
          const err = e instanceof Error ? e : new Error(String(e));
          this._error = `step ${this._steps}: ${err.message}`;
          this.drive.ioStatus = isNoSpace(e) ? 'nospace' : 'failed';
          this.running = false;
          this.host.failed(err);
          return;
        }
      }
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      this.wake = () => {
        this.wake = null;
        resolve();
      };
      this.sleepTimer = setTimeout(() => {
        this.sleepTimer = null;
        this.wake?.();
      }, ms);
    });
  }

  /** Steps due by the virtual clock (Infinity without a rate); a backlog beyond MAX_BURST_NS is dropped. */
  private allowedSteps(): number {
    if (this.cfg.rate === 0) return Infinity;
    const now = this.host.vclockNs();
    const burst = Math.max(1, Math.floor(MAX_BURST_NS * this.stepsPerNs));
    const allowed = Math.floor((now - this.baseNs) * this.stepsPerNs) - (this._steps - this.baseSteps);
    if (allowed <= burst) return allowed;
    this.baseNs = now;
    this.baseSteps = this._steps + burst;
    return burst;
  }

  /** One step; the state changes only once its read and write are done. */
  private async step(): Promise<void> {
    const rng = this.rng.copy();
    const next = (): number => rng.next();
    const { start, write, read, seed } = this.cfg;
    const wpos = start + (next() % this.slots) * SECTOR;
    let sum = this._sum;
    if (read) {
      const rpos = start + (next() % (this.cfg.wss / SECTOR)) * SECTOR;
      const rb = this.rbuf;
      await this.drive.read(rpos, rb);
      for (let i = 0; i < SECTOR; i++) sum = (Math.imul(sum, 31) + rb[i]!) >>> 0;
    }
    fillStep(this.wbuf, seed, this._steps);
    await this.drive.write(wpos, this.wbuf);
    this.rng = rng;
    this._sum = sum;
    this._steps++;
  }

  /** Run `n` steps now, unpaced (tests; only while paused). */
  async runSteps(n: number): Promise<void> {
    if (this.running) throw new Error('disk workload: runSteps while running');
    for (let i = 0; i < n && !this.done; i++) await this.step();
  }

  /* ------------------------------------------------------- migration */

  /** The ferry-disk-workload payload (only while paused). */
  save(): Uint8Array {
    if (this.running) throw new Error('ferry-disk-workload: cannot save while the workload runs');
    const name = Buffer.from(this.cfg.drive, 'utf8');
    const out = new Uint8Array(8 + name.length + NFIELDS * 8);
    const dv = new DataView(out.buffer);
    dv.setUint32(0, MAGIC);
    dv.setUint32(4, name.length);
    out.set(name, 8);
    const c = this.cfg;
    const f = [c.rate, c.start, c.wss, c.write, c.seed, c.steps, c.read ? 1 : 0, this.rng.s0 >>> 0, this.rng.s1 >>> 0, this.rng.s2 >>> 0, this.rng.s3 >>> 0, this._steps, this._sum];
    f.forEach((v, i) => dv.setFloat64(8 + name.length + i * 8, v));
    return out;
  }

  /**
   * A workload from a ferry-disk-workload payload, checked against this
   * machine's drives; throws Error with a clear message on a bad payload.
   */
  static load(data: Uint8Array, drives: (name: string) => Drive | undefined, driveNames: readonly string[], host: DiskWorkloadHost): DiskWorkload {
    const bad = (m: string) => new Error(`ferry-disk-workload: ${m}`);
    if (data.length < 8) throw bad(`payload too short (${data.length} bytes)`);
    const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
    if (dv.getUint32(0) !== MAGIC) throw bad('bad magic');
    const n = dv.getUint32(4);
    if (data.length !== 8 + n + NFIELDS * 8) throw bad(`payload is ${data.length} bytes, expected ${8 + n + NFIELDS * 8}`);
    const name = Buffer.from(data.subarray(8, 8 + n)).toString('utf8');
    const f: number[] = [];
    for (let i = 0; i < NFIELDS; i++) f.push(dv.getFloat64(8 + n + i * 8));
    const [rate, start, wss, write, seed, stepsLimit, read, s0, s1, s2, s3, steps, sum] = f as [number, number, number, number, number, number, number, number, number, number, number, number, number];
    const u32 = (v: number, what: string) => {
      if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw bad(`${what} ${v} out of range`);
      return v;
    };
    if (read !== 0 && read !== 1) throw bad(`read flag ${read} is not 0 or 1`);
    if (!(stepsLimit === -1 || (Number.isSafeInteger(stepsLimit) && stepsLimit >= 0))) throw bad(`step limit ${stepsLimit} out of range`);
    let cfg: ResolvedDiskWorkload;
    // `drives` may answer with another drive than the one named (Drives.guestDrive): the workload takes its name
    const drive = drives(name);
    try {
      cfg = resolveDiskWorkload(
        { drive: drive?.name ?? name, rate, start, wss, write, seed, read: read === 1, ...(stepsLimit >= 0 ? { steps: stepsLimit } : {}) },
        drive,
        driveNames,
      );
    } catch (e) {
      throw bad((e as Error).message);
    }
    if (!Number.isSafeInteger(steps) || steps < 0 || (stepsLimit >= 0 && steps > stepsLimit)) throw bad(`steps ${steps} out of range`);
    const st = [u32(s0, 'PRNG state'), u32(s1, 'PRNG state'), u32(s2, 'PRNG state'), u32(s3, 'PRNG state')];
    if (st.every((v) => v === 0)) throw bad('PRNG state is all zero');
    const w = new DiskWorkload(cfg, drive!, host);
    w.rng = new Xorshift128(st[0]! | 0, st[1]! | 0, st[2]! | 0, st[3]! | 0);
    w._steps = steps;
    w._sum = u32(sum, 'checksum');
    return w;
  }
}
