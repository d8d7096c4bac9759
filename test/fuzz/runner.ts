/**
 * Runs one target under Jazzer.js (libFuzzer, coverage-guided) in a child
 * process: the seed corpus is read from the repository, new inputs go to a
 * temp directory, the RSS is capped (-rss_limit_mb), every input has a time
 * limit (-timeout), and a crash, a hang or an internal error (targets.ts)
 * leaves a reproducer in the artifact directory and a non-zero exit.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { REPO_ROOT } from '../helpers/vm.js';
import type { Target } from './targets.js';

export interface FuzzRun {
  target: string;
  ok: boolean;
  runs: number;
  seconds: number;
  /** edges covered in the instrumented files, and features (libFuzzer's cov / ft) */
  cov: number;
  ft: number;
  corpus: number;
  rssMb: number;
  /** the tail of the output (on failure, the reproducer is named there) */
  tail: string;
}

export const RSS_LIMIT_MB = 1536;

export async function runTarget(t: Target, limit: { seconds?: number; runs?: number }, artifacts?: string): Promise<FuzzRun> {
  const work = mkdtempSync(join(tmpdir(), `ferry-fuzz-${t.name}-`));
  const jazzer = join(REPO_ROOT, 'node_modules', '@jazzer.js', 'core', 'dist', 'cli.js');
  const args = [
    jazzer,
    join(REPO_ROOT, 'dist', 'test', 'fuzz', 'entry.js'),
    work,
    join(REPO_ROOT, t.seeds),
    ...t.instrument.flatMap((i) => ['-i', `dist/${i}`]),
    ...(t.sync ? ['--sync'] : []),
    '--',
    `-rss_limit_mb=${RSS_LIMIT_MB}`,
    '-timeout=10',
    '-max_len=131072',
    `-artifact_prefix=${artifacts ?? work}/`,
    ...(limit.seconds ? [`-max_total_time=${limit.seconds}`] : []),
    ...(limit.runs ? [`-runs=${limit.runs}`] : []),
  ];
  const t0 = Date.now();
  const out: string[] = [];
  const code = await new Promise<number | null>((resolve) => {
    const c = spawn(process.execPath, args, { cwd: REPO_ROOT, env: { ...process.env, FERRY_FUZZ_TARGET: t.name }, stdio: ['ignore', 'pipe', 'pipe'] });
    const keep = (d: Buffer): void => {
      out.push(d.toString());
      if (out.length > 400) out.splice(0, 200);
    };
    c.stdout.on('data', keep);
    c.stderr.on('data', keep);
    c.on('exit', (code) => resolve(code));
  });
  const text = out.join('');
  const stats = [...text.matchAll(/#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)\/\S+.*?rss: (\d+)Mb/g)].at(-1);
  const done = /Done (\d+) runs in (\d+) second/.exec(text);
  const corpus = readdirSync(work).length;
  rmSync(work, { recursive: true, force: true });
  return {
    target: t.name,
    ok: code === 0,
    runs: done ? Number(done[1]) : stats ? Number(stats[1]) : 0,
    seconds: (Date.now() - t0) / 1000,
    cov: stats ? Number(stats[2]) : 0,
    ft: stats ? Number(stats[3]) : 0,
    corpus: stats ? Number(stats[4]) : corpus,
    rssMb: stats ? Number(stats[5]) : 0,
    tail: text.slice(-3000),
  };
}
