/**
 * `npm run bench [-- NAME... [--flags]]`: run every benchmark, or those named.
 * Each benchmark is its own script under dist/bench/, run in a child node
 * process (so one benchmark's heap and JIT state do not bleed into the next);
 * flags after the names are passed to each.
 *
 *   npm run bench                       all of them
 *   npm run bench -- migrate --runs 5   one, with its flags
 *   npm run bench -- loopback hugepage
 *   npm run bench -- postcopy --runs 3
 *   npm run bench -- block --only throughput
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const ALL = ['loopback', 'dirty-log', 'codec-ram', 'xbzrle', 'compress', 'hugepage', 'migrate', 'postcopy', 'tls', 'compare', 'multifd', 'forecast', 'replication', 'colo', 'block'];

const args = process.argv.slice(2);
const firstFlag = args.findIndex((a) => a.startsWith('--'));
const names = firstFlag < 0 ? args : args.slice(0, firstFlag);
const flags = firstFlag < 0 ? [] : args.slice(firstFlag);
const chosen = names.length ? names : ALL;

let failed = 0;
for (const n of chosen) {
  const file = join(here, `${n}.js`);
  if (!existsSync(file)) {
    console.error(`bench: no benchmark '${n}' (${file}); known: ${ALL.join(', ')}`);
    failed++;
    continue;
  }
  console.log(`\n=== bench ${n} ===`);
  const r = spawnSync(process.execPath, [file, ...flags], { stdio: 'inherit' });
  if (r.status !== 0) {
    console.error(`bench ${n}: exit ${r.status ?? r.signal}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
