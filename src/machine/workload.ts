/**
 * Guest workload inner loops and PRNGs, shared by the vCPU workers, the fill
 * helpers and bench/dirty-log.ts (so the benchmark measures exactly the code
 * the guest runs). Everything here is allocation-free in the hot paths.
 *
 * Physical page p lives in RAM block p >>> BLOCK_PAGE_BITS at local page
 * p & BLOCK_PAGE_MASK (blocks are 2 GiB except the last).
 */
import { BLOCK_PAGE_BITS, BLOCK_PAGE_MASK } from './layout.js';

/** splitmix32-style finaliser: a good 32-bit mix. */
export function mix32(x: number): number {
  x = (x + 0x9e3779b9) | 0;
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
  return (x ^ (x >>> 16)) >>> 0;
}

/** Initial xorshift128 state for (seed, stream); never all zero. */
export function seedXorshift(seed: number, stream: number): [number, number, number, number] {
  const a = mix32(seed ^ mix32(stream * 0x632be5ab + 1));
  const b = mix32(a ^ 0x1b873593);
  const c = mix32(b ^ (stream + 0x27d4eb2f));
  let d = mix32(c ^ seed);
  if ((a | b | c | d) === 0) d = 1;
  return [a, b, c, d];
}

/**
 * xorshift128 as an object, for the generators that are not hot loops (the
 * text pool, the disk workload's steps). The vCPU and fill loops keep the
 * same steps inline in local variables.
 */
export class Xorshift128 {
  constructor(
    public s0: number,
    public s1: number,
    public s2: number,
    public s3: number,
  ) {}

  /** For (seed, stream), as seedXorshift. */
  static seeded(seed: number, stream: number): Xorshift128 {
    const [a, b, c, d] = seedXorshift(seed, stream);
    return new Xorshift128(a | 0, b | 0, c | 0, d | 0);
  }

  copy(): Xorshift128 {
    return new Xorshift128(this.s0, this.s1, this.s2, this.s3);
  }

  next(): number {
    const t = this.s0 ^ (this.s0 << 11);
    this.s0 = this.s1;
    this.s1 = this.s2;
    this.s2 = this.s3;
    this.s3 = this.s3 ^ (this.s3 >>> 19) ^ t ^ (t >>> 8);
    return this.s3 >>> 0;
  }
}

/** The salt of vCPU `vcpu`'s stress pattern: byte j of step s is (s + salt + j) & 255. */
export function stressSalt(vcpu: number): number {
  return mix32(vcpu + 0x5bd1e995) & 255;
}

/**
 * Stress loop: each step picks a random page of [stripeStart, stripeStart +
 * stripePages) and a random offset, and writes `write` bytes there:
 * byte j = (step + salt + j) & 255 — a pure function of (vcpu, step) plus the
 * PRNG stream. With `log` on, marks the page in the dirty bitmap.
 *
 * With `read` on, every step first draws two more numbers (a page of the
 * stripe and an offset in it), reads that byte and folds it into `sum`:
 * sum = (sum * 31 + byte) >>> 0. Without `read` the PRNG stream is exactly
 * the one of a plain stress loop.
 *
 * Demand paging: run(n, present) checks the present bit (Atomics.load) of
 * every page a step touches before the step; on a missing page it returns
 * early, leaving the state (PRNG, steps, sum) as it was before that step,
 * with the page in faultBlock/faultPage (block-local page index).
 */
export class StressLoop {
  s0 = 0;
  s1 = 0;
  s2 = 0;
  s3 = 1;
  steps = 0;
  /** read=on checksum (uint32) */
  sum = 0;
  /** block and block-local page of the last fault (valid after run() returned < n) */
  faultBlock = -1;
  faultPage = -1;
  readonly span: number;
  constructor(
    readonly bytes: readonly Uint8Array[],
    readonly dirty: readonly Int32Array[],
    readonly stripeStart: number,
    readonly stripePages: number,
    readonly write: number,
    readonly salt: number,
    readonly log: boolean,
    readonly read = false,
  ) {
    if (stripePages < 1) throw new Error('StressLoop: empty stripe');
    if (!(write >= 1 && write <= 4096)) throw new Error('StressLoop: write must be 1..4096');
    this.span = 4096 - write + 1;
  }

