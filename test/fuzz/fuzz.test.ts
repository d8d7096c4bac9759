/**
 * A short coverage-guided run of every fuzz target (npm test). The long
 * campaigns are `npm run fuzz` (bench/fuzz.ts). 6 s a target keeps npm test within its budget.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runTarget } from './runner.js';
import { TARGETS } from './targets.js';

const SECONDS = Number(process.env.FERRY_FUZZ_SECONDS ?? 6);

describe('fuzzing (Jazzer.js, short runs)', () => {
  for (const t of TARGETS) {
    it(`${t.name}: ${SECONDS} s without a crash, a hang or an internal error`, async (ctx) => {
      const r = await runTarget(t, { seconds: SECONDS });
      ctx.diagnostic(`${r.runs} inputs, cov ${r.cov} ft ${r.ft}, corpus ${r.corpus}, rss ${r.rssMb} MB`);
      assert.ok(r.ok, r.tail);
      assert.ok(r.runs > 100, `the fuzzer ran: ${r.tail}`);
    });
  }
});
