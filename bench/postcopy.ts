/**
 * Postcopy benchmark: Ferry → Ferry postcopy under a dirtying guest that
 * precopy cannot converge on, plus a precopy-only attempt with the same
 * settings (to show it does not converge) and an idle-guest comparison with
 * QEMU 7.2 → QEMU 7.2 postcopy, all in the same run over tcp:127.0.0.1.
 *
 *   node dist/bench/postcopy.js [--runs 5] [--out file.json] [--no-qemu] [--no-precopy]
 *                               [--rate 100M] [--precopy-ms 2500] [--limit-s 15]
 *
 * stress (Ferry only; QEMU's -M none guest runs no code):
 *   both  `-m 256M -smp 1 -workload stress,seed=5,rate=100M,read=on -fill random,seed=1`
 *   dst   plus `-incoming tcp:127.0.0.1:PORT` (no -S: the guest runs, and faults, after the switch)
 *   caps  postcopy-ram + events on both; source max-bandwidth 50e6 (50 MB/s < the dirty rate),
 *         downtime-limit 300 ms; migrate, precopy for --precopy-ms, migrate-start-postcopy,
 *         wait until both sides report completed; then x-query-page-faults on the destination.
 * precopy-only: the same, without postcopy-ram, stopped after --limit-s with migrate_cancel.
 * idle (Ferry vs QEMU): 256M zero RAM, postcopy-ram on both sides, max-bandwidth 1 MB/s until the switch,
 *   migrate and migrate-start-postcopy at once.
 *
 * Goal reported against: destination fault latency p99 < 5 ms on loopback.
 * Writes bench/results/postcopy.json (or --out).
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  MIGRATION_ENDED,
  MiB,
  cleanupTempDirs,
  freePort,
  median,
  pollUntil,
  sleep,
  startFerry,
  startQemu,
  tempDir,
  untilMigrationEnds,
  writeResult,
  type Vm,
} from './lib/common.js';

type Engine = 'ferry' | 'qemu';

const RAM = '256M';
const STRESS_BW = 50e6;
/** idle scenario: 1 MB/s before the switch (256 MiB of zero pages need ~0.6 s), unlimited after it */
const IDLE_BW = 1e6;
const DOWNTIME_LIMIT = 300;
const GOAL_P99_US = 5000;

export interface PostcopyRun {
  engine: Engine;
  scenario: 'stress' | 'idle';
  ok: boolean;
  error?: string;
  /** the source's status right before migrate-start-postcopy (stress: must still be active) */
  statusAtSwitch?: string;
  /** source ram.remaining / dirty-sync-count right before the switch */
  remainingAtSwitch?: number;
  dirtySyncAtSwitch?: number;
  /** a postcopy-active state was seen (MIGRATION event or a poll) */
  sawPostcopyActive?: boolean;
  /** source: ms from the stop until the package was sent */
  srcDowntimeMs?: number;
  /**
   * QEMU 7.2 only: the raw `downtime` when it is larger than total-time. In
   * 7.2 a postcopy switch that took < 1 ms leaves s->downtime == 0, and
   * migration_calculate_complete() then "fills it in" as end_time -
   * downtime_start with downtime_start never set, i.e. the monotonic clock
   * (~ system uptime in ms). Recorded with the uptime to show it; the switch
   * downtime is then < 1 ms and counted as 0.
   */
  srcDowntimeRawMs?: number;
  uptimeMsAtEnd?: number;
  /** destination (Ferry only): ms from the source's stop until the guest ran here */
  dstDowntimeMs?: number;
  srcTotalTimeMs?: number;
  dstTotalTimeMs?: number;
  /** client-side: migrate → both sides completed (10 ms polling) */
  wallTotalMs?: number;
  /** client-side: migrate-start-postcopy → source completed / destination completed */
  switchToSrcDoneMs?: number;
  switchToDstDoneMs?: number;
  transferredBytes?: number;
  postcopyRequests?: number;
  dirtySyncCount?: number;
  faults?: number;
  faultP50Us?: number;
  faultP99Us?: number;
  faultMaxUs?: number;
  faultSamples?: number;
  dstStatus?: string;
}

