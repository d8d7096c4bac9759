/**
 * COLO checkpoints: how long the primary's guest is stopped per checkpoint,
 * and how many bytes each one sends, against the guest's dirty rate.
 * For every (rate, delay): a primary (`-workload stress,rate=R`) and a
 * secondary, two `ferry vm` processes over a unix socket, x-colo with
 * x-checkpoint-delay D; the checkpoints' figures are read from
 * query-colo-status (x-last-checkpoint) as they complete. The first
 * `--skip` checkpoints of each pair are reported apart: they carry what
 * piled up while the secondary set up its copy of RAM, and they fault the
 * checkpoint buffer in.
 *
 * Baseline, measured in the same run: QEMU's COLO needs a real guest and
 * colo-compare netfilters, so the comparison is the hardware limit: a
 * memcpy of the same page bytes (hot buffers; the pause copies each page
 * twice, guest → staging → checkpoint buffer) and the median checkpoint's
 * bytes at the TCP loopback throughput measured at the start of the run
 * (what carrying it costs at best; bench/loopback.ts).
 *
 *   node dist/bench/colo.js [--mem 256M] [--rates 4M,32M,128M] [--delays 100,500] [--checkpoints 12] [--skip 2]
 * Writes bench/results/colo.json. Goal: a pause of at most 10 ms per 1000 dirty pages.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseSize } from '../src/base/size.js';
import { MiB, cleanupTempDirs, median, sleep, startFerry, tempDir, writeResult, type Vm } from './lib/common.js';
import { loopbackOnce } from './loopback.js';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}

interface Checkpoint {
  pause: number;
  size: number;
  pages: number;
  duration: number;
}

interface Case {
  rate: string;
  delayMs: number;
  warmup: Checkpoint[];
  steady: Checkpoint[];
  /** pause per 1000 dirty pages, median over the steady checkpoints */
  msPer1000Pages: number;
  medianPause: number;
  medianPages: number;
  medianSize: number;
  medianDuration: number;
  /** hot memcpy of the median checkpoint's page bytes, ms */
  memcpyMs: number;
  /** the median checkpoint at the TCP loopback throughput measured in this run, ms */
  loopbackMs: number;
}

function memFreeMiB(): number {
  const m = /MemAvailable:\s+(\d+) kB/.exec(readFileSync('/proc/meminfo', 'utf8'));
  return m ? Math.round(Number(m[1]) / 1024) : -1;
}

/** Median time to copy `bytes` between two hot buffers (as two pages' worth each time: the pause copies twice). */
function memcpyMs(bytes: number): number {
  const a = Buffer.alloc(bytes, 1);
  const b = Buffer.alloc(bytes, 2);
  const t: number[] = [];
  for (let i = 0; i < 15; i++) {
    const t0 = performance.now();
    a.copy(b);
    t.push(performance.now() - t0);
  }
  return median(t);
}

