/**
 * auto-converge (docs/spec/qmp.md E.3): a workload that never converges at the given
 * bandwidth and downtime-limit converges once its vCPUs are throttled;
 * cpu-throttle-percentage shows while throttled (D.1) and the throttle is
 * lifted when the migration ends, whatever the outcome.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runMigration, type MigrationSpec } from '../helpers/migration.js';
import { cleanupAll, waitFor, waitMigration, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const MiB = 1 << 20;
// 16M guest; the vCPU rewrites whole pages of a 12 MiB working set, 1024 pages
// a second, which dirties ~870 new pages a second; sent at 2 MiB/s (512 pages
// a second) with a 100 ms downtime-limit, a pass never ends with less than the
// ~25 pages that would fit, so without throttling it never completes. At 50 %
// the guest dirties about as fast as it is sent, at 70 % clearly slower.
const PAIR: MigrationSpec = {
  guest: { mem: '16M', smp: 1, workload: 'stress,rate=4M,wss=12M,write=4096,seed=3' },
  source: { parameters: { 'max-bandwidth': 2 * MiB, 'downtime-limit': 100, 'cpu-throttle-initial': 50, 'cpu-throttle-increment': 20 } },
};

const query = (vm: VmHandle) => vm.execute<Record<string, any>>('query-migrate');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('auto-converge', () => {
  it('without the capability the workload does not converge', async () => {
    const { info } = await runMigration({
      ...PAIR,
      during: async ({ src }) => {
        await waitMigration(src, ['active'], 10000);
        // bulk pass ~4 s, then passes of ~1 s that never fit the limit
        await sleep(10000);
        const i = await query(src);
        assert.equal(i.status, 'active', JSON.stringify(i));
        assert.equal(i['cpu-throttle-percentage'], undefined);
        assert.ok(i.ram['dirty-sync-count'] >= 3, JSON.stringify(i));
        await src.execute('migrate_cancel');
      },
      expect: { source: 'cancelled' },
    });
    assert.deepEqual(info, { status: 'cancelled' });
  });

  it('with it: the throttle appears and rises, the guest slows down, the migration completes and the throttle is lifted', async () => {
    // then the harness: completed on both sides, digests equal
    await runMigration({
      ...PAIR,
      capabilities: ['auto-converge'],
      during: async ({ src }) => {
        await waitMigration(src, ['active'], 10000);
        // the unthrottled dirty rate, from the first periods after the bulk stage
        const seen: number[] = [];
        // dirty-pages-rate of the period that set the first throttle (it ran
        // unthrottled), and of periods that ran entirely under a throttle >= 50 %
        let unthrottled = 0;
        let firstAt = 0;
        const throttled: number[] = [];
        let info: Record<string, any>;
        for (;;) {
          info = await query(src);
          if (info.status !== 'active') break;
          const pct = info['cpu-throttle-percentage'];
          if (pct !== undefined) {
            if (seen.length === 0) {
              unthrottled = info.ram['dirty-pages-rate'];
              firstAt = performance.now();
            } else if (performance.now() - firstAt > 1500) {
              throttled.push(info.ram['dirty-pages-rate']);
            }
            if (seen[seen.length - 1] !== pct) seen.push(pct);
          }
          await sleep(50);
        }
        assert.equal(info.status, 'completed', JSON.stringify(info));
        assert.equal(info['cpu-throttle-percentage'], undefined, JSON.stringify(info));
        assert.equal(seen[0], 50, `throttle steps ${seen}`);
        assert.ok(seen.length >= 2, `throttle rose: ${seen}`);
        for (let k = 1; k < seen.length; k++) assert.equal(seen[k], Math.min(99, seen[k - 1]! + 20), `throttle steps ${seen}`);
        assert.ok(throttled.length > 0 && unthrottled > 0);
        const worst = Math.max(...throttled);
        assert.ok(worst < unthrottled * 0.75, `dirty-pages-rate throttled ${throttled} vs unthrottled ${unthrottled}`);
      },
    });
  });

  it('migrate_cancel: cpu-throttle-percentage is gone and the guest runs (the machine-level lift is in test/unit/mig-autoconverge)', async () => {
    const { info } = await runMigration({
      ...PAIR,
      capabilities: ['auto-converge'],
      during: async ({ src }) => {
        const first = await waitFor<Record<string, any> | null>(async () => {
          const i = await query(src);
          assert.ok(['setup', 'active'].includes(i.status), JSON.stringify(i));
          return i['cpu-throttle-percentage'] !== undefined ? i : null;
        }, 30000, 'cpu-throttle-percentage', 50);
        assert.equal(first!['cpu-throttle-percentage'], 50);
        await src.execute('migrate_cancel');
      },
      expect: { source: 'cancelled', sourceRunState: 'running' },
      after: async ({ src }) => {
        const d0 = await src.digest();
        await sleep(300);
        assert.notEqual(await src.digest(), d0);
        // a later migration without the capability never shows it
        await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'auto-converge', state: false }] });
        await src.execute('migrate', { uri: 'exec:cat > /dev/null' });
        await waitMigration(src, ['active'], 10000);
        assert.equal((await query(src))['cpu-throttle-percentage'], undefined);
        await src.execute('migrate_cancel');
        assert.deepEqual(await waitMigration(src), { status: 'cancelled' });
      },
    });
    assert.deepEqual(info, { status: 'cancelled' });
  });
});
