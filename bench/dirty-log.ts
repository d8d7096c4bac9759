/**
 * Dirty-logging overhead of the `stress` workload on ONE vCPU (write=8) over
 * a 1 GiB working set: the guest's own StressLoop with logging on versus the
 * same loop with logging off (same PRNG, same write pattern, same buffer,
 * same process). The bitmap is cleared before every logged run (as a
 * migration pass would), so the Atomics.or path is exercised.
 *
 *   node dist/bench/dirty-log.js [--size 1G,64M] [--steps 5000000] [--runs 7]
 * (64 MiB shows the CPU cost without TLB/cache misses dominating.)
 * Writes bench/results/dirty-log.json.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { parseSize } from '../src/base/size.js';
import { StressLoop, fillRandom, seedXorshift, stressSalt } from '../src/machine/workload.js';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}

const sizes = arg('size', '1G,64M').split(',').map((x) => parseSize(x));
const steps = Number(arg('steps', '5000000'));
const runs = Math.max(3, Number(arg('runs', '7')));

const median = (a: number[]): number => {
  const s = [...a].sort((x, y) => x - y);
  return s.length % 2 ? s[(s.length - 1) >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

function measure(size: number): Record<string, unknown> {
  const pages = size / 4096;
  const bytes = new Uint8Array(new SharedArrayBuffer(size));
  const dirty = new Int32Array(new SharedArrayBuffer(Math.ceil(pages / 32) * 4));
  // touch every page first so page faults are not measured
  for (let o = 0, c = 0; o < size; o += 1 << 20, c++) fillRandom(bytes, o, Math.min(1 << 20, size - o), 1, c);

  const once = (log: boolean): number => {
    if (log) dirty.fill(0);
    const l = new StressLoop([bytes], [dirty], 0, pages, 8, stressSalt(0), log);
    l.setRng(seedXorshift(42, 0));
    const t0 = performance.now();
    // same batching as the vCPU worker
    for (let done = 0; done < steps; done += 128) l.run(Math.min(128, steps - done));
    return steps / ((performance.now() - t0) / 1000);
  };

  // warm-up (JIT) for both variants
  once(false);
  once(true);
  const plain: number[] = [];
  const logged: number[] = [];
  for (let i = 0; i < runs; i++) {
    // alternate the order to spread drift and noise evenly
    if (i % 2) {
      logged.push(once(true));
      plain.push(once(false));
    } else {
      plain.push(once(false));
      logged.push(once(true));
    }
  }
  const mPlain = median(plain);
  const mLogged = median(logged);
  const overhead = 1 - mLogged / mPlain;
  const f = (x: number): string => `${(x / 1e6).toFixed(2)}M`;
  console.log(
    `dirty-log ${size >>> 20} MiB: ${f(mPlain)} pages/s plain, ${f(mLogged)} pages/s logged ` +
      `(median of ${runs}, write=8, 1 vCPU): overhead ${(overhead * 100).toFixed(1)}% (goal < 30%) ${overhead < 0.3 ? 'PASS' : 'FAIL'}`,
  );
  return {
    sizeBytes: size,
    plainPagesPerSec: plain,
    loggedPagesPerSec: logged,
    medianPlainPagesPerSec: mPlain,
    medianLoggedPagesPerSec: mLogged,
    ratioLoggedToPlain: mLogged / mPlain,
    overheadPct: overhead * 100,
    pass: overhead < 0.3,
  };
}

const results = sizes.map(measure);
const result = {
  bench: 'dirty-log',
  date: new Date().toISOString(),
  node: process.version,
  stepsPerRun: steps,
  runs,
  write: 8,
  vcpus: 1,
  goalOverheadPct: 30,
  results,
  pass: results.every((r) => r.pass),
};
const out = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'bench', 'results');
mkdirSync(out, { recursive: true });
writeFileSync(join(out, 'dirty-log.json'), JSON.stringify(result, null, 2) + '\n');