const caps = (list: [string, boolean][]): object => ({
  capabilities: list.map(([capability, state]) => ({ capability, state })),
});

const stressArgs = (rate: string): string[] => [
  '-m', RAM, '-smp', '1', '-workload', `stress,seed=5,rate=${rate},read=on`, '-fill', 'random,seed=1',
];
const qemuRam = (): string[] => [
  '-M', 'none', '-object', `memory-backend-ram,id=m,size=${RAM}`, '-machine', 'memory-backend=m',
];

interface RunOpts {
  engine: Engine;
  scenario: 'stress' | 'idle';
  rate: string;
  /** ms of precopy before migrate-start-postcopy (0: at once) */
  precopyMs: number;
  timeoutMs: number;
}

async function start(engine: Engine, args: string[], dir: string, name: string): Promise<Vm> {
  return engine === 'ferry' ? startFerry(args, dir, { name }) : startQemu(args, dir, { name });
}

async function runPostcopy(o: RunOpts): Promise<PostcopyRun> {
  const dir = tempDir('pc-');
  const port = await freePort();
  const uri = `tcp:127.0.0.1:${port}`;
  const rec: PostcopyRun = { engine: o.engine, scenario: o.scenario, ok: false };
  let src: Vm | null = null;
  let dst: Vm | null = null;
  try {
    const base = o.engine === 'qemu' ? qemuRam() : o.scenario === 'stress' ? stressArgs(o.rate) : ['-m', RAM, '-smp', '1', '-workload', 'idle'];
    [dst, src] = await Promise.all([
      start(o.engine, [...base, '-incoming', uri], dir, 'dst'),
      start(o.engine, base, dir, 'src'),
    ]);
    const s = src;
    const d = dst;
    const c = caps([['postcopy-ram', true], ['events', true]]);
    await Promise.all([s.execute('migrate-set-capabilities', c), d.execute('migrate-set-capabilities', c)]);
    // idle: a low limit for both engines, so that the switch always comes
    // before precopy could finish (postcopy lifts the limit on both)
    const bw = o.scenario === 'stress' ? STRESS_BW : IDLE_BW;
    await s.execute('migrate-set-parameters', { 'max-bandwidth': bw, 'downtime-limit': DOWNTIME_LIMIT });
    if (o.scenario === 'stress') await sleep(500); // let the workload run first

    let sawPc = false;
    const t0 = performance.now();
    await s.execute('migrate', { uri });
    if (o.precopyMs > 0) await sleep(o.precopyMs);
    const before = await s.execute('query-migrate');
    rec.statusAtSwitch = before.status;
    rec.remainingAtSwitch = before.ram?.remaining;
    rec.dirtySyncAtSwitch = before.ram?.['dirty-sync-count'];
    if (o.scenario === 'stress' && before.status !== 'active') {
      rec.error = `source was ${before.status} at the switch (precopy converged or failed), not a postcopy run`;
      return rec;
    }
    const tPc = performance.now();
    await s.execute('migrate-start-postcopy');

    /** query-migrate of one side until it ends: its final info and when it came. */
    const side = { src: { vm: s, info: null as any, at: 0 }, dst: { vm: d, info: null as any, at: 0 } };
    const poll = async (x: (typeof side)['src']): Promise<void> => {
      if (x.info) return;
      const i = await x.vm.execute('query-migrate');
      if (i.status === 'postcopy-active') sawPc = true;
      if (MIGRATION_ENDED.includes(i.status)) {
        x.info = i;
        x.at = performance.now();
      }
    };
    const ok = await pollUntil(async () => {
      await poll(side.src);
      await poll(side.dst);
      return side.src.info && side.dst.info ? true : null;
    }, o.timeoutMs, 10);
    const srcInfo = side.src.info;
    const dstInfo = side.dst.info;
    const srcDoneAt = side.src.at;
    const dstDoneAt = side.dst.at;
    rec.wallTotalMs = Math.max(srcDoneAt, dstDoneAt) - t0;
    const evPc = (v: Vm): boolean =>
      v.qmp.eventLog.some((e) => e.event === 'MIGRATION' && (e.data as any)?.status === 'postcopy-active');
    rec.sawPostcopyActive = sawPc || evPc(s) || evPc(d);
    if (!ok) {
      await s.execute('migrate_cancel').catch(() => undefined);
      rec.error = `not completed within ${o.timeoutMs / 1000} s (src ${srcInfo?.status ?? 'busy'}, dst ${dstInfo?.status ?? 'busy'})`;
      return rec;
    }
    if (srcInfo.status !== 'completed' || dstInfo.status !== 'completed') {
      rec.error = `src ${srcInfo.status} ${srcInfo['error-desc'] ?? ''}; dst ${dstInfo.status} ${dstInfo['error-desc'] ?? ''}`.trim();
      return rec;
    }
    rec.switchToSrcDoneMs = srcDoneAt - tPc;
    rec.switchToDstDoneMs = dstDoneAt - tPc;
    rec.srcDowntimeMs = srcInfo.downtime;
    if (o.engine === 'qemu' && typeof srcInfo.downtime === 'number' && srcInfo.downtime > (srcInfo['total-time'] ?? 0)) {
      rec.srcDowntimeRawMs = srcInfo.downtime;
      rec.uptimeMsAtEnd = Math.round(Number(readFileSync('/proc/uptime', 'utf8').split(' ')[0]) * 1000);
      rec.srcDowntimeMs = 0;
    }
    rec.srcTotalTimeMs = srcInfo['total-time'];
    rec.dstDowntimeMs = dstInfo.downtime;
    rec.dstTotalTimeMs = dstInfo['total-time'];
    rec.transferredBytes = srcInfo.ram?.transferred;
    rec.postcopyRequests = srcInfo.ram?.['postcopy-requests'];
    rec.dirtySyncCount = srcInfo.ram?.['dirty-sync-count'];
    rec.dstStatus = (await d.execute('query-status')).status;
    if (o.engine === 'ferry') {
      if (o.scenario === 'stress') await sleep(200); // let the guest run on the destination a little
      const f = await d.execute('x-query-page-faults');
      rec.faults = f.faults;
      rec.faultP50Us = f['p50-us'];
      rec.faultP99Us = f['p99-us'];
      rec.faultMaxUs = f['max-us'];
      rec.faultSamples = f.samples;
    }
    if (!rec.sawPostcopyActive) {
      rec.error = 'completed without passing through postcopy-active';
      return rec;
    }
    if (rec.dstStatus !== 'running') {
      rec.error = `destination ended in ${rec.dstStatus}`;
      return rec;
    }
    rec.ok = true;
    return rec;
  } catch (e) {
    rec.error = String(e instanceof Error ? e.message : e);
    return rec;
  } finally {
    await Promise.all([src?.quit(), dst?.quit()]);
  }
}

