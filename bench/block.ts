/**
 * Block migration benchmark (docs/benchmarks.md, "Block migration").
 *
 *   node dist/bench/block.js [--runs 3] [--only throughput,converge-1m,converge-4m,converge-16m] [--no-qemu]
 *                            [--memory warm|settled]
 *
 * throughput: a 1 GiB raw drive full of random bytes (the bench cache's
 *   random-1G.bin, read from the page cache by both engines: it is read once
 *   before the runs) migrates with `blk: true` into an empty sparse raw image
 *   of the same size, over tcp:127.0.0.1. Guest: 64 MiB of RAM, stopped (-S)
 *   on the source, so that nothing but the migration uses the CPU.
 *     Ferry  `-machine none,memory-backend=m -object memory-backend-ram,id=m,size=64M
 *            -drive file=IMG,format=raw,if=none,id=d0`, max-bandwidth 0 (unlimited),
 *            downtime-limit 300 ms.
 *     QEMU   `-M pc,memory-backend=m -object memory-backend-ram,id=m,size=64M
 *            -drive file=IMG,format=raw,if=ide` on both sides (a `-M none` QEMU
 *            cannot be a block migration destination: docs/spec/interop-block.md).
 *            QEMU 7.2 makes no progress at max-bandwidth 0 and loses chunks when
 *            bandwidth × downtime-limit is large, so it runs in three set-ups:
 *            100 GB/s / 300 ms (what bench/migrate gives QEMU), 1 GiB/s / 30 ms and
 *            256 MiB/s / 300 ms. Every run's destination image is compared with the
 *            source; a run that lost chunks counts as failed, and the comparison
 *            takes QEMU's fastest set-up whose runs all arrived whole.
 *   Engines and set-ups alternate run by run. The destination image is removed
 *   after each run (its dirty page cache is dropped, not written back).
 *
 * converge-R: Ferry alone (QEMU has no disk workload without a guest kernel):
 *   a 256 MiB raw drive of random bytes written by the disk workload at R
 *   bytes/s (64 KiB writes over a 32 MiB working set) while it migrates at
 *   max-bandwidth 64 MiB/s, downtime-limit 300 ms. Does it converge within
 *   40 s, and at what downtime?
 *
 * Writes bench/results/block.json (median of the runs of each engine, every
 * run, the memory state before each run).
 */
