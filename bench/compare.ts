/**
 * A fair comparison of Ferry and QEMU 7.2 on the incompressible 1 GiB guest:
 * `npm run bench -- compare [--runs 5] [--states warm,settled]
 * [--configs default,prealloc,paused] [--no-limits]`.
 *
 * What decides the result on our hosts is the memory state of the host (a
 * VM whose freed memory goes back to the hypervisor after some seconds), so
 * every run records it and runs in a chosen one:
 *  - warm: once the source is up, a helper process takes 2 GiB of huge
 *    pages and frees them (warmHugePages in bench/lib), and the destination
 *    starts at once: it finds huge pages the hypervisor still backs. (Runs
 *    back to back were not the same state for both engines: Ferry's source
 *    took the huge pages the previous run had freed and QEMU's, a 4 KiB
 *    shmem file, did not, and Ferry's source took longer to come up, so
 *    QEMU's destination found hot huge pages and Ferry's cold ones.)
 *  - settled: once the source is up, the run waits SETTLE_MS (20 s) before
 *    it starts the destination.
 * The time since the previous run and MemFree are recorded with every run.
 *
 * Set up as users set them up:
 *  - source RAM resident and mapped on both, as a running guest's is: Ferry
 *    `-fill random,seed=1`; QEMU `memory-backend-ram` loaded from the same
 *    bytes saved as a migration stream (startQemuRandomSource in bench/lib);
 *  - the destination (`-incoming defer`, then `migrate-incoming`, as libvirt
 *    does) in three configurations:
 *      default   both engines' defaults (Ferry prefaults in the background,
 *                QEMU does not), the destination started after the source is
 *                up and migrated as soon as it answers;
 *      prealloc  Ferry `-mem-prealloc`, QEMU `memory-backend-ram,prealloc=on`
 *                (QEMU's default prealloc-threads=1), migrated once it answers
 *                (both fault their RAM in before the monitor answers);
 *      paused    defaults, migrated PAUSE_MS after the destination answers;
 *  - QEMU's max-bandwidth raised to 100 GB/s (its default, 128 MiB/s, would
 *    handicap it), downtime-limit 300 ms on both.
 * Engines alternate run by run (Ferry first on odd runs, QEMU first on even).
 * The loopback limit (node → node over 127.0.0.1, one stream, hot buffers)
 * and the memcpy limit are measured in the same sitting.
 * Writes bench/results/compare.json and prints a table of medians [ranges].
 */
import { readFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { fileURLToPath } from 'node:url';
import { measureLoopback } from './loopback.js';
import {
  GiB, MiB, cleanupTempDirs, freePort, median, randomStream1G, sleep, startFerry, startQemu, startQemuRandomSource, tempDir,
  migrateAndMeasure, warmHugePages, writeResult, type Measured, type Vm,
} from './lib/common.js';

type Engine = 'ferry' | 'qemu';
type State = 'warm' | 'settled';
type Config = 'default' | 'prealloc' | 'paused';

const SETTLE_MS = 20000;
const PAUSE_MS = 5000;
const BIG_BW = 100e9;

interface Run extends Measured {
  engine: Engine;
  state: State;
  config: Config;
  /** ms from the end of the previous run to the destination's start */
  sinceLastRunMs: number;
  /** host MemFree at that point, bytes */
  memFreeBytes: number;
}

/** MemFree of the host, bytes (recorded with every run; reading it changes nothing). */
function memFree(): number {
  const m = /MemFree:\s+(\d+) kB/.exec(readFileSync('/proc/meminfo', 'utf8'));
  return m ? Number(m[1]) * 1024 : NaN;
}

let lastRunEnded = 0;

/**
 * Puts the host in `state` just before the destination starts. Warm: 2 GiB
 * of huge pages freed just now (both engines' destinations take huge pages:
 * QEMU madvises its RAM, Ferry too). Settled: SETTLE_MS without a large
 * free. (An earlier probe freed 4 KiB pages, which left no hot huge pages
 * and made the next destination's first touch dearer.)
 */
async function reachState(state: State): Promise<void> {
  if (state === 'settled') await sleep(SETTLE_MS);
  else await warmHugePages(2 * GiB);
}

function qemuRam(config: Config): string[] {
  return ['-machine', 'none,memory-backend=m', '-object', `memory-backend-ram,id=m,size=1G${config === 'prealloc' ? ',prealloc=on' : ''}`, '-S'];
}

async function runOnce(engine: Engine, state: State, config: Config): Promise<Run> {
  const dir = tempDir();
  const port = await freePort();
  const uri = `tcp:127.0.0.1:${port}`;
  let src: Vm | null = null;
  let dst: Vm | null = null;
  const rec: Run = { engine, state, config, sinceLastRunMs: NaN, memFreeBytes: NaN, ok: false };
  try {
    // the source first (its RAM resident), then the destination
    src = engine === 'ferry'
      ? await startFerry(['-m', '1G', '-workload', 'idle', '-fill', 'random,seed=1'], dir, { name: 'src' })
      : await startQemuRandomSource(dir);
    await reachState(state);
    rec.sinceLastRunMs = lastRunEnded ? Math.round(performance.now() - lastRunEnded) : NaN;
    rec.memFreeBytes = memFree();
    dst = engine === 'ferry'
      ? await startFerry(['-m', '1G', '-S', ...(config === 'prealloc' ? ['-mem-prealloc'] : []), '-incoming', 'defer'], dir, { name: 'dst' })
      : await startQemu([...qemuRam(config), '-incoming', 'defer'], dir, { name: 'dst' });
    if (config === 'paused') await sleep(PAUSE_MS);
    await dst.execute('migrate-incoming', { uri });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': engine === 'ferry' ? 0 : BIG_BW, 'downtime-limit': 300 });
    Object.assign(rec, await migrateAndMeasure(src, dst, uri, 120000));
    return rec;
  } catch (e) {
    rec.error = e instanceof Error ? e.message : String(e);
    return rec;
  } finally {
    await Promise.all([src?.quit(), dst?.quit()]);
    cleanupTempDirs();
    lastRunEnded = performance.now();
  }
}

/** Hot memcpy between two resident 256 MiB buffers, bytes/s (median of 5). */
function memcpyLimit(): number {
  const a = Buffer.alloc(256 * MiB, 1);
  const b = Buffer.alloc(256 * MiB, 2);
  const r: number[] = [];
  for (let i = 0; i < 5; i++) {
    const t = performance.now();
    a.copy(b);
    r.push((256 * MiB) / ((performance.now() - t) / 1000));
  }
  return median(r);
}

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

const stats = (v: number[]): { median: number; min: number; max: number } | null =>
  v.length ? { median: median(v), min: Math.min(...v), max: Math.max(...v) } : null;
const fmt = (s: { median: number; min: number; max: number } | null): string =>
  s ? `${Math.round(s.median)} [${Math.round(s.min)}–${Math.round(s.max)}]` : '-';

export async function main(): Promise<void> {
  const runs = Math.max(1, Number(arg('runs') ?? '5'));
  const states = (arg('states') ?? 'warm,settled').split(',') as State[];
  const configs = (arg('configs') ?? 'default,prealloc,paused').split(',') as Config[];
  await randomStream1G();
  console.log(`compare: ${runs} run(s) per engine, states ${states.join(',')}, configs ${configs.join(',')}; ${cpus().length} CPUs; load ${loadavg().map((x) => x.toFixed(2)).join(' ')}`);
  const limits = process.argv.includes('--no-limits')
    ? null
    : { loopbackBytesPerSec: (await measureLoopback(GiB, 2 * MiB, 3)).medianBytesPerSec as number, memcpyBytesPerSec: memcpyLimit() };
  if (limits) console.log(`limits: loopback ${(limits.loopbackBytesPerSec / MiB).toFixed(0)} MiB/s, memcpy ${(limits.memcpyBytesPerSec / MiB).toFixed(0)} MiB/s`);
  const all: Run[] = [];
  for (const state of states) {
    for (const config of configs) {
      for (let i = 0; i < runs; i++) {
        for (const engine of (i % 2 ? ['qemu', 'ferry'] : ['ferry', 'qemu']) as Engine[]) {
          const r = await runOnce(engine, state, config);
          all.push(r);
          console.log(`  ${state} ${config} ${engine} #${i + 1} (${Math.round(r.sinceLastRunMs / 1000)} s after the last run, MemFree ${(r.memFreeBytes / GiB).toFixed(1)} GiB): ` +
            (r.ok ? `total ${r.totalTimeMs} ms, downtime ${r.downtimeMs} ms, dest done ${Math.round(r.wallToDestDoneMs!)} ms, ` +
              `CPU user/sys src ${r.srcCpu?.userMs}/${r.srcCpu?.sysMs} dst ${r.dstCpu?.userMs}/${r.dstCpu?.sysMs} ms` : `FAILED ${r.error}`));
        }
      }
    }
  }
  const table: Record<string, unknown>[] = [];
  console.log('\nstate    config    Ferry total ms       QEMU total ms        Ferry/QEMU  Ferry %loopback  downtime F/Q');
  for (const state of states) {
    for (const config of configs) {
      const pick = (e: Engine) => all.filter((r) => r.ok && r.engine === e && r.state === state && r.config === config);
      const f = stats(pick('ferry').map((r) => r.totalTimeMs!));
      const q = stats(pick('qemu').map((r) => r.totalTimeMs!));
      const fd = stats(pick('ferry').map((r) => r.downtimeMs!));
      const qd = stats(pick('qemu').map((r) => r.downtimeMs!));
      const ratio = f && q ? f.median / q.median : NaN;
      const pctLoop = f && limits ? (GiB / (f.median / 1000) / limits.loopbackBytesPerSec) * 100 : NaN;
      table.push({ state, config, ferry: f, qemu: q, ratio, ferryPctLoopback: pctLoop, ferryDowntime: fd, qemuDowntime: qd });
      console.log(`${state.padEnd(8)} ${config.padEnd(9)} ${fmt(f).padEnd(20)} ${fmt(q).padEnd(20)} ${ratio.toFixed(2).padStart(10)}  ${pctLoop.toFixed(0).padStart(15)}  ${fd ? Math.round(fd.median) : '-'}/${qd ? Math.round(qd.median) : '-'}`);
    }
  }
  const p = writeResult('compare', { bench: 'compare', date: new Date().toISOString(), runs, limits, table, all });
  console.log(`wrote ${p}`);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) await main();
