/**
 * Migration benchmark: Ferry against QEMU 7.2 on the equivalent guest, in the
 * same run, over tcp:127.0.0.1, plus the loopback TCP ceiling measured in the
 * same run.
 *
 *   node dist/bench/migrate.js [--runs 3] [--only idle-1g,random-1g,...] [--no-qemu] [--no-loopback]
 *
 * Scenarios (see docs/benchmarks.md):
 *   idle-1g, idle-4g  Ferry `-m N -workload idle` (zero RAM) vs QEMU
 *                     `-machine none,memory-backend=m -object memory-backend-ram` (-S)
 *   random-1g         Ferry `-fill random,seed=1` vs QEMU memory-backend-ram loaded from
 *                     the same 1 GiB of random bytes saved as a stream (-S; bench/lib startQemuRandomSource)
 *   stress-16m/64m/256m  Ferry `-fill random,seed=1 -workload stress,rate=R`;
 *                     QEMU has no equivalent guest workload without a kernel
 *   sweep-256m        Ferry `-m 256M -workload sweep,start=1M,end=100M` (Ferry only)
 *
 * Both: downtime-limit 300 ms; max-bandwidth 0 on Ferry (unlimited) and
 * 100 GB/s on QEMU (7.2 also treats 0 as unlimited, see the docs; a huge value
 * is unambiguous). Writes bench/results/migrate.json.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { measureLoopback } from './loopback.js';
import {
  GiB,
  MiB,
  cleanupTempDirs,
  freePort,
  median,
  startQemuRandomSource,
  sleep,
  startFerry,
  startQemu,
  tempDir,
  untilIncomingRuns,
  untilMigrationEnds,
  writeResult,
  type Vm,
} from './lib/common.js';

type Engine = 'ferry' | 'qemu';

interface Scenario {
  name: string;
  what: string;
  ramBytes: number;
  ferrySrc: string[];
  ferryDst: string[];
  /** QEMU's source arguments */
  qemuSrc?: () => string[];
  /** or a QEMU source started by this (the random guest, loaded from a saved stream) */
  qemuSrcVm?: (dir: string) => Promise<Vm>;
  qemuDst?: () => string[];
  /** give the source guest this long to run before migrating (stress) */
  warmupMs?: number;
  /** Ferry: capabilities turned on (compress also on the destination) */
  caps?: string[];
  /** Ferry: max-bandwidth in bytes/s (default 0, unlimited) */
  maxBandwidth?: number;
}


const qemuRam = (size: string): string[] => [
  '-machine', 'none,memory-backend=m', '-object', `memory-backend-ram,id=m,size=${size}`, '-S',
];

function scenarios(): Scenario[] {
  const list: Scenario[] = [];
  for (const [name, size, bytes] of [['idle-1g', '1G', GiB], ['idle-4g', '4G', 4 * GiB]] as const) {
    list.push({
      name,
      what: `idle ${size}, zero RAM`,
      ramBytes: bytes,
      ferrySrc: ['-m', size, '-workload', 'idle'],
      ferryDst: ['-m', size, '-S'],
      qemuSrc: () => qemuRam(size),
      qemuDst: () => qemuRam(size),
    });
  }
  list.push({
    name: 'random-1g',
    what: 'incompressible 1G (random bytes), guest not writing',
    ramBytes: GiB,
    ferrySrc: ['-m', '1G', '-workload', 'idle', '-fill', 'random,seed=1'],
    ferryDst: ['-m', '1G', '-S'],
    qemuSrcVm: (dir) => startQemuRandomSource(dir),
    qemuDst: () => qemuRam('1G'),
  });
  for (const rate of ['16M', '64M', '256M']) {
    list.push({
      name: `stress-${rate.toLowerCase()}`,
      what: `1G random fill, stress workload dirtying ${rate}B/s of pages (Ferry only)`,
      ramBytes: GiB,
      ferrySrc: ['-m', '1G', '-fill', 'random,seed=1', '-workload', `stress,rate=${rate}`],
      ferryDst: ['-m', '1G', '-S'],
      warmupMs: 1000,
    });
  }
  // The convergence guest: 256 MiB sweeping 1-100 MiB (QEMU 7.2 on a
  // real guest doing the same: 543 ms, 245 MiB, 4 syncs; none here, no kernel)
  list.push({
    name: 'sweep-256m',
    what: '256M, the guest sweeps 1-100 MiB, unlimited bandwidth (Ferry only)',
    ramBytes: 256 * MiB,
    ferrySrc: ['-m', '256M', '-workload', 'sweep,start=1M,end=100M'],
    ferryDst: ['-m', '256M', '-S'],
    warmupMs: 500,
  });
  // Convergence tools: a guest that dirties 48 MiB/s of sparse writes over a
  // link held to 32 MiB/s, which plain precopy can never drain. Ferry only:
  // QEMU has no dirtying guest without a kernel.
  const tools: [string, string[]][] = [
    ['none', []], ['xbzrle', ['xbzrle']], ['compress', ['compress']], ['auto-converge', ['auto-converge']],
  ];
  for (const [tool, caps] of tools) {
    list.push({
      name: `tools-${tool}`,
      what: `256M text fill, stress 48M/s (64 B writes, 64M set) over 32 MiB/s, ${tool} (Ferry only)`,
      ramBytes: 256 * MiB,
      ferrySrc: ['-m', '256M', '-fill', 'text,seed=1', '-workload', 'stress,rate=48M,wss=64M,write=64,seed=2'],
      ferryDst: ['-m', '256M', '-S'],
      warmupMs: 500,
      caps,
      maxBandwidth: 32 * MiB,
    });
  }
  return list;
}

