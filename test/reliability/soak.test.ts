/**
 * 50 rounds of the soak (bench/soak.ts; `npm run soak` runs 1000): every
 * round completes with the same digest on both sides, and the process's
 * RSS and descriptors stay flat after a warm-up.
 */
import { it } from 'node:test';
import assert from 'node:assert/strict';
import { runSoak } from '../../bench/soak.js';

it('soak: 50 ping-pong migrations under a stress workload, alternating capabilities, same digests, flat RSS and descriptors', async () => {
  const r = await runSoak({ rounds: 50, ramMiB: 16 });
  console.log(`# soak: ${r.rounds} rounds, median ${r.msMedian.toFixed(0)} ms, rss ${r.rss.warm.toFixed(1)} -> ${r.rss.end.toFixed(1)} MiB (max ${r.rss.max.toFixed(1)}), fds ${r.fds.warm} -> ${r.fds.end} (max ${r.fds.max})`);
  assert.deepEqual(r.failures, []);
  assert.equal(r.rounds, 50);
  assert.equal(new Set(r.perRound.map((x) => x.caps)).size, 8, 'every capability set ran');
  assert.ok(r.fds.end <= r.fds.warm, `descriptors grew: ${JSON.stringify(r.fds)}`);
  // a leaked 16 MiB guest per round would add 640 MiB; allow the allocator's slack
  assert.ok(r.rss.end - r.rss.warm < 64, `RSS grew: ${JSON.stringify(r.rss)}`);
});
