/**
 * `npm run bench -- forecast [--runs N] [--run-from K] [--mem SIZE] [--only I,J] [--reports DIR]`:
 * how good is x-query-migrate-forecast?
 *
 * For each scenario (a dirty rate and working set of the guest's stress
 * workload, and a max-bandwidth), two fresh `ferry vm` processes: the
 * source measures its dirty rate (calc-dirty-rate, 1 s, page-sampling at
 * 4096 pages/GiB), asks for the forecast, migrates, and the actual
 * total-time is compared with the forecast's band. A scenario the forecast
 * says will not converge is run too, and counts as right when it has not
 * completed after twice the time a one-pass copy would take plus 10 s
 * (then it is cancelled).
 *
 * The baseline is the estimate one makes by hand (and the only one QEMU's
 * figures allow before a migration): RAM / bandwidth. Its error is
 * reported beside the forecast's.
 *
 * Every run starts new processes (the destination receives into fresh
 * memory, as in production); results go to bench/results/forecast.json.
 * With --reports DIR every scenario also writes its `ferry report` page.
 */
import { join, resolve } from 'node:path';
import { collectReport, writeReport } from '../src/report/collect.js';
import type { MigrationForecast } from '../src/generated/qapi-types.js';
import { MiB, cleanupTempDirs, median, pollUntil, sleep, startFerry, tempDir, writeResult, type Vm } from './lib/common.js';

interface Scenario {
  /** stress workload rate (bytes/s) */
  rate: number;
  /** its working set (bytes; 0: all of RAM) */
  wss: number;
  /** max-bandwidth (bytes/s) */
  bandwidth: number;
}

const M = 1 << 20;
const SCENARIOS: Scenario[] = [];
for (const bandwidth of [32e6, 64e6, 128e6]) {
  for (const [rate, wss] of [[0, 0], [4 * M, 0], [16 * M, 32 * M], [24 * M, 0], [48 * M, 16 * M], [64 * M, 0]] as const) {
    SCENARIOS.push({ rate, wss, bandwidth });
  }
}

interface Row {
  scenario: string;
  run: number;
  predicted: { converges: boolean; low?: number; expected?: number; high?: number; dirtyRate: number; workingSet?: number };
  actual: { completed: boolean; totalMs?: number; downtimeMs?: number; passes?: number };
  hit: boolean;
  naiveMs: number;
  naiveErr?: number;
  forecastErr?: number;
}

function args() {
  const a = process.argv.slice(2);
  const get = (k: string) => {
    const i = a.indexOf(k);
    return i >= 0 ? a[i + 1] : undefined;
  };
  const mem = get('--mem') ?? '128M';
  return {
    runs: Number(get('--runs') ?? 1),
    mem,
    memBytes: Number(mem.replace(/M$/i, '')) * MiB,
    only: get('--only')?.split(',').map(Number),
    /** the first run's number (runs differ in their workload and fill seeds) */
    from: Number(get('--run-from') ?? 0),
    reports: get('--reports'),
  };
}

const name = (s: Scenario) => `rate=${s.rate / M}M${s.wss ? ` wss=${s.wss / M}M` : ''} bw=${s.bandwidth / 1e6}MB/s`;