import { execFileSync } from 'node:child_process';
import { openSync, readSync, closeSync, readFileSync, rmSync, truncateSync, writeFileSync, existsSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import {
  GiB,
  MiB,
  RESULTS_DIR,
  cleanupTempDirs,
  freePort,
  median,
  randomFile1G,
  startFerry,
  startQemu,
  tempDir,
  untilIncomingRuns,
  untilMigrationEnds,
  writeResult,
  type Vm,
} from './lib/common.js';

interface Setup {
  name: string;
  engine: 'ferry' | 'qemu';
  maxBandwidth: number;
  downtimeLimit: number;
}

const SETUPS: Setup[] = [
  { name: 'ferry', engine: 'ferry', maxBandwidth: 0, downtimeLimit: 300 },
  { name: 'qemu-100g-300ms', engine: 'qemu', maxBandwidth: 100e9, downtimeLimit: 300 },
  { name: 'qemu-1g-30ms', engine: 'qemu', maxBandwidth: GiB, downtimeLimit: 30 },
  { name: 'qemu-256m-300ms', engine: 'qemu', maxBandwidth: 256 * MiB, downtimeLimit: 300 },
];

interface RunRecord {
  setup: string;
  ok: boolean;
  error?: string;
  /** the destination image equals the source (every chunk arrived) */
  intact?: boolean;
  /** 1 MiB chunks that differ */
  chunksDiffering?: number;
  totalTimeMs?: number;
  downtimeMs?: number;
  /** the destination's downtime (source stop → guest running there; Ferry reports it, QEMU does not) */
  destDowntimeMs?: number;
  /** stream bytes (mbps × total-time, both engines count the whole stream) */
  streamBytes?: number;
  /** disk bytes / total-time */
  diskBytesPerSec?: number;
  wallToDestDoneMs?: number;
  memory: MemState;
}

/**
 * The host's memory state at `migrate` (docs/benchmarks.md, "Facts"):
 * warm: 1 GiB was written to a scratch file and removed just before, so
 * the destination's page cache takes pages the guest kernel just freed;
 * settled: nothing ran for SETTLE_MS before, and the first touch of fresh
 * pages costs what the hypervisor charges.
 */
type MemoryMode = 'warm' | 'settled';
const SETTLE_MS = 20000;
let memoryMode: MemoryMode = 'warm';

async function prepareMemory(dir: string, image: string): Promise<void> {
  if (memoryMode === 'settled') {
    await new Promise((r) => setTimeout(r, SETTLE_MS));
    return;
  }
  const scratch = join(dir, 'warm.bin');
  execFileSync('sh', ['-c', `head -c 1G '${image}' > '${scratch}'`]);
  rmSync(scratch);
}

interface MemState {
  memFreeMiB: number;
  cachedMiB: number;
  dirtyMiB: number;
  writebackMiB: number;
  loadavg: number[];
  msSinceLastRun: number | null;
}

let lastRunEnd: number | null = null;

function memState(): MemState {
  const m = new Map<string, number>();
  for (const line of readFileSync('/proc/meminfo', 'utf8').split('\n')) {
    const [k, v] = line.split(':');
    if (k && v) m.set(k, parseInt(v, 10) / 1024);
  }
  return {
    memFreeMiB: Math.round(m.get('MemFree') ?? 0),
    cachedMiB: Math.round(m.get('Cached') ?? 0),
    dirtyMiB: Math.round(m.get('Dirty') ?? 0),
    writebackMiB: Math.round(m.get('Writeback') ?? 0),
    loadavg: loadavg().map((x) => Math.round(x * 100) / 100),
    msSinceLastRun: lastRunEnd === null ? null : Math.round(performance.now() - lastRunEnd),
  };
}

/** 1 MiB chunks in which two files differ. */
function differingChunks(a: string, b: string): number {
  const fa = openSync(a, 'r');
  const fb = openSync(b, 'r');
  const ba = Buffer.alloc(8 * MiB);
  const bb = Buffer.alloc(8 * MiB);
  let bad = 0;
  try {
    for (let off = 0; ; off += ba.length) {
      const na = readSync(fa, ba, 0, ba.length, off);
      const nb = readSync(fb, bb, 0, bb.length, off);
      if (na === 0 && nb === 0) break;
      for (let c = 0; c < Math.max(na, nb); c += MiB) {
        if (ba.compare(bb, c, Math.min(c + MiB, nb), c, Math.min(c + MiB, na)) !== 0) bad++;
      }
      if (na < ba.length || nb < bb.length) break;
    }
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
  return bad;
}

/** Read the whole file once, so that every run reads it from the page cache. */
function warm(file: string): void {
  execFileSync('sh', ['-c', `cat '${file}' > /dev/null`]);
}

const ram64 = ['-object', 'memory-backend-ram,id=m,size=64M'];

async function throughputRun(s: Setup, image: string, timeoutMs: number): Promise<RunRecord> {
  const dir = tempDir('blk-');
  const out = join(dir, 'dst.raw');
  writeFileSync(out, '');
  truncateSync(out, GiB);
  const port = await freePort();
  const rec: RunRecord = { setup: s.name, ok: false, memory: memState() };
  let src: Vm | null = null;
  let dst: Vm | null = null;
  try {
    const incoming = ['-incoming', `tcp:127.0.0.1:${port}`];
    if (s.engine === 'ferry') {
      const m = ['-machine', 'none,memory-backend=m', ...ram64];
      [dst, src] = await Promise.all([
        startFerry([...m, '-drive', `file=${out},format=raw,if=none,id=d0`, '-S', ...incoming], dir, { name: 'dst' }),
        startFerry([...m, '-drive', `file=${image},format=raw,if=none,id=d0`, '-S'], dir, { name: 'src' }),
      ]);
    } else {
      const m = ['-M', 'pc,memory-backend=m', ...ram64];
      [dst, src] = await Promise.all([
        startQemu([...m, '-drive', `file=${out},format=raw,if=ide`, '-S', ...incoming], dir, { name: 'dst' }),
        startQemu([...m, '-drive', `file=${image},format=raw,if=ide`, '-S'], dir, { name: 'src' }),
      ]);
    }
    await src.execute('migrate-set-parameters', { 'max-bandwidth': s.maxBandwidth, 'downtime-limit': s.downtimeLimit });
    await prepareMemory(dir, image);
    rec.memory = memState();
    const t0 = performance.now();
    await src.execute('migrate', { uri: `tcp:127.0.0.1:${port}`, blk: true });
    const info = await untilMigrationEnds(src, timeoutMs, 20);
    if (!info || info.status !== 'completed') {
      await src.execute('migrate_cancel').catch(() => undefined);
      rec.error = info ? `${info.status}: ${info['error-desc'] ?? ''}` : `did not complete within ${timeoutMs / 1000} s`;
      return rec;
    }
    const st = await untilIncomingRuns(dst, 60000);
    rec.wallToDestDoneMs = performance.now() - t0;
    rec.destDowntimeMs = (await dst.execute('query-migrate')).downtime;
    rec.totalTimeMs = info['total-time'];
    rec.downtimeMs = info.downtime;
    rec.streamBytes = Math.round(((info.ram?.mbps ?? 0) * 1e6 * (rec.totalTimeMs ?? 0)) / 1000 / 8);
    rec.diskBytesPerSec = GiB / ((rec.totalTimeMs ?? 1) / 1000);
    await Promise.all([src.quit(), dst.quit()]);
    src = dst = null;
    if (!st.ok) {
      rec.error = `destination ended in ${String(st.reached)}`;
      return rec;
    }
    rec.chunksDiffering = differingChunks(image, out);
    rec.intact = rec.chunksDiffering === 0;
    rec.ok = rec.intact;
    if (!rec.intact) rec.error = `${rec.chunksDiffering} of 1024 chunks differ on the destination`;
    return rec;
  } catch (e) {
    rec.error = e instanceof Error ? e.message : String(e);
    return rec;
  } finally {
    await Promise.all([src?.quit(), dst?.quit()]);
    rmSync(out, { force: true });
    lastRunEnd = performance.now();
  }
}

interface ConvergeRecord {
  rate: string;
  converged: boolean;
  error?: string;
  totalTimeMs?: number;
  downtimeMs?: number;
  destDowntimeMs?: number;
  streamBytes?: number;
  /** disk workload steps on the source during the migration */
  diskSteps?: number;
  digestsEqual?: boolean;
  memory: MemState;
}

async function convergeRun(rate: string, image: string, timeoutMs: number): Promise<ConvergeRecord> {
  const dir = tempDir('blkc-');
  const src256 = join(dir, 'src.raw');
  execFileSync('sh', ['-c', `head -c 256M '${image}' > '${src256}'`]);
  const out = join(dir, 'dst.raw');
  writeFileSync(out, '');
  truncateSync(out, 256 * MiB);
  const port = await freePort();
  const rec: ConvergeRecord = { rate, converged: false, memory: memState() };
  let src: Vm | null = null;
  let dst: Vm | null = null;
  try {
    const m = ['-machine', 'none,memory-backend=m', ...ram64];
    [dst, src] = await Promise.all([
      startFerry([...m, '-drive', `file=${out},format=raw,if=none,id=d0`, '-S', '-incoming', `tcp:127.0.0.1:${port}`], dir, { name: 'dst' }),
      startFerry([...m, '-drive', `file=${src256},format=raw,if=none,id=d0`, '-disk-workload', `drive=d0,rate=${rate},wss=32M,write=64K,seed=5`], dir, { name: 'src' }),
    ]);
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 64 * MiB, 'downtime-limit': 300 });
    await prepareMemory(dir, image);
    rec.memory = memState();
    const steps0 = (await src.execute('x-query-disk-workload'))[0].steps as number;
    await src.execute('migrate', { uri: `tcp:127.0.0.1:${port}`, blk: true });
    const info = await untilMigrationEnds(src, timeoutMs, 50);
    rec.diskSteps = ((await src.execute('x-query-disk-workload'))[0].steps as number) - steps0;
    if (!info) {
      await src.execute('migrate_cancel').catch(() => undefined);
      rec.error = `did not converge within ${timeoutMs / 1000} s`;
      return rec;
    }
    if (info.status !== 'completed') {
      rec.error = `${info.status}: ${info['error-desc'] ?? ''}`;
      return rec;
    }
    rec.converged = true;
    rec.totalTimeMs = info['total-time'];
    rec.downtimeMs = info.downtime;
    rec.streamBytes = Math.round(((info.ram?.mbps ?? 0) * 1e6 * (rec.totalTimeMs ?? 0)) / 1000 / 8);
    await untilIncomingRuns(dst, 60000);
    rec.destDowntimeMs = (await dst.execute('query-migrate')).downtime;
    const [a, b] = await Promise.all([src.execute('x-query-block-digest'), dst.execute('x-query-block-digest')]);
    rec.digestsEqual = a.digest === b.digest;
    return rec;
  } catch (e) {
    rec.error = e instanceof Error ? e.message : String(e);
    return rec;
  } finally {
    await Promise.all([src?.quit(), dst?.quit()]);
    rmSync(dir, { recursive: true, force: true });
    lastRunEnd = performance.now();
  }
}

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