export interface RunRecord {
  engine: Engine;
  scenario: string;
  ok: boolean;
  error?: string;
  /** ms from `migrate` until the destination left inmigrate (client-side) */
  wallToDestDoneMs?: number;
  /** ms from `migrate` until the source reported completed (client-side, 20 ms polling) */
  wallToSrcDoneMs?: number;
  totalTimeMs?: number;
  downtimeMs?: number;
  setupTimeMs?: number;
  transferredBytes?: number;
  ramBytes: number;
  /** the engine's own ram.mbps */
  mbps?: number;
  dirtySyncCount?: number;
  /** transferred / total-time, bytes/s */
  wireBytesPerSec?: number;
  /** guest RAM size / total-time, bytes/s */
  ramBytesPerSec?: number;
  normal?: number;
  duplicate?: number;
}

const BIG_BW = 100e9; // 100 GB/s for QEMU

async function runOnce(engine: Engine, sc: Scenario, timeoutMs: number): Promise<RunRecord> {
  const dir = tempDir();
  const port = await freePort();
  const incoming = ['-incoming', `tcp:127.0.0.1:${port}`];
  let src: Vm | null = null;
  let dst: Vm | null = null;
  const rec: RunRecord = { engine, scenario: sc.name, ok: false, ramBytes: sc.ramBytes };
  try {
    if (engine === 'ferry') {
      [dst, src] = await Promise.all([
        startFerry([...sc.ferryDst, ...incoming], dir, { name: 'dst' }),
        startFerry(sc.ferrySrc, dir, { name: 'src' }),
      ]);
      await src.execute('migrate-set-parameters', { 'max-bandwidth': sc.maxBandwidth ?? 0, 'downtime-limit': 300 });
      if (sc.caps?.length) {
        await src.execute('migrate-set-capabilities', {
          capabilities: sc.caps.map((capability) => ({ capability, state: true })),
        });
        if (sc.caps.includes('compress')) {
          await dst.execute('migrate-set-capabilities', { capabilities: [{ capability: 'compress', state: true }] });
        }
      }
    } else {
      [dst, src] = await Promise.all([
        startQemu([...sc.qemuDst!(), ...incoming], dir, { name: 'dst' }),
        sc.qemuSrcVm ? sc.qemuSrcVm(dir) : startQemu(sc.qemuSrc!(), dir, { name: 'src' }),
      ]);
      await src.execute('migrate-set-parameters', { 'max-bandwidth': BIG_BW, 'downtime-limit': 300 });
    }
    if (sc.warmupMs) await sleep(sc.warmupMs);
    const s = src;
    const d = dst;
    const t0 = performance.now();
    await s.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    const info = await untilMigrationEnds(s, timeoutMs, 20);
    rec.wallToSrcDoneMs = performance.now() - t0;
    if (!info) {
      await s.execute('migrate_cancel').catch(() => undefined);
      rec.error = `did not complete within ${timeoutMs / 1000} s`;
      return rec;
    }
    if (info.status !== 'completed') {
      rec.error = `${info.status}: ${info['error-desc'] ?? ''}`;
      return rec;
    }
    const dstState = await untilIncomingRuns(d, 120000);
    rec.wallToDestDoneMs = performance.now() - t0;
    if (!dstState.ok) {
      rec.error = `destination ended in ${String(dstState.reached)}`;
      return rec;
    }
    const ram = info.ram ?? {};
    rec.ok = true;
    rec.totalTimeMs = info['total-time'];
    rec.downtimeMs = info.downtime;
    rec.setupTimeMs = info['setup-time'];
    rec.transferredBytes = ram.transferred;
    rec.mbps = ram.mbps;
    rec.dirtySyncCount = ram['dirty-sync-count'];
    rec.normal = ram.normal;
    rec.duplicate = ram.duplicate;
    if (rec.totalTimeMs && rec.totalTimeMs > 0) {
      rec.wireBytesPerSec = (rec.transferredBytes ?? 0) / (rec.totalTimeMs / 1000);
      rec.ramBytesPerSec = sc.ramBytes / (rec.totalTimeMs / 1000);
    }
    return rec;
  } catch (e) {
    rec.error = String(e instanceof Error ? e.message : e);
    return rec;
  } finally {
    await Promise.all([src?.quit(), dst?.quit()]);
  }
}