  setRng(s: ArrayLike<number>): void {
    this.s0 = s[0]! | 0;
    this.s1 = s[1]! | 0;
    this.s2 = s[2]! | 0;
    this.s3 = s[3]! | 0;
  }

  /**
   * Runs n steps; returns the number done (n unless a page was missing).
   * `present` (one bitmap per block) turns on the demand checks.
   */
  run(n: number, present: readonly Int32Array[] | null = null): number {
    if (present !== null) return this.runDemand(n, present);
    let s0 = this.s0;
    let s1 = this.s1;
    let s2 = this.s2;
    let s3 = this.s3;
    let st = this.steps;
    let sum = this.sum;
    const bytesA = this.bytes;
    const dirtyA = this.dirty;
    const base = this.stripeStart;
    const np = this.stripePages;
    const span = this.span;
    const w = this.write;
    const salt = this.salt;
    const log = this.log;
    const rd = this.read;
    for (let i = 0; i < n; i++) {
      let t = s0 ^ (s0 << 11);
      s0 = s1;
      s1 = s2;
      s2 = s3;
      s3 = s3 ^ (s3 >>> 19) ^ t ^ (t >>> 8);
      const p = base + ((s3 >>> 1) % np);
      t = s0 ^ (s0 << 11);
      s0 = s1;
      s1 = s2;
      s2 = s3;
      s3 = s3 ^ (s3 >>> 19) ^ t ^ (t >>> 8);
      const off = (s3 >>> 1) % span;
      if (rd) {
        t = s0 ^ (s0 << 11);
        s0 = s1;
        s1 = s2;
        s2 = s3;
        s3 = s3 ^ (s3 >>> 19) ^ t ^ (t >>> 8);
        const q = base + ((s3 >>> 1) % np);
        t = s0 ^ (s0 << 11);
        s0 = s1;
        s1 = s2;
        s2 = s3;
        s3 = s3 ^ (s3 >>> 19) ^ t ^ (t >>> 8);
        const roff = (s3 >>> 1) & 4095;
        sum = (Math.imul(sum, 31) + bytesA[q >>> BLOCK_PAGE_BITS]![((q & BLOCK_PAGE_MASK) << 12) + roff]!) >>> 0;
      }
      const b = p >>> BLOCK_PAGE_BITS;
      const lp = p & BLOCK_PAGE_MASK;
      const bytes = bytesA[b]!;
      const o = (lp << 12) + off;
      const v = (st + salt) & 255;
      for (let j = 0; j < w; j++) bytes[o + j] = v + j;
      if (log) {
        const d = dirtyA[b]!;
        const wi = lp >>> 5;
        const bit = 1 << (lp & 31);
        if ((d[wi]! & bit) === 0) Atomics.or(d, wi, bit);
      }
      st++;
    }
    this.s0 = s0;
    this.s1 = s1;
    this.s2 = s2;
    this.s3 = s3;
    this.steps = st;
    this.sum = sum;
    return n;
  }