async function oneCase(mem: string, rate: string, delayMs: number, want: number, skip: number, loopbackBps: number): Promise<Case> {
  const dir = tempDir('colo-');
  const sock = join(dir, 'mig.sock');
  let src: Vm | undefined;
  let dst: Vm | undefined;
  try {
    dst = await startFerry(['-m', mem, '-incoming', `unix:${sock}`], dir, { name: 'dst' });
    src = await startFerry(['-m', mem, '-fill', 'text,seed=1', '-workload', `stress,rate=${rate},seed=1`], dir, { name: 'src' });
    await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-colo', state: true }] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0, 'x-checkpoint-delay': delayMs });
    await src.execute('migrate', { uri: `unix:${sock}` });
    const all: Checkpoint[] = [];
    let last = 0;
    const deadline = Date.now() + 120_000 + (want + skip) * delayMs * 4;
    while (all.length < want + skip && Date.now() < deadline) {
      const s = await src.execute<any>('query-colo-status');
      if (s['x-checkpoints'] > last && s['x-last-checkpoint']) {
        if (s['x-checkpoints'] > last + 1 && last > 0) console.log(`  (missed ${s['x-checkpoints'] - last - 1} checkpoints between polls)`);
        last = s['x-checkpoints'];
        const c = s['x-last-checkpoint'];
        all.push({ pause: c.pause, size: c.size, pages: c['dirty-pages'], duration: c.duration });
      }
      await sleep(Math.min(20, delayMs / 5));
    }
    if (all.length < want + skip) throw new Error(`only ${all.length} checkpoints`);
    const steady = all.slice(skip);
    const medianSize = median(steady.map((c) => c.size));
    const medianPages = median(steady.map((c) => c.pages));
    const c: Case = {
      rate,
      delayMs,
      warmup: all.slice(0, skip),
      steady,
      msPer1000Pages: median(steady.map((x) => (x.pause / Math.max(1, x.pages)) * 1000)),
      medianPause: median(steady.map((x) => x.pause)),
      medianPages,
      medianSize,
      medianDuration: median(steady.map((x) => x.duration)),
      memcpyMs: 2 * memcpyMs(Math.max(4096, medianPages * 4096)),
      loopbackMs: (medianSize / loopbackBps) * 1000,
    };
    return c;
  } finally {
    await Promise.all([src?.quit(), dst?.quit()]);
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const mem = arg('mem', '256M');
  const rates = arg('rates', '4M,32M,128M').split(',');
  const delays = arg('delays', '100,500').split(',').map(Number);
  const want = Number(arg('checkpoints', '12'));
  const skip = Number(arg('skip', '2'));
  const memBefore = memFreeMiB();
  const cases: Case[] = [];
  // the link's ceiling, once per run: median of 3 x 256 MiB from a hot buffer
  const lb: number[] = [];
  for (let i = 0; i < 3; i++) lb.push((await loopbackOnce(256 * MiB, 2 * MiB)).bytesPerSec);
  const loopbackBps = median(lb);
  console.log(`TCP loopback ceiling: ${(loopbackBps / MiB).toFixed(0)} MiB/s (${lb.map((x) => (x / MiB).toFixed(0)).join(', ')})`);
  console.log(`COLO checkpoints, ${mem} guest, stress at ${rates.join(' / ')} B/s, x-checkpoint-delay ${delays.join(' / ')} ms; MemAvailable ${memBefore} MiB`);
  console.log('rate     delay  dirty pages  size      pause ms  ms/1000 pages  2x memcpy ms  loopback ms  checkpoint ms');
  for (const rate of rates) {
    for (const d of delays) {
      parseSize(rate);
      const c = await oneCase(mem, rate, d, want, skip, loopbackBps);
      cases.push(c);
      console.log(
        `${rate.padEnd(8)} ${String(d).padStart(5)}  ${String(Math.round(c.medianPages)).padStart(11)}  ${(c.medianSize / MiB).toFixed(2).padStart(6)} MiB ` +
          `${c.medianPause.toFixed(2).padStart(8)}  ${c.msPer1000Pages.toFixed(2).padStart(13)}  ${c.memcpyMs.toFixed(2).padStart(12)}  ${c.loopbackMs.toFixed(2).padStart(11)}  ${c.medianDuration.toFixed(1).padStart(13)}` +
          `   (pause range ${Math.min(...c.steady.map((x) => x.pause)).toFixed(1)}-${Math.max(...c.steady.map((x) => x.pause)).toFixed(1)}; warm-up ${c.warmup.map((x) => `${x.pause.toFixed(0)} ms/${x.pages} p`).join(', ')})`,
      );
    }
  }
  const file = writeResult('colo', { bench: 'colo', mem, rates, delays, cases, loopbackBytesPerSec: loopbackBps, memAvailableMiBBefore: memBefore, memAvailableMiBAfter: memFreeMiB(), date: new Date().toISOString(), node: process.version });
  console.log(`wrote ${file}`);
  cleanupTempDirs();
}
