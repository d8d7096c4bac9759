/**
 * downtime-limit: a converging workload completes within the limit; a
 * non-converging one keeps iterating until cancelled (docs/spec/qmp.md E.2).
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runMigration } from '../helpers/migration.js';
import { cleanupAll, waitFor, waitMigration } from '../helpers/vm.js';

after(cleanupAll);

const MiB = 1 << 20;

describe('downtime-limit', () => {
  it('converging workload: completes, downtime within the limit; destination reports its downtime (return-path)', async () => {
    // completed on both sides, digests equal
    const { info, dinfo } = await runMigration({
      guest: { mem: '64M', fill: 'random,seed=5', workload: 'stress,rate=512K,seed=1' },
      capabilities: ['return-path'],
      source: { parameters: { 'max-bandwidth': 32 * MiB, 'downtime-limit': 300 } },
    });
    // Tolerance: the switch decision only guarantees that the *remaining RAM* fits
    // in downtime-limit at the measured bandwidth; reported downtime also covers
    // pausing the vCPUs, device state, the final flush and (return-path) waiting
    // for SHUT over a loaded 2-core box. We allow 300 ms on top of the limit.
    assert.ok(info.downtime <= 300 + 300, `downtime ${info.downtime} ms`);
    assert.ok(info['dirty-sync-count'] === undefined);
    assert.ok(info.ram['dirty-sync-count'] >= 2);
    const d = dinfo!;
    assert.equal(typeof d.downtime, 'number', JSON.stringify(d));
    assert.ok(d.downtime >= 0 && d.downtime <= 300 + 300 + 200, `destination downtime ${d.downtime}`);
  });

  it('non-converging workload keeps iterating until migrate_cancel', async () => {
    // 16M guest: the bulk pass takes ~4 s at 4 MiB/s; then a 2 MiB working set
    // rewritten at 64 MiB/s is always dirty again (2 MiB > threshold 4 MiB/s x 300 ms),
    // so each pass (~0.5 s) ends in a new sync and never in completion
    const { info } = await runMigration({
      guest: { mem: '16M', workload: 'stress,rate=64M,wss=2M,seed=2' },
      source: { parameters: { 'max-bandwidth': 4 * MiB, 'downtime-limit': 300 } },
      during: async ({ src }) => {
        await waitMigration(src, ['active'], 10000);
        const c0 = (await src.execute<any>('query-migrate')).ram['dirty-sync-count'];
        // dirty-sync-count rises while the status stays active
        await waitFor(async () => {
          const i = await src.execute<any>('query-migrate');
          assert.equal(i.status, 'active');
          return i.ram['dirty-sync-count'] >= c0 + 2;
        }, 30000, 'more dirty syncs');
        const t0 = performance.now();
        while (performance.now() - t0 < 2000) {
          assert.equal((await src.execute<any>('query-migrate')).status, 'active');
          await new Promise((r) => setTimeout(r, 200));
        }
        await src.execute('migrate_cancel');
      },
      expect: { source: 'cancelled', sourceRunState: 'running' },
    });
    assert.deepEqual(info, { status: 'cancelled' });
  });
});