  /** run() with present-bit checks: the next state is computed in temporaries and committed after the step. */
  private runDemand(n: number, present: readonly Int32Array[]): number {
    let s0 = this.s0;
    let s1 = this.s1;
    let s2 = this.s2;
    let s3 = this.s3;
    let st = this.steps;
    let sum = this.sum;
    const bytesA = this.bytes;
    const dirtyA = this.dirty;
    const base = this.stripeStart;
    const np = this.stripePages;
    const span = this.span;
    const w = this.write;
    const salt = this.salt;
    const log = this.log;
    const rd = this.read;
    let i = 0;
    for (; i < n; i++) {
      let a0 = s0;
      let a1 = s1;
      let a2 = s2;
      let a3 = s3;
      let t = a0 ^ (a0 << 11);
      a0 = a1;
      a1 = a2;
      a2 = a3;
      a3 = a3 ^ (a3 >>> 19) ^ t ^ (t >>> 8);
      const p = base + ((a3 >>> 1) % np);
      t = a0 ^ (a0 << 11);
      a0 = a1;
      a1 = a2;
      a2 = a3;
      a3 = a3 ^ (a3 >>> 19) ^ t ^ (t >>> 8);
      const off = (a3 >>> 1) % span;
      const b = p >>> BLOCK_PAGE_BITS;
      const lp = p & BLOCK_PAGE_MASK;
      let nsum = sum;
      if (rd) {
        t = a0 ^ (a0 << 11);
        a0 = a1;
        a1 = a2;
        a2 = a3;
        a3 = a3 ^ (a3 >>> 19) ^ t ^ (t >>> 8);
        const q = base + ((a3 >>> 1) % np);
        t = a0 ^ (a0 << 11);
        a0 = a1;
        a1 = a2;
        a2 = a3;
        a3 = a3 ^ (a3 >>> 19) ^ t ^ (t >>> 8);
        const roff = (a3 >>> 1) & 4095;
        const qb = q >>> BLOCK_PAGE_BITS;
        const qlp = q & BLOCK_PAGE_MASK;
        if ((Atomics.load(present[qb]!, qlp >>> 5) & (1 << (qlp & 31))) === 0) {
          this.faultBlock = qb;
          this.faultPage = qlp;
          break;
        }
        nsum = (Math.imul(sum, 31) + bytesA[qb]![(qlp << 12) + roff]!) >>> 0;
      }
      if ((Atomics.load(present[b]!, lp >>> 5) & (1 << (lp & 31))) === 0) {
        this.faultBlock = b;
        this.faultPage = lp;
        break;
      }
      const bytes = bytesA[b]!;
      const o = (lp << 12) + off;
      const v = (st + salt) & 255;
      for (let j = 0; j < w; j++) bytes[o + j] = v + j;
      if (log) {
        const d = dirtyA[b]!;
        const wi = lp >>> 5;
        const bit = 1 << (lp & 31);
        if ((d[wi]! & bit) === 0) Atomics.or(d, wi, bit);
      }
      st++;
      sum = nsum;
      s0 = a0;
      s1 = a1;
      s2 = a2;
      s3 = a3;
    }
    this.s0 = s0;
    this.s1 = s1;
    this.s2 = s2;
    this.s3 = s3;
    this.steps = st;
    this.sum = sum;
    return i;
  }
}

/**
 * Sweep loop: sets the first byte of page `pos` to (round + 1) & 255, then
 * moves to the next page of [start, end), wrapping to the next round.
 * run(n, present) stops before a missing page (see StressLoop).
 */
export class SweepLoop {
  pos: number;
  round = 0;
  steps = 0;
  faultBlock = -1;
  faultPage = -1;
  constructor(
    readonly bytes: readonly Uint8Array[],
    readonly dirty: readonly Int32Array[],
    readonly start: number,
    readonly end: number,
    readonly log: boolean,
  ) {
    if (end <= start) throw new Error('SweepLoop: empty range');
    this.pos = start;
  }

  /** Runs n steps; returns the number done (n unless a page was missing). */
  run(n: number, present: readonly Int32Array[] | null = null): number {
    let pos = this.pos;
    let round = this.round;
    let st = this.steps;
    const end = this.end;
    const start = this.start;
    const bytesA = this.bytes;
    const dirtyA = this.dirty;
    const log = this.log;
    let v = (round + 1) & 255;
    let i = 0;
    for (; i < n; i++) {
      const b = pos >>> BLOCK_PAGE_BITS;
      const lp = pos & BLOCK_PAGE_MASK;
      if (present !== null && (Atomics.load(present[b]!, lp >>> 5) & (1 << (lp & 31))) === 0) {
        this.faultBlock = b;
        this.faultPage = lp;
        break;
      }
      bytesA[b]![lp << 12] = v;
      if (log) {
        const d = dirtyA[b]!;
        const wi = lp >>> 5;
        const bit = 1 << (lp & 31);
        if ((d[wi]! & bit) === 0) Atomics.or(d, wi, bit);
      }
      st++;
      if (++pos >= end) {
        pos = start;
        round++;
        v = (round + 1) & 255;
      }
    }
    this.pos = pos;
    this.round = round;
    this.steps = st;
    return i;
  }
}

