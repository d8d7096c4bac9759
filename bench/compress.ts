/**
 * Throughput of the `compress` capability's worker pools against thread
 * count, on text pages (the `-fill text` generator of the guest):
 *
 *   pool      CompressPool alone: full batches of pages already in the
 *             shared input area (pure deflate speed of the workers)
 *   sender    RamSender.sendPagesCompressed on a 64 MiB text block into a
 *             null StreamWriter (scan + copy in, deflate, records out)
 *   inflate   DecompressPool on the resulting streams
 *
 * MB/s are MiB of input *pages* per second; medians of --runs (default 3).
 * Level = compress-level (default 1, QEMU's default). Results go to
 * bench/results/compress.json.
 *
 * Run: node dist/bench/compress.js [--runs N] [--level L] [--threads 1,2,4,8]
 */
import { availableParallelism, cpus } from 'node:os';
import type { RamBlock } from '../src/machine/types.js';
import { fillText, makeTextPool } from '../src/machine/workload.js';
import { CompressPool, DecompressPool, PAGE_SIZE } from '../src/migration/codec/compress-pool.js';
import { RamSender } from '../src/migration/ram/sender.js';
import { StreamWriter } from '../src/migration/stream/writer.js';
import { MiB, median, writeResult } from './lib/common.js';

function flag(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : def;
}

const RUNS = Math.max(3, Number(flag('runs', '3')));
const LEVEL = Number(flag('level', '1'));
const THREADS = flag('threads', '1,2,4,8').split(',').map(Number);
const BLOCK = 64 * MiB;

function textBlock(size: number): RamBlock {
  const pages = size / PAGE_SIZE;
  const bytes = new Uint8Array(new SharedArrayBuffer(size));
  const pool = makeTextPool(4);
  for (let o = 0, c = 0; o < size; o += 256 * 1024, c++) fillText(bytes, o, 256 * 1024, pool, 4, c);
  return {
    name: 'pc.ram',
    size,
    pages,
    bytes,
    dirty: new Int32Array(new SharedArrayBuffer(Math.ceil(pages / 32) * 4)),
    touched: new Uint32Array(Math.ceil(pages / 32)).fill(0xffffffff),
    present: new Int32Array(new SharedArrayBuffer(Math.ceil(pages / 32) * 4)).fill(-1),
  };
}

async function poolRun(threads: number, block: RamBlock): Promise<{ mbps: number; ratio: number }> {
  const pool = new CompressPool({ threads });
  try {
    const n = pool.capacity;
    for (let i = 0; i < n; i++) pool.putPage(i, block.bytes, (i % block.pages) * PAGE_SIZE);
    await pool.compress(n, LEVEL); // spawn + warm up
    let pages = 0;
    let out = 0;
    const t0 = performance.now();
    while (performance.now() - t0 < 1500) {
      await pool.compress(n, LEVEL);
      pages += n;
    }
    const dt = performance.now() - t0;
    for (let i = 0; i < n; i++) out += pool.outLen[i]!;
    return { mbps: (pages * PAGE_SIZE) / MiB / (dt / 1000), ratio: out / (n * PAGE_SIZE) };
  } finally {
    await pool.close();
  }
}

async function senderRun(threads: number, block: RamBlock): Promise<{ mbps: number; bytes: number; streams: Buffer[] }> {
  const pool = new CompressPool({ threads });
  // warm up the workers
  for (let i = 0; i < pool.capacity; i++) pool.putPage(i, block.bytes, i * PAGE_SIZE);
  await pool.compress(pool.capacity, LEVEL);
  try {
    const s = new RamSender([block]);
    const w = new StreamWriter(null, { bufferSize: 8 * MiB });
    const streams: Buffer[] = [];
    const t0 = performance.now();
    for (;;) {
      const r = await s.sendPagesCompressed(w, pool, LEVEL, { maxMillis: 5 });
      if (streams.length < 2048 && threads === THREADS[0]) {
        // keep a sample of compressed pages for the inflate run
        for (let i = 0; i < Math.min(64, s.counters.compressed); i++) {
          if (pool.outLen[i]! > 0) streams.push(Buffer.from(pool.result(i)));
        }
      }
      await w.flush();
      if (r.done) break;
    }
    const dt = performance.now() - t0;
    return { mbps: BLOCK / MiB / (dt / 1000), bytes: s.counters.transferred, streams };
  } finally {
    await pool.close();
  }
}

async function inflateRun(threads: number, streams: Buffer[]): Promise<number> {
  const pool = new DecompressPool({ threads });
  try {
    const n = pool.capacity;
    for (let i = 0; i < n; i++) {
      const z = streams[i % streams.length]!;
      pool.putCompressed(i, z, 0, z.length);
    }
    await pool.decompress(n);
    let pages = 0;
    const t0 = performance.now();
    while (performance.now() - t0 < 1000) {
      await pool.decompress(n);
      pages += n;
    }
    for (let i = 0; i < n; i++) if (!pool.ok(i)) throw new Error(`slot ${i} failed to inflate`);
    return (pages * PAGE_SIZE) / MiB / ((performance.now() - t0) / 1000);
  } finally {
    await pool.close();
  }
}

const block = textBlock(BLOCK);
const results: Record<string, unknown>[] = [];
let streams: Buffer[] = [];
for (const threads of THREADS) {
  const pool: number[] = [];
  const sender: number[] = [];
  const inflate: number[] = [];
  let ratio = 0;
  let bytes = 0;
  for (let r = 0; r < RUNS; r++) {
    const p = await poolRun(threads, block);
    pool.push(p.mbps);
    ratio = p.ratio;
    const s = await senderRun(threads, block);
    sender.push(s.mbps);
    bytes = s.bytes;
    if (streams.length === 0) streams = s.streams;
  }
  for (let r = 0; r < RUNS; r++) inflate.push(await inflateRun(threads, streams));
  const row = {
    threads,
    poolMBps: +median(pool).toFixed(1),
    senderMBps: +median(sender).toFixed(1),
    inflateMBps: +median(inflate).toFixed(1),
    ratio: +ratio.toFixed(3),
    streamBytes: bytes,
    runs: { pool: pool.map((x) => +x.toFixed(1)), sender: sender.map((x) => +x.toFixed(1)), inflate: inflate.map((x) => +x.toFixed(1)) },
  };
  results.push(row);
  console.log(
    `threads ${String(threads).padStart(2)}: pool ${row.poolMBps} MB/s, sender ${row.senderMBps} MB/s, ` +
      `inflate ${row.inflateMBps} MB/s, ratio ${row.ratio} (${(bytes / MiB).toFixed(1)} MiB stream for ${BLOCK / MiB} MiB)`,
  );
}

const file = writeResult('compress', {
  when: new Date().toISOString(),
  node: process.version,
  cpus: availableParallelism(),
  cpu: cpus()[0]?.model,
  level: LEVEL,
  pageKind: 'text (-fill text generator)',
  blockMiB: BLOCK / MiB,
  unit: 'MiB of input pages per second, median',
  runsPerPoint: RUNS,
  results,
});
console.log(`wrote ${file}`);
