/**
 * max-bandwidth: the slope of ram.transferred matches the limit, and a change
 * in the middle of a migration takes effect at once (docs/spec/qmp.md E.1).
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runMigration } from '../helpers/migration.js';
import { cleanupAll, waitFor, waitMigration, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const MiB = 1 << 20;

/** Sample ram.transferred every ~250 ms for `ms`; least-squares slope in bytes/s. */
async function slope(vm: VmHandle, ms: number): Promise<number> {
  const pts: [number, number][] = [];
  const end = performance.now() + ms;
  while (performance.now() < end) {
    const i = await vm.execute<any>('query-migrate');
    assert.equal(i.status, 'active');
    pts.push([performance.now() / 1000, i.ram.transferred]);
    await new Promise((r) => setTimeout(r, 250));
  }
  const n = pts.length;
  const mx = pts.reduce((a, p) => a + p[0], 0) / n;
  const my = pts.reduce((a, p) => a + p[1], 0) / n;
  const num = pts.reduce((a, p) => a + (p[0] - mx) * (p[1] - my), 0);
  const den = pts.reduce((a, p) => a + (p[0] - mx) ** 2, 0);
  return num / den;
}

describe('rate limit', () => {
  it('8 MiB/s slope within 10 %, then 16 MiB/s mid-migration', async () => {
    await runMigration({
      // random fill: every page is a full 4 KiB record, so bytes track the limit
      guest: { mem: '64M', fill: 'random,seed=77' },
      source: { parameters: { 'max-bandwidth': 8 * MiB } },
      during: async ({ src }) => {
        await waitMigration(src, ['active'], 10000);
        // skip the first window (setup burst)
        await waitFor(async () => (await src.execute<any>('query-migrate')).ram.transferred > MiB, 10000, 'first MiB');
        const s1 = await slope(src, 3000);
        assert.ok(Math.abs(s1 - 8 * MiB) <= 0.1 * 8 * MiB, `slope ${(s1 / MiB).toFixed(2)} MiB/s, want 8 ± 10 %`);
        await src.execute('migrate-set-parameters', { 'max-bandwidth': 16 * MiB });
        await new Promise((r) => setTimeout(r, 300)); // let the running window end
        const s2 = await slope(src, 2000);
        assert.ok(Math.abs(s2 - 16 * MiB) <= 0.1 * 16 * MiB, `slope ${(s2 / MiB).toFixed(2)} MiB/s, want 16 ± 10 %`);
        await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
      },
      // then: completed, digests equal
    });
  });
});
