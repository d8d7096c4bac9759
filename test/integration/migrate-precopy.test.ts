import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { runMigration } from '../helpers/migration.js';
import { assertSweepPattern } from '../helpers/sweep.js';
import { cleanupAll } from '../helpers/vm.js';

after(cleanupAll);

describe('precopy migration between two ferry vm processes', () => {
  it('migrates a dirtying guest over unix: with an identical memory digest', async () => {
    // the harness: source postmigrate, destination completed and paused (-S,
    // so its digest is the switchover digest), digests equal
    const { info, src } = await runMigration({
      guest: { mem: '64M', smp: 2, workload: 'stress,rate=4M,seed=7', fill: 'random,seed=3' },
      destination: { workload: 'stress,rate=4M,seed=7' },
      capabilities: ['events'],
      // events: setup, active, completed in order
      expect: { events: { source: ['setup', 'active', 'completed'] } },
      after: async ({ d }) => {
        // the guest goes on: cont on the destination runs it
        await d.execute('cont');
        assert.equal(await d.status(), 'running');
      },
    });
    // statistics: every page went once at least; total is the RAM size
    assert.equal(info.ram.total, 64 << 20);
    assert.ok(info.ram.normal + info.ram.duplicate >= 16384);
    assert.equal(info.ram['page-size'], 4096);
    assert.equal(info.ram.remaining, 0);
    assert.ok(info.downtime >= 0 && info['total-time'] >= info.downtime);
    // passes counted
    const passes = src.qmp.eventLog.filter((e) => e.event === 'MIGRATION_PASS').map((e) => (e.data as any).pass);
    assert.equal(passes[0], 1);
    assert.equal(passes.at(-1), info.ram['dirty-sync-count']);
  });
});

describe('the sweep pattern after migration', () => {
  it('verifies page by page on the destination (no stale page anywhere)', async () => {
    // the sweep rewrites every page all the time: at full speed the whole
    // region fits in the downtime budget, so the final pass sends it all again
    const { info } = await runMigration({
      guest: { mem: '32M', workload: 'sweep' },
      after: async ({ d, dir }) => {
        const file = join(dir, 'dst.ram');
        await d.execute('pmemsave', { val: 0, size: 32 << 20, filename: file });
        const ram = readFileSync(file);
        // pages [1M, 32M): first bytes read v+1 up to the sweep position k, v from k on (mod 256)
        assertSweepPattern(ram, 1 << 20, 32 << 20);
      },
    });
    assert.ok(info.ram['dirty-sync-count'] >= 2, 'the sweep dirtied pages during the migration');
  });
});

describe('the monitor during a full-speed migration', () => {
  it('answers QMP promptly while pages stream at unlimited bandwidth', async () => {
    await runMigration({
      guest: { mem: '512M', fill: 'random,seed=9', workload: 'stress,rate=32M' },
      during: async ({ src }) => {
        const latencies: number[] = [];
        for (;;) {
          const t0 = performance.now();
          const info = await src.execute<{ status: string }>('query-migrate');
          latencies.push(performance.now() - t0);
          if (info.status !== 'active' && info.status !== 'setup') break;
          await new Promise((r) => setTimeout(r, 20));
        }
        latencies.sort((a, b) => a - b);
        const p50 = latencies[Math.floor(latencies.length / 2)]!;
        // the data path yields every slice (~5 ms of work); allow for a loaded CI box
        assert.ok(latencies.length >= 5, `sampled ${latencies.length} times`);
        assert.ok(p50 < 50, `median query-migrate latency ${p50.toFixed(1)} ms`);
      },
    });
  });
});