/* ---------------------------------------------------------------------- */
/* Boot fill. Chunks of FILL_CHUNK bytes of physical memory are filled     */
/* independently, seeded by (seed, chunk index), so the result does not     */
/* depend on how many helpers do the work.                                  */

export const FILL_CHUNK = 1 << 20;

/** Fills `len` bytes (multiple of 4) at `off` of `bytes` with xorshift128 words. */
export function fillRandom(bytes: Uint8Array, off: number, len: number, seed: number, chunkIndex: number): void {
  const words = new Int32Array(bytes.buffer, bytes.byteOffset + off, len >>> 2);
  const s = seedXorshift(seed ^ 0x52414e44, chunkIndex);
  let s0 = s[0] | 0;
  let s1 = s[1] | 0;
  let s2 = s[2] | 0;
  let s3 = s[3] | 0;
  const n = words.length;
  for (let i = 0; i < n; i++) {
    const t = s0 ^ (s0 << 11);
    s0 = s1;
    s1 = s2;
    s2 = s3;
    s3 = s3 ^ (s3 >>> 19) ^ t ^ (t >>> 8);
    words[i] = s3;
  }
}

const WORDS = (
  'the of and to in is was that for on with as by at from his her they this which ' +
  'migration memory page guest host virtual machine device state stream block dirty ' +
  'bitmap socket channel buffer section record vector clock timer serial console ' +
  'round sweep stress worker thread control pause resume throttle bandwidth downtime ' +
  'setup active completed failed cancel postcopy precopy multifd compress zero ' +
  'kernel driver network storage system process signal number value offset length ' +
  'river mountain forest village winter summer morning evening garden window ' +
  'quick brown fox jumps over lazy dog while reading old letters under lamp light'
).split(' ');

/** Deterministic pool of text pages (poolPages × 4 KiB) for seed. */
export function makeTextPool(seed: number, poolPages = 256): Uint8Array {
  const pool = new Uint8Array(poolPages * 4096);
  const enc = WORDS.map((w) => Buffer.from(w, 'latin1'));
  const rng = Xorshift128.seeded(seed ^ 0x54455854, 0x7e57);
  const next = (): number => rng.next();
  let o = 0;
  let col = 0;
  while (o < pool.length) {
    const w = enc[next() % enc.length]!;
    for (let i = 0; i < w.length && o < pool.length; i++) pool[o++] = w[i]!;
    col += w.length + 1;
    if (o >= pool.length) break;
    if (col > 60 + (next() & 15)) {
      pool[o++] = 10; // newline
      col = 0;
    } else {
      pool[o++] = 32;
    }
  }
  return pool;
}

/** Fills whole pages of `bytes` [off, off+len) with pages picked from `pool`. */
export function fillText(
  bytes: Uint8Array,
  off: number,
  len: number,
  pool: Uint8Array,
  seed: number,
  chunkIndex: number,
): void {
  const poolPages = pool.length >>> 12;
  const s = seedXorshift(seed ^ 0x54455854, chunkIndex + 1);
  let s0 = s[0] | 0;
  let s1 = s[1] | 0;
  let s2 = s[2] | 0;
  let s3 = s[3] | 0;
  for (let p = 0; p < len; p += 4096) {
    const t = s0 ^ (s0 << 11);
    s0 = s1;
    s1 = s2;
    s2 = s3;
    s3 = s3 ^ (s3 >>> 19) ^ t ^ (t >>> 8);
    const k = (s3 >>> 1) % poolPages;
    bytes.set(pool.subarray(k << 12, (k << 12) + 4096), off + p);
  }
}
