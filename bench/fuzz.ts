/**
 * `npm run fuzz [-- TARGET...]`: the long campaign, 10^6 inputs per target
 * (FERRY_FUZZ_RUNS to change), one target after the other; reproducers of
 * any finding go to fuzz-artifacts/. The counts and coverage are written to
 * docs/reliability.md when every target ran.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { REPO_ROOT } from '../test/helpers/vm.js';
import { writeSection } from '../test/reliability/report.js';
import { RSS_LIMIT_MB, runTarget, type FuzzRun } from '../test/fuzz/runner.js';
import { TARGETS } from '../test/fuzz/targets.js';

const runs = Number(process.env.FERRY_FUZZ_RUNS ?? 1_000_000);
const only = process.argv.slice(2);
const artifacts = join(REPO_ROOT, 'fuzz-artifacts');
mkdirSync(artifacts, { recursive: true });
const results: FuzzRun[] = [];
for (const t of TARGETS.filter((x) => only.length === 0 || only.includes(x.name))) {
  const r = await runTarget(t, { runs }, artifacts);
  results.push(r);
  console.log(`${t.name}: ${r.ok ? 'ok' : 'FINDING'}, ${r.runs} inputs in ${r.seconds.toFixed(0)} s, cov ${r.cov} ft ${r.ft}, corpus ${r.corpus}, rss ${r.rssMb} MB`);
  if (!r.ok) console.log(r.tail);
}
if (only.length === 0) {
  writeSection(
    'fuzz',
    [
      `Last \`npm run fuzz\` (${runs} inputs a target, RSS cap ${RSS_LIMIT_MB} MB, 10 s a input; ${new Date().toISOString().slice(0, 10)}):`,
      '',
      '| target | result | inputs | time | cov (edges) | ft (features) | corpus | peak RSS |',
      '|---|---|---|---|---|---|---|---|',
      ...results.map((r) => `| ${r.target} | ${r.ok ? 'no finding' : '**finding**'} | ${r.runs} | ${r.seconds.toFixed(0)} s | ${r.cov} | ${r.ft} | ${r.corpus} | ${r.rssMb} MB |`),
    ].join('\n'),
  );
}
process.exitCode = results.every((r) => r.ok) ? 0 : 1;