async function runOne(s: Scenario, run: number, o: ReturnType<typeof args>): Promise<Row> {
  const dir = tempDir('forecast-');
  const workload = s.rate === 0 ? 'idle' : `stress,rate=${s.rate},seed=${run + 1}${s.wss ? `,wss=${s.wss}` : ''}`;
  const guest = ['-m', o.mem, '-smp', '2', '-workload', workload, '-fill', `text,seed=${run + 1}`];
  let src: Vm | undefined;
  let dst: Vm | undefined;
  try {
    [src, dst] = await Promise.all([startFerry(guest, dir, { name: 'src' }), startFerry([...guest.slice(0, 6), '-incoming', 'defer'], dir, { name: 'dst' })]);
    const a = src.api;
    await a.calcDirtyRate({ 'calc-time': 1, 'sample-pages': 4096 });
    await pollUntil(async () => (await a.queryDirtyRate()).status === 'measured', 10000, 50);
    await a.migrateSetParameters({ 'max-bandwidth': s.bandwidth, 'downtime-limit': 300 });
    await a.migrateSetCapabilities({ capabilities: [{ capability: 'return-path', state: true }] });
    if (o.reports) {
      await a.xTraceMigration({ enable: true });
      await dst.api.xTraceMigration({ enable: true });
    }
    const f: MigrationForecast = await a.xQueryMigrateForecast();
    const uri = `unix:${join(dir, 'm.sock')}`;
    await dst.api.migrateIncoming({ uri });
    const naiveMs = (o.memBytes / s.bandwidth) * 1000;
    const limitMs = f.converges ? Math.max(60000, (f['total-time']!.high ?? f['total-time']!.expected) * 3) : naiveMs * 2 + 10000;
    await a.migrate({ uri });
    const info = await pollUntil(async () => {
      const i = await a.queryMigrate();
      return ['completed', 'failed', 'cancelled'].includes(i.status ?? '') ? i : null;
    }, limitMs, 20);
    if (!info) {
      await a.migrateCancel();
      await pollUntil(async () => ((await a.queryMigrate()).status === 'cancelled' ? true : null), 20000, 50);
    }
    const completed = info?.status === 'completed';
    const total = completed ? info['total-time'] : undefined;
    const tt = f['total-time'];
    const hit = f.converges ? completed && tt !== undefined && total! >= tt.low && (tt.high === undefined || total! <= tt.high) : !completed;
    const row: Row = {
      scenario: name(s),
      run,
      predicted: { converges: f.converges, low: tt?.low, expected: tt?.expected, high: tt?.high, dirtyRate: f['dirty-rate'], workingSet: f['working-set'] },
      actual: { completed, totalMs: total, downtimeMs: info?.downtime, passes: info?.ram?.['dirty-sync-count'] },
      hit,
      naiveMs: Math.round(naiveMs),
    };
    if (completed) {
      row.naiveErr = Math.round(((naiveMs - total!) / total!) * 1000) / 1000;
      if (tt) row.forecastErr = Math.round(((tt.expected - total!) / total!) * 1000) / 1000;
    }
    if (o.reports) {
      if (completed) await pollUntil(async () => ((await dst!.api.queryMigrate()).status === 'completed' ? true : null), 10000, 50);
      const r = await collectReport(a, dst.api, { title: `bench forecast: ${name(s)} (run ${run})`, setup: `${o.mem} guest, ${workload}` });
      writeReport(r, resolve(o.reports, `forecast-${name(s).replace(/[^a-zA-Z0-9=.]+/g, '_')}-run${run}.html`));
    }
    return row;
  } finally {
    await Promise.all([src?.quit(), dst?.quit()]);
  }
}

async function main(): Promise<void> {
  const o = args();
  const chosen = SCENARIOS.map((s, i) => ({ s, i })).filter(({ i }) => !o.only || o.only.includes(i));
  const rows: Row[] = [];
  console.log(`forecast bench: ${chosen.length} scenarios × ${o.runs} runs, ${o.mem} guests, downtime-limit 300 ms`);
  console.log('scenario                              predicted (band)                   actual       hit   naive err  forecast err');
  for (let run = o.from; run < o.from + o.runs; run++) {
    for (const { s } of chosen) {
      const r = await runOne(s, run, o);
      rows.push(r);
      const p = r.predicted;
      const band = p.converges ? `${p.expected} (${p.low}–${p.high ?? '?'}) ms` : 'does not converge';
      const act = r.actual.completed ? `${r.actual.totalMs} ms` : 'not done';
      const pct = (v?: number) => (v === undefined ? '-' : `${(v * 100).toFixed(0)}%`);
      console.log(`${r.scenario.padEnd(37)} ${band.padEnd(34)} ${act.padEnd(12)} ${r.hit ? 'yes' : 'NO '}   ${pct(r.naiveErr).padStart(8)}  ${pct(r.forecastErr).padStart(8)}`);
      await sleep(200);
    }
  }
  const hits = rows.filter((r) => r.hit).length;
  const conv = rows.filter((r) => r.predicted.converges && r.actual.completed);
  const naiveAbs = conv.map((r) => Math.abs(r.naiveErr!));
  const fcAbs = conv.filter((r) => r.forecastErr !== undefined).map((r) => Math.abs(r.forecastErr!));
  const naiveIn20 = conv.filter((r) => Math.abs(r.naiveErr!) <= 0.2).length;
  const summary = {
    runs: rows.length,
    inBand: hits,
    inBandShare: hits / rows.length,
    predictedNotConverging: rows.filter((r) => !r.predicted.converges).length,
    notConvergingRight: rows.filter((r) => !r.predicted.converges && !r.actual.completed).length,
    medianAbsErrForecast: median(fcAbs),
    medianAbsErrNaive: median(naiveAbs),
    naiveWithin20pct: naiveIn20,
    completedAndPredicted: conv.length,
  };
  console.log(
    `\nin the band: ${hits}/${rows.length} (${((hits / rows.length) * 100).toFixed(0)}%); ` +
      `predicted not to converge: ${summary.predictedNotConverging} (right: ${summary.notConvergingRight}); ` +
      `median |error| of the expected value ${(summary.medianAbsErrForecast * 100).toFixed(1)}% vs RAM/bandwidth ${(summary.medianAbsErrNaive * 100).toFixed(1)}% ` +
      `(RAM/bandwidth within ±20%: ${naiveIn20}/${conv.length})`,
  );
  const file = writeResult(`forecast${o.only ? `-${o.only.join('_')}` : ''}${o.from ? `-from${o.from}` : ''}`, { when: new Date().toISOString(), options: o, summary, rows });
  console.log(`results: ${file}`);
  cleanupTempDirs();
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