const KEYS = [
  'totalTimeMs', 'wallToDestDoneMs', 'downtimeMs', 'setupTimeMs', 'transferredBytes', 'mbps',
  'wireBytesPerSec', 'ramBytesPerSec', 'dirtySyncCount',
] as const;

function medians(runs: RunRecord[]): Record<string, number> {
  const ok = runs.filter((r) => r.ok);
  const m: Record<string, number> = { okRuns: ok.length, runs: runs.length };
  for (const k of KEYS) {
    const v = ok.map((r) => r[k]).filter((x): x is number => typeof x === 'number');
    if (v.length) m[k] = median(v);
  }
  return m;
}

const fmtMs = (v?: number): string => (v === undefined || Number.isNaN(v) ? '-' : `${Math.round(v)}`);
const fmtRate = (v?: number): string => (v === undefined ? '-' : `${(v / MiB).toFixed(0)}`);
const fmtBytes = (v?: number): string => (v === undefined ? '-' : `${(v / MiB).toFixed(1)}M`);

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

export async function main(argv = process.argv.slice(2)): Promise<void> {
  const has = (f: string): boolean => argv.includes(`--${f}`);
  const runs = Math.max(1, Number(arg('runs') ?? '3'));
  const only = arg('only')?.split(',');
  const withQemu = !has('no-qemu');
  const timeoutMs = Number(arg('timeout') ?? '180') * 1000;
  const list = scenarios().filter((s) => !only || only.includes(s.name));
  const facts = {
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model,
    node: process.version,
    qemu: safe(() => execFileSync('/usr/bin/qemu-system-x86_64', ['--version']).toString().split('\n')[0]),
    thp: safe(() => readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8').trim()),
    loadavgStart: loadavg(),
  };
  console.log(`migrate bench: ${runs} run(s) per scenario; ${facts.cpus} CPUs (${facts.cpuModel}); load ${facts.loadavgStart.map((x) => x.toFixed(2)).join(' ')}`);

  let loopback: Record<string, unknown> | null = null;
  if (!has('no-loopback')) loopback = await measureLoopback(2 * GiB, 2 * MiB, 3);
  const lbRate = (loopback?.medianBytesPerSec as number | undefined) ?? undefined;

  const out: Record<string, unknown>[] = [];
  for (const sc of list) {
    const engines: Engine[] = withQemu && (sc.qemuSrc || sc.qemuSrcVm) ? ['ferry', 'qemu'] : ['ferry'];
    const all: Record<Engine, RunRecord[]> = { ferry: [], qemu: [] };
    for (let i = 0; i < runs; i++) {
      // alternate the order so drift in the machine's load hits both evenly
      const order = i % 2 ? [...engines].reverse() : engines;
      for (const e of order) {
        const r = await runOnce(e, sc, timeoutMs);
        all[e].push(r);
        console.log(
          `  ${sc.name} ${e} #${i + 1}: ` +
            (r.ok
              ? `total ${fmtMs(r.totalTimeMs)} ms (dest done ${fmtMs(r.wallToDestDoneMs)}), downtime ${fmtMs(r.downtimeMs)} ms, ` +
                `setup ${fmtMs(r.setupTimeMs)} ms, ${fmtBytes(r.transferredBytes)} sent, ${fmtRate(r.wireBytesPerSec)} MiB/s wire, ` +
                `${fmtRate(r.ramBytesPerSec)} MiB/s RAM, mbps ${r.mbps?.toFixed(0)}, syncs ${r.dirtySyncCount}`
              : `FAILED ${r.error}`),
        );
      }
    }
    const mf = medians(all.ferry);
    const mq = engines.includes('qemu') ? medians(all.qemu) : null;
    const ratio = mq
      ? {
          totalTime: mf.totalTimeMs! / mq.totalTimeMs!,
          wallToDestDone: mf.wallToDestDoneMs! / mq.wallToDestDoneMs!,
          ramBytesPerSec: mf.ramBytesPerSec! / mq.ramBytesPerSec!,
          wireBytesPerSec: mf.wireBytesPerSec! / mq.wireBytesPerSec!,
          transferred: mf.transferredBytes! / mq.transferredBytes!,
        }
      : null;
    out.push({
      scenario: sc.name,
      what: sc.what,
      ramBytes: sc.ramBytes,
      ferry: { args: sc.ferrySrc, runs: all.ferry, median: mf },
      qemu: mq ? { args: sc.qemuSrc ? sc.qemuSrc() : ['memory-backend-ram loaded from the saved random stream (startQemuRandomSource)'], runs: all.qemu, median: mq } : { note: 'no equivalent QEMU guest workload without a kernel' },
      ratioFerryOverQemu: ratio,
      wireFractionOfLoopback: lbRate
        ? { ferry: (mf.wireBytesPerSec ?? NaN) / lbRate, qemu: mq ? (mq.wireBytesPerSec ?? NaN) / lbRate : null }
        : null,
    });
    cleanupTempDirs();
  }

  // summary
  console.log('\nmedians (ms, MiB/s); ratio = Ferry/QEMU (time: >1 means Ferry slower)');
  console.log(
    'scenario     engine  total  dest-done  downtime  setup  transferred  wire MiB/s  RAM MiB/s  %loopback  ratio(total)',
  );
  for (const r of out as any[]) {
    for (const e of ['ferry', 'qemu'] as const) {
      const m = r[e].median as Record<string, number> | undefined;
      if (!m) {
        console.log(`${r.scenario.padEnd(12)} ${e.padEnd(6)}  (no QEMU equivalent)`);
        continue;
      }
      const frac = lbRate && m.wireBytesPerSec ? `${((m.wireBytesPerSec / lbRate) * 100).toFixed(0)}%` : '-';
      console.log(
        `${r.scenario.padEnd(12)} ${e.padEnd(6)} ${fmtMs(m.totalTimeMs).padStart(6)} ${fmtMs(m.wallToDestDoneMs).padStart(10)} ` +
          `${fmtMs(m.downtimeMs).padStart(9)} ${fmtMs(m.setupTimeMs).padStart(6)} ${fmtBytes(m.transferredBytes).padStart(12)} ` +
          `${fmtRate(m.wireBytesPerSec).padStart(11)} ${fmtRate(m.ramBytesPerSec).padStart(10)} ${frac.padStart(10)}` +
          (e === 'ferry' && r.ratioFerryOverQemu ? `  ${r.ratioFerryOverQemu.totalTime.toFixed(2)}` : '') +
          ` (${m.okRuns}/${m.runs} ok)`,
      );
    }
  }
  if (lbRate) console.log(`loopback ceiling: ${(lbRate / MiB).toFixed(0)} MiB/s`);
  const p = writeResult('migrate', {
    bench: 'migrate',
    date: new Date().toISOString(),
    facts: { ...facts, loadavgEnd: loadavg() },
    settings: { downtimeLimitMs: 300, ferryMaxBandwidth: 0, qemuMaxBandwidth: BIG_BW, uri: 'tcp:127.0.0.1', runs },
    loopback,
    scenarios: out,
  });
  console.log(`wrote ${p}`);
}

function safe<T>(f: () => T): T | undefined {
  try {
    return f();
  } catch {
    return undefined;
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) await main();
