/**
 * Where does the time go? Profiles one Ferry migration (default: 1 GiB
 * incompressible, `-fill random,seed=1`) with `node --cpu-prof` on the source
 * and the destination, quits both over QMP so the profiles are written, and
 * prints the top self-time functions of each side.
 *
 *   node dist/bench/profile.js [--scenario random|idle] [--top 15] [--keep DIR] [--prealloc] [--mem 4G (idle)]
 * (--prealloc: the destination faults its RAM in before it answers, so
 * that the profile shows the data path rather than first touches)
 * Writes bench/results/profile.json (+ the .cpuprofile files in the cache dir;
 * open them in Chrome DevTools or speedscope).
 */
import { mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { CACHE_DIR, REPO_ROOT, freePort, sleep, startFerry, tempDir, writeResult, type Vm } from './lib/common.js';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}

interface CpuProfile {
  nodes: { id: number; callFrame: { functionName: string; url: string; lineNumber: number }; children?: number[] }[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface SelfTime {
  fn: string;
  ms: number;
  pct: number;
  pctBusy: number;
}

/** Self time per function (by name+url+line), in ms, over the window [from, to] (µs, profile clock). */
export function selfTimes(p: CpuProfile, top: number): { totalMs: number; busyMs: number; top: SelfTime[] } {
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const acc = new Map<string, number>();
  let total = 0;
  let idle = 0;
  for (let i = 0; i < p.samples.length; i++) {
    const dt = (p.timeDeltas[i + 1] ?? 0) / 1000;
    const n = byId.get(p.samples[i]!)!;
    const cf = n.callFrame;
    const where = cf.url ? `${relative(REPO_ROOT, cf.url.replace(/^file:\/\//, ''))}:${cf.lineNumber + 1}` : '';
    const key = `${cf.functionName || '(anonymous)'}${where ? ' ' + where : ''}`;
    acc.set(key, (acc.get(key) ?? 0) + dt);
    total += dt;
    if (cf.functionName === '(idle)') idle += dt;
  }
  const busy = total - idle;
  const list = [...acc.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, top)
    .map(([fn, ms]) => ({ fn, ms: Math.round(ms), pct: +((ms / total) * 100).toFixed(1), pctBusy: fn.startsWith('(idle)') ? 0 : +((ms / busy) * 100).toFixed(1) }));
  return { totalMs: Math.round(total), busyMs: Math.round(busy), top: list };
}

const scenario = arg('scenario', 'random');
const top = Number(arg('top', '15'));
const profDir = arg('keep', join(CACHE_DIR, 'profiles', new Date().toISOString().replace(/[:.]/g, '-')));
mkdirSync(join(profDir, 'src'), { recursive: true });
mkdirSync(join(profDir, 'dst'), { recursive: true });
const dir = tempDir();
const port = await freePort();
const srcArgs = scenario === 'idle' ? ['-m', arg('mem', '1G'), '-workload', 'idle'] : ['-m', '1G', '-workload', 'idle', '-fill', 'random,seed=1'];
const prof = (d: string): string[] => ['--cpu-prof', `--cpu-prof-dir=${join(profDir, d)}`];
let src: Vm | null = null;
let dst: Vm | null = null;
let info: any;
try {
  [dst, src] = await Promise.all([
    startFerry(['-m', scenario === 'idle' ? arg('mem', '1G') : '1G', '-S', ...(process.argv.includes('--prealloc') ? ['-mem-prealloc'] : []), '-incoming', `tcp:127.0.0.1:${port}`], dir, { name: 'dst', nodeFlags: prof('dst') }),
    startFerry(srcArgs, dir, { name: 'src', nodeFlags: prof('src') }),
  ]);
  await src.execute('migrate-set-parameters', { 'max-bandwidth': 0, 'downtime-limit': 300 });
  await sleep(500);
  const t0 = performance.now();
  await src.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  for (;;) {
    info = await src.execute('query-migrate');
    if (['completed', 'failed', 'cancelled'].includes(info.status)) break;
    await sleep(50);
  }
  for (;;) {
    const st = (await dst.execute('query-status')).status;
    if (st !== 'inmigrate') break;
    await sleep(20);
  }
  const wall = performance.now() - t0;
  console.log(`migration ${info.status}: total-time ${info['total-time']} ms, dest done after ${Math.round(wall)} ms, ` +
    `${(info.ram?.transferred / 2 ** 20).toFixed(0)} MiB, mbps ${info.ram?.mbps?.toFixed(0)}`);
  info.wallToDestDoneMs = wall;
} finally {
  await Promise.all([src?.quit(), dst?.quit()]);
}

const out: Record<string, unknown> = { bench: 'profile', date: new Date().toISOString(), scenario, srcArgs, migration: info, profDir };
for (const side of ['src', 'dst']) {
  const files = readdirSync(join(profDir, side)).filter((f) => f.endsWith('.cpuprofile'));
  if (!files.length) {
    console.log(`${side}: no profile written`);
    continue;
  }
  const p = JSON.parse(readFileSync(join(profDir, side, files[0]!), 'utf8')) as CpuProfile;
  const s = selfTimes(p, top);
  out[side] = { file: join(profDir, side, files[0]!), ...s };
  console.log(`\n${side === 'src' ? 'SOURCE' : 'DESTINATION'}: ${s.totalMs} ms profiled, ${s.busyMs} ms busy (whole process life)`);
  for (const t of s.top) console.log(`  ${String(t.ms).padStart(6)} ms ${String(t.pct).padStart(5)}%  ${t.fn}`);
}
writeResult('profile', out);