/** Precopy only, same guest and bandwidth: does it converge within limitMs? */
async function runPrecopyOnly(rate: string, limitMs: number): Promise<Record<string, unknown>> {
  const dir = tempDir('pre-');
  const port = await freePort();
  const uri = `tcp:127.0.0.1:${port}`;
  let src: Vm | null = null;
  let dst: Vm | null = null;
  const rec: Record<string, unknown> = { limitMs, maxBandwidth: STRESS_BW, downtimeLimitMs: DOWNTIME_LIMIT };
  try {
    [dst, src] = await Promise.all([
      startFerry([...stressArgs(rate), '-incoming', uri], dir, { name: 'dst' }),
      startFerry(stressArgs(rate), dir, { name: 'src' }),
    ]);
    const s = src;
    await s.execute('migrate-set-parameters', { 'max-bandwidth': STRESS_BW, 'downtime-limit': DOWNTIME_LIMIT });
    await sleep(500);
    const t0 = performance.now();
    await s.execute('migrate', { uri });
    const done = await untilMigrationEnds(s, limitMs, 50);
    rec.elapsedMs = performance.now() - t0;
    const i = done ?? (await s.execute('query-migrate'));
    rec.statusAtLimit = i.status;
    rec.converged = i.status === 'completed';
    rec.remainingBytes = i.ram?.remaining;
    rec.dirtySyncCount = i.ram?.['dirty-sync-count'];
    rec.transferredBytes = i.ram?.transferred;
    rec.dirtyPagesRate = i.ram?.['dirty-pages-rate'];
    rec.expectedDowntimeMs = i['expected-downtime'];
    if (!done) {
      await s.execute('migrate_cancel');
      const c = await untilMigrationEnds(s, 10000, 20);
      rec.statusAfterCancel = c?.status ?? 'still cancelling after 10 s';
      rec.srcRunStateAfterCancel = (await s.execute('query-status')).status;
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
  'srcDowntimeMs', 'dstDowntimeMs', 'faultP50Us', 'faultP99Us', 'faultMaxUs', 'faults', 'srcTotalTimeMs',
  'dstTotalTimeMs', 'wallTotalMs', 'switchToSrcDoneMs', 'switchToDstDoneMs', 'transferredBytes', 'postcopyRequests',
  'remainingAtSwitch', 'dirtySyncCount',
] as const;

function medians(runs: PostcopyRun[]): Record<string, number> {
  const ok = runs.filter((r) => r.ok);
  const m: Record<string, number> = { okRuns: ok.length, runs: runs.length };
  for (const k of KEYS) {
    const v = ok.map((r) => r[k]).filter((x): x is number => typeof x === 'number');
    if (v.length) m[k] = median(v);
  }
  return m;
}

const f0 = (v?: number): string => (v === undefined || Number.isNaN(v) ? '-' : `${Math.round(v)}`);
const fMiB = (v?: number): string => (v === undefined ? '-' : `${(v / MiB).toFixed(1)}M`);

function describe(r: PostcopyRun): string {
  if (!r.ok) return `FAILED ${r.error}`;
  return (
    `downtime src ${f0(r.srcDowntimeMs)} / dst ${f0(r.dstDowntimeMs)} ms, total ${f0(r.srcTotalTimeMs)} ms ` +
    `(wall ${f0(r.wallTotalMs)}), switch→done src ${f0(r.switchToSrcDoneMs)} / dst ${f0(r.switchToDstDoneMs)} ms, ` +
    `${fMiB(r.transferredBytes)} sent, ${r.postcopyRequests ?? '-'} requests` +
    (r.faults !== undefined
      ? `, faults ${r.faults} p50 ${f0(r.faultP50Us)} p99 ${f0(r.faultP99Us)} max ${f0(r.faultMaxUs)} µs`
      : '')
  );
}

function flag(argv: string[], name: string): string | undefined {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : undefined;
}

function safe<T>(f: () => T): T | undefined {
  try {
    return f();
  } catch {
    return undefined;
  }
}

export async function main(argv = process.argv.slice(2)): Promise<void> {
  const has = (f: string): boolean => argv.includes(`--${f}`);
  const runs = Math.max(1, Number(flag(argv, 'runs') ?? '5'));
  const rate = flag(argv, 'rate') ?? '100M';
  const precopyMs = Number(flag(argv, 'precopy-ms') ?? '2500');
  const limitMs = Number(flag(argv, 'limit-s') ?? '15') * 1000;
  const out = flag(argv, 'out');
  const withQemu = !has('no-qemu');
  const timeoutMs = 60000;
  const tStart = performance.now();
  const facts = {
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model,
    node: process.version,
    qemu: safe(() => execFileSync('/usr/bin/qemu-system-x86_64', ['--version']).toString().split('\n')[0]),
    loadavgStart: loadavg(),
  };
  console.log(
    `postcopy bench: ${runs} run(s); ${facts.cpus} CPUs; load ${facts.loadavgStart.map((x) => x.toFixed(2)).join(' ')}`,
  );

  // 1. stress: Ferry postcopy
  const stress: PostcopyRun[] = [];
  for (let i = 0; i < runs; i++) {
    const r = await runPostcopy({ engine: 'ferry', scenario: 'stress', rate, precopyMs, timeoutMs });
    stress.push(r);
    console.log(`  stress ferry #${i + 1}: ${describe(r)}`);
    cleanupTempDirs();
  }
  const ms = medians(stress);

  // 2. precopy only, same settings, time-limited
  let precopy: Record<string, unknown> | null = null;
  if (!has('no-precopy')) {
    precopy = await runPrecopyOnly(rate, limitMs);
    cleanupTempDirs();
    console.log(
      `  precopy-only (${limitMs / 1000} s limit): ${precopy.statusAtLimit}, remaining ${fMiB(precopy.remainingBytes as number)}, ` +
        `dirty-sync-count ${precopy.dirtySyncCount}, ${fMiB(precopy.transferredBytes as number)} sent` +
        (precopy.statusAfterCancel ? `, then migrate_cancel → ${precopy.statusAfterCancel}` : '') +
        (precopy.error ? ` ERROR ${precopy.error}` : ''),
    );
  }

  // 3. idle: Ferry vs QEMU, alternating order
  const idle: Record<Engine, PostcopyRun[]> = { ferry: [], qemu: [] };
  const engines: Engine[] = withQemu ? ['ferry', 'qemu'] : ['ferry'];
  for (let i = 0; i < runs; i++) {
    for (const e of i % 2 ? [...engines].reverse() : engines) {
      const r = await runPostcopy({ engine: e, scenario: 'idle', rate, precopyMs: 0, timeoutMs });
      idle[e].push(r);
      console.log(`  idle ${e} #${i + 1}: ${describe(r)}`);
      cleanupTempDirs();
    }
  }
  const mif = medians(idle.ferry);
  const miq = withQemu ? medians(idle.qemu) : null;
  const ratio =
    miq && miq.okRuns > 0 && mif.okRuns > 0
      ? {
          // QEMU's switch downtime is usually < 1 ms (reported as 0): no ratio then
          srcDowntime: miq.srcDowntimeMs! > 0 ? mif.srcDowntimeMs! / miq.srcDowntimeMs! : null,
          totalTime: mif.srcTotalTimeMs! / miq.srcTotalTimeMs!,
          wallTotal: mif.wallTotalMs! / miq.wallTotalMs!,
          transferred: mif.transferredBytes! / miq.transferredBytes!,
        }
      : null;
  const qemuNote = !withQemu
    ? 'skipped (--no-qemu)'
    : miq && miq.okRuns === 0
      ? `QEMU postcopy failed here: ${idle.qemu.map((r) => r.error).filter(Boolean)[0]}`
      : 'QEMU -M none runs no guest code: idle comparison only; its destination reports no downtime/total-time and has no fault statistics';

  const p99 = ms.faultP99Us;
  const goal = {
    goal: `destination fault latency p99 < ${GOAL_P99_US / 1000} ms on loopback (stress, median over runs)`,
    medianP99Us: p99 ?? null,
    worstRunP99Us: stress.filter((r) => r.ok && r.faultP99Us !== undefined).reduce((a, r) => Math.max(a, r.faultP99Us!), 0) || null,
    met: p99 !== undefined ? p99 < GOAL_P99_US : false,
    runsMeeting: stress.filter((r) => r.ok && (r.faultP99Us ?? Infinity) < GOAL_P99_US).length,
  };

  console.log(`\nstress (${rate}B/s dirtying, read=on, max-bandwidth ${STRESS_BW / 1e6} MB/s, ${precopyMs} ms precopy), medians of ${ms.okRuns}/${ms.runs}:`);
  console.log(
    `  downtime src ${f0(ms.srcDowntimeMs)} ms / dst ${f0(ms.dstDowntimeMs)} ms; faults ${f0(ms.faults)}: ` +
      `p50 ${f0(ms.faultP50Us)} µs, p99 ${f0(ms.faultP99Us)} µs, max ${f0(ms.faultMaxUs)} µs`,
  );
  console.log(
    `  remaining at the switch ${fMiB(ms.remainingAtSwitch)}; total ${f0(ms.srcTotalTimeMs)} ms (src total-time; wall ${f0(ms.wallTotalMs)}), start-postcopy→completed ` +
      `src ${f0(ms.switchToSrcDoneMs)} / dst ${f0(ms.switchToDstDoneMs)} ms, ${fMiB(ms.transferredBytes)} sent, ` +
      `${f0(ms.postcopyRequests)} postcopy-requests`,
  );
  console.log(
    `  goal p99 < ${GOAL_P99_US / 1000} ms: ${goal.met ? 'MET' : 'UNMET'} (median p99 ${f0(p99)} µs; ${goal.runsMeeting}/${ms.okRuns} runs under)`,
  );
  console.log(`idle 256M postcopy, medians:`);
  for (const [e, m] of [['ferry', mif], ['qemu', miq]] as const) {
    if (!m) continue;
    console.log(
      `  ${e.padEnd(5)} downtime src ${f0(m.srcDowntimeMs)} ms, total ${f0(m.srcTotalTimeMs)} ms (wall ${f0(m.wallTotalMs)}), ` +
        `${fMiB(m.transferredBytes)} sent (${m.okRuns}/${m.runs} ok)`,
    );
  }
  if (ratio) {
    console.log(
      `  Ferry/QEMU: downtime ${ratio.srcDowntime === null ? 'n/a (QEMU < 1 ms)' : ratio.srcDowntime.toFixed(2)}, ` +
        `total ${ratio.totalTime.toFixed(2)}, bytes ${ratio.transferred.toFixed(2)}`,
    );
  }
  console.log(`  ${qemuNote}`);

  const result = {
    bench: 'postcopy',
    date: new Date().toISOString(),
    facts: { ...facts, loadavgEnd: loadavg() },
    settings: {
      uri: 'tcp:127.0.0.1',
      runs,
      ram: RAM,
      stress: {
        args: stressArgs(rate),
        maxBandwidth: STRESS_BW,
        downtimeLimitMs: DOWNTIME_LIMIT,
        warmupMs: 500,
        precopyBeforeSwitchMs: precopyMs,
        capabilities: ['postcopy-ram', 'events'],
      },
      idle: {
        ferryArgs: ['-m', RAM, '-smp', '1', '-workload', 'idle'],
        qemuArgs: qemuRam(),
        maxBandwidthBeforeSwitch: IDLE_BW,
        switch: 'migrate-start-postcopy right after migrate',
      },
    },
    goal,
    stress: { runs: stress, median: ms },
    precopyOnly: precopy,
    idle: {
      ferry: { runs: idle.ferry, median: mif },
      qemu: withQemu ? { runs: idle.qemu, median: miq } : null,
      ratioFerryOverQemu: ratio,
      note: qemuNote,
    },
    elapsedMs: Math.round(performance.now() - tStart),
  };
  let p: string;
  if (out) {
    p = resolve(out);
    mkdirSync(dirname(p), { recursive: true });
    writeFileSync(p, JSON.stringify(result, null, 2) + '\n');
  } else {
    p = writeResult('postcopy', result);
  }
  console.log(`wrote ${p} (${(result.elapsedMs / 1000).toFixed(0)} s)`);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) await main();
