/**
 * XBZRLE codec throughput on one core: xbzrleEncode and xbzrleDecode over
 * 64 MiB of 4 KiB pages, for sparse diffs (one 8-byte write per page) and
 * dense diffs (64 runs of 16 changed bytes per page), against a per-page
 * memcpy (Uint8Array.set) of the same pages in the same run. GB/s are page
 * bytes processed per second (1e9); each figure is the median of --runs
 * repetitions (default 5). Writes bench/results/xbzrle.json.
 * Run: node dist/bench/xbzrle.js [--runs N] [--mib N]
 */
import { xbzrleDecode, xbzrleEncode } from '../src/migration/codec/xbzrle-codec.js';
import { median, writeResult } from './lib/common.js';

const P = 4096;
const arg = (name: string, dflt: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const RUNS = Math.max(3, arg('runs', 5));
const SIZE = arg('mib', 64) * 1024 * 1024;
const PAGES = SIZE / P;

let seed = 0x9e3779b9;
function rnd(): number {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return seed >>> 0;
}

function randomBytes(n: number): Uint8Array {
  const b = new Uint8Array(n);
  const v = new Uint32Array(b.buffer);
  for (let i = 0; i < v.length; i++) v[i] = rnd();
  return b;
}

/** Change `runs` runs of `len` bytes per page (every byte of a run really differs). */
function mutate(old: Uint8Array, runs: number, len: number): Uint8Array {
  const n = old.slice();
  for (let p = 0; p < PAGES; p++) {
    const base = p * P;
    const stride = Math.floor(P / runs);
    for (let r = 0; r < runs; r++) {
      const at = base + r * stride + (rnd() % (stride - len));
      for (let k = 0; k < len; k++) n[at + k] = (old[at + k]! + 1 + (rnd() % 255)) & 0xff;
    }
  }
  return n;
}

interface CaseResult {
  name: string;
  changedBytesPerPage: number;
  encodedBytesPerPage: number;
  overflows: number;
  encodeGBps: number;
  /** null when there is nothing to decode (unchanged pages) */
  decodeGBps: number | null;
  memcpyGBps: number;
  encodeVsMemcpy: number;
  decodeVsMemcpy: number | null;
  runsMs: { encode: number[]; decode: number[]; memcpy: number[] };
}

function runCase(name: string, oldAll: Uint8Array, newAll: Uint8Array, changed: number): CaseResult {
  const enc = new Uint8Array(PAGES * P);
  const lens = new Int32Array(PAGES);
  const work = new Uint8Array(SIZE);
  const dst = new Uint8Array(SIZE);
  const times = { encode: [] as number[], decode: [] as number[], memcpy: [] as number[] };
  let total = 0;
  let overflows = 0;
  // warm-up (JIT, page faults of the output buffers), not timed
  for (let p = 0; p < PAGES; p++) {
    const o = p * P;
    xbzrleEncode(oldAll.subarray(o, o + P), newAll.subarray(o, o + P), enc, o, P);
  }
  dst.set(newAll);
  for (let r = 0; r < RUNS; r++) {
    // memcpy of the same pages, page by page
    let t0 = performance.now();
    for (let p = 0; p < PAGES; p++) dst.set(newAll.subarray(p * P, p * P + P), p * P);
    times.memcpy.push(performance.now() - t0);

    t0 = performance.now();
    total = 0;
    overflows = 0;
    for (let p = 0; p < PAGES; p++) {
      const o = p * P;
      const n = xbzrleEncode(oldAll.subarray(o, o + P), newAll.subarray(o, o + P), enc, o, P);
      lens[p] = n;
      if (n < 0) overflows++;
      else total += n;
    }
    times.encode.push(performance.now() - t0);

    work.set(oldAll);
    t0 = performance.now();
    for (let p = 0; p < PAGES; p++) {
      const n = lens[p]!;
      if (n > 0 && xbzrleDecode(enc, p * P, n, work.subarray(p * P, p * P + P)) < 0) throw new Error('decode failed');
    }
    times.decode.push(performance.now() - t0);
    if (overflows === 0 && Buffer.compare(Buffer.from(work.buffer), Buffer.from(newAll.buffer)) !== 0) {
      throw new Error('round trip mismatch');
    }
  }
  const gbps = (ms: number[]) => SIZE / 1e9 / (median(ms) / 1000);
  const e = gbps(times.encode);
  const d = gbps(times.decode);
  const m = gbps(times.memcpy);
  const round = (v: number, k = 3) => Math.round(v * 10 ** k) / 10 ** k;
  return {
    name,
    changedBytesPerPage: changed,
    encodedBytesPerPage: round(total / Math.max(1, PAGES - overflows), 1),
    overflows,
    encodeGBps: round(e),
    decodeGBps: total > 0 ? round(d) : null,
    memcpyGBps: round(m),
    encodeVsMemcpy: round(e / m),
    decodeVsMemcpy: total > 0 ? round(d / m) : null,
    runsMs: {
      encode: times.encode.map((v) => round(v, 1)),
      decode: times.decode.map((v) => round(v, 1)),
      memcpy: times.memcpy.map((v) => round(v, 1)),
    },
  };
}

const old = randomBytes(SIZE);
const cases = [
  runCase('sparse (1 run of 8 bytes per page)', old, mutate(old, 1, 8), 8),
  runCase('dense (64 runs of 16 bytes per page)', old, mutate(old, 64, 16), 1024),
  runCase('unchanged pages', old, old.slice(), 0),
];
const result = {
  bench: 'xbzrle',
  date: new Date().toISOString(),
  node: process.version,
  cpu: (await import('node:os')).cpus()[0]?.model ?? 'unknown',
  bytes: SIZE,
  pageSize: P,
  runs: RUNS,
  statistic: 'median',
  cases,
};
for (const c of cases) {
  console.log(
    `${c.name.padEnd(40)} encode ${c.encodeGBps.toFixed(2)} GB/s  decode ${c.decodeGBps === null ? '-' : c.decodeGBps.toFixed(2)} GB/s  memcpy ${c.memcpyGBps.toFixed(2)} GB/s  (${c.encodedBytesPerPage} B/page, ${c.overflows} overflows)`,
  );
}
console.log(`wrote ${writeResult('xbzrle', result)}`);
