/**
 * Throughput of RamSender.sendPages into a null sink (StreamWriter(null)),
 * on zero pages and on random pages, plus the zero-page check variants.
 * Run: node dist/bench/codec-ram.js
 */
import type { RamBlock } from '../src/machine/types.js';
import { xbzrleEncode } from '../src/migration/codec/xbzrle-codec.js';
import { RamSender } from '../src/migration/ram/sender.js';
import { StreamWriter } from '../src/migration/stream/writer.js';

const MiB = 1024 * 1024;

function makeBlock(name: string, size: number, random: boolean): RamBlock {
  const pages = size / 4096;
  const bytes = new Uint8Array(new SharedArrayBuffer(size));
  if (random) {
    let x = 12345;
    const v = new Int32Array(bytes.buffer);
    for (let i = 0; i < v.length; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      v[i] = x | 1;
    }
  }
  return { name, size, pages, bytes, dirty: new Int32Array(new SharedArrayBuffer(Math.ceil(pages / 32) * 4)), touched: new Uint32Array(Math.ceil(pages / 32)).fill(0xffffffff), present: new Int32Array(new SharedArrayBuffer(Math.ceil(pages / 32) * 4)).fill(-1) };
}

async function run(kind: 'zero' | 'random', size: number): Promise<number> {
  const block = makeBlock('pc.ram', size, kind === 'random');
  let best = 0;
  for (let rep = 0; rep < 5; rep++) {
    const s = new RamSender([block]);
    const w = new StreamWriter(null, { bufferSize: 4 * MiB });
    const t0 = performance.now();
    for (;;) {
      const r = s.sendPages(w, { maxMillis: 5 });
      await w.flush();
      if (r.done) break;
    }
    const dt = (performance.now() - t0) / 1000;
    best = Math.max(best, size / MiB / dt);
  }
  return best;
}

function zeroCheckBench(): Record<string, number> {
  const size = 64 * MiB;
  const bytes = new Uint8Array(new SharedArrayBuffer(size));
  const i32 = new Int32Array(bytes.buffer);
  const f64 = new Float64Array(bytes.buffer);
  const b64 = new BigUint64Array(bytes.buffer);
  const buf = Buffer.from(bytes.buffer);
  const zero = Buffer.alloc(4096);
  const res: Record<string, number> = {};
  const time = (name: string, f: (page: number) => boolean) => {
    let best = Infinity;
    for (let rep = 0; rep < 5; rep++) {
      const t0 = performance.now();
      let n = 0;
      for (let p = 0; p < size / 4096; p++) if (f(p)) n++;
      best = Math.min(best, performance.now() - t0);
      if (n !== size / 4096) throw new Error('bad');
    }
    res[name] = Math.round(size / MiB / (best / 1000));
  };
  time('int32x8', (p) => {
    const s = p * 1024;
    for (let k = s; k < s + 1024; k += 8) if ((i32[k]! | i32[k + 1]! | i32[k + 2]! | i32[k + 3]! | i32[k + 4]! | i32[k + 5]! | i32[k + 6]! | i32[k + 7]!) !== 0) return false;
    return true;
  });
  time('float64 (Object.is-safe: !== 0 misses -0)', (p) => {
    const s = p * 512;
    for (let k = s; k < s + 512; k += 4) if (f64[k] !== 0 || f64[k + 1] !== 0 || f64[k + 2] !== 0 || f64[k + 3] !== 0) return false;
    return true;
  });
  time('biguint64', (p) => {
    const s = p * 512;
    for (let k = s; k < s + 512; k++) if (b64[k] !== 0n) return false;
    return true;
  });
  time('Buffer.compare', (p) => zero.compare(buf, p * 4096, p * 4096 + 4096) === 0);
  return res;
}

function xbzrleBench(): number {
  const o = new Uint8Array(4096);
  const n = new Uint8Array(4096);
  for (let i = 0; i < 4096; i += 512) n[i] = 1;
  const out = new Uint8Array(4096);
  const t0 = performance.now();
  let k = 0;
  for (; k < 100000; k++) xbzrleEncode(o, n, out, 0, 4096);
  return Math.round((k * 4096) / MiB / ((performance.now() - t0) / 1000));
}

const results = {
  sendPagesZeroMBps: Math.round(await run('zero', 256 * MiB)),
  sendPagesRandomMBps: Math.round(await run('random', 256 * MiB)),
  zeroCheckMBps: zeroCheckBench(),
  xbzrleEncodeSparseMBps: xbzrleBench(),
};
console.log(JSON.stringify(results, null, 2));