const range = (v: number[]) => (v.length ? [Math.min(...v), Math.max(...v)] : []);

async function main(): Promise<void> {
  const runs = Math.max(1, Number(arg('runs') ?? '3'));
  const only = arg('only')?.split(',');
  const withQemu = !process.argv.includes('--no-qemu');
  memoryMode = arg('memory') === 'settled' ? 'settled' : 'warm';
  const want = (n: string) => !only || only.includes(n);
  const image = randomFile1G();
  warm(image);
  const facts = {
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model,
    node: process.version,
    qemu: execFileSync('/usr/bin/qemu-system-x86_64', ['--version']).toString().split('\n')[0],
    sourceImage: `${image} (1 GiB of /dev/urandom), read once before the runs`,
    startedAt: new Date().toISOString(),
    memory: memoryMode,
  };
  console.log(`block bench: ${runs} run(s); ${facts.cpus} CPUs; load ${loadavg().map((x) => x.toFixed(2)).join(' ')}`);
  // each part of the campaign can run in its own call (--only): keep what earlier calls wrote
  const prevFile = join(RESULTS_DIR, 'block.json');
  const prev = existsSync(prevFile) ? JSON.parse(readFileSync(prevFile, 'utf8')) : {};
  const result: Record<string, unknown> = { ...prev, facts };

  const suffix = memoryMode === 'settled' ? '-settled' : '';
  if (want('throughput')) {
    const setups = SETUPS.filter((s) => withQemu || s.engine === 'ferry');
    const all = new Map<string, RunRecord[]>(setups.map((s) => [s.name, []]));
    for (let i = 0; i < runs; i++) {
      const order = i % 2 ? [...setups].reverse() : setups;
      for (const s of order) {
        const r = await throughputRun(s, image, 120000);
        all.get(s.name)!.push(r);
        console.log(
          `  throughput ${s.name} #${i + 1}: ` +
            (r.totalTimeMs !== undefined
              ? `total ${r.totalTimeMs} ms, downtime ${r.downtimeMs} ms${r.destDowntimeMs !== undefined ? ` (destination ${r.destDowntimeMs} ms)` : ''}, ${((r.streamBytes ?? 0) / MiB).toFixed(0)} MiB on the wire, ` +
                `${((r.diskBytesPerSec ?? 0) / MiB).toFixed(0)} MiB/s of disk${r.intact === false ? `, LOST: ${r.error}` : ''}`
              : `FAILED ${r.error}`) +
            ` [free ${r.memory.memFreeMiB} MiB, dirty ${r.memory.dirtyMiB} MiB, load ${r.memory.loadavg[0]}]`,
        );
      }
      cleanupTempDirs();
    }
    const summary: Record<string, unknown> = {};
    for (const [name, rs] of all) {
      const ok = rs.filter((r) => r.ok);
      const t = ok.map((r) => r.totalTimeMs!);
      summary[name] = {
        runs: rs.length,
        intactRuns: ok.length,
        lostChunks: rs.map((r) => r.chunksDiffering ?? null),
        totalTimeMs: { median: median(t), range: range(t) },
        downtimeMs: { median: median(ok.map((r) => r.downtimeMs!)), range: range(ok.map((r) => r.downtimeMs!)) },
        streamBytes: median(ok.map((r) => r.streamBytes!)),
        diskMiBPerSec: median(ok.map((r) => r.diskBytesPerSec! / MiB)),
      };
    }
    // QEMU's fastest set-up whose runs all arrived whole
    const qemuWhole = [...all.entries()]
      .filter(([n, rs]) => n.startsWith('qemu') && rs.every((r) => r.ok))
      .sort((a, b) => median(a[1].map((r) => r.totalTimeMs!)) - median(b[1].map((r) => r.totalTimeMs!)))[0];
    const ferryT = median((all.get('ferry') ?? []).filter((r) => r.ok).map((r) => r.totalTimeMs!));
    result[`throughput${suffix}`] = {
      what: '1 GiB raw of random bytes, blk: true, tcp loopback, 64 MiB guest stopped on the source',
      summary,
      baseline: qemuWhole?.[0] ?? null,
      ratioFerryOverQemuTime: qemuWhole ? ferryT / median(qemuWhole[1].map((r) => r.totalTimeMs!)) : null,
      runs: Object.fromEntries(all),
    };
    console.log('\nthroughput medians:');
    for (const [n, s] of Object.entries(summary) as [string, any][]) {
      console.log(`  ${n.padEnd(16)} ${s.intactRuns}/${s.runs} whole, total ${Math.round(s.totalTimeMs.median)} ms [${s.totalTimeMs.range.join('-')}], downtime ${Math.round(s.downtimeMs.median)} ms, ${Math.round(s.diskMiBPerSec)} MiB/s of disk`);
    }
    if (qemuWhole) console.log(`  Ferry / ${qemuWhole[0]} (time): ${(result[`throughput${suffix}`] as any).ratioFerryOverQemuTime.toFixed(2)}`);
  }

  for (const rate of ['1M', '4M', '16M']) {
    const name = `converge-${rate.toLowerCase()}`;
    if (!want(name)) continue;
    const rs: ConvergeRecord[] = [];
    for (let i = 0; i < runs; i++) {
      const r = await convergeRun(rate, image, 40000);
      rs.push(r);
      console.log(
        `  ${name} #${i + 1}: ` +
          (r.converged
            ? `converged in ${r.totalTimeMs} ms, downtime ${r.downtimeMs} ms (destination ${r.destDowntimeMs} ms), ${((r.streamBytes ?? 0) / MiB).toFixed(0)} MiB sent, digests ${r.digestsEqual ? 'equal' : 'DIFFER'}`
            : `did not converge: ${r.error}`) +
          `, ${r.diskSteps} disk writes [free ${r.memory.memFreeMiB} MiB, load ${r.memory.loadavg[0]}]`,
      );
      cleanupTempDirs();
    }
    const c = rs.filter((r) => r.converged);
    result[name] = {
      what: `256 MiB raw, disk workload ${rate}B/s (64 KiB writes over 32 MiB), max-bandwidth 64 MiB/s, downtime-limit 300 ms`,
      converged: `${c.length}/${rs.length}`,
      totalTimeMs: { median: median(c.map((r) => r.totalTimeMs!)), range: range(c.map((r) => r.totalTimeMs!)) },
      downtimeMs: { median: median(c.map((r) => r.downtimeMs!)), range: range(c.map((r) => r.downtimeMs!)) },
      destDowntimeMs: { median: median(c.map((r) => r.destDowntimeMs!)), range: range(c.map((r) => r.destDowntimeMs!)) },
      streamBytes: median(c.map((r) => r.streamBytes!)),
      runs: rs,
    };
  }
  const p = writeResult('block', result);
  console.log(`\nwrote ${p}`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
