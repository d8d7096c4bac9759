import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { assertSweepPattern } from '../helpers/sweep.js';
import { cleanupAll, startVm, tempDir, waitMigration } from '../helpers/vm.js';

after(cleanupAll);

describe('precopy migration between two ferry vm processes', () => {
  it('migrates a dirtying guest over unix: with an identical memory digest', async () => {
    const dir = tempDir();
    const uri = `unix:${join(dir, 'mig.sock')}`;
    const src = await startVm({ dir, name: 'src', args: ['-m', '64M', '-smp', '2', '-workload', 'stress,rate=4M,seed=7', '-fill', 'random,seed=3'] });
    // -S: the destination stays paused after loading, so its digest is the switchover digest
    const dst = await startVm({ dir, name: 'dst', args: ['-m', '64M', '-smp', '2', '-workload', 'stress,rate=4M,seed=7', '-S', '-incoming', uri] });
    await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await src.execute('migrate', { uri });
    const info = await waitMigration(src);
    assert.equal(info.status, 'completed', JSON.stringify(info));
    assert.equal(await src.status(), 'postmigrate');
    const dinfo = await waitMigration(dst);
    assert.equal(dinfo.status, 'completed');
    assert.equal(await dst.status(), 'paused');
    assert.equal(await dst.digest(), await src.digest());
    // statistics: every page went once at least; total is the RAM size
    assert.equal(info.ram.total, 64 << 20);
    assert.ok(info.ram.normal + info.ram.duplicate >= 16384);
    assert.equal(info.ram['page-size'], 4096);
    assert.equal(info.ram.remaining, 0);
    assert.ok(info.downtime >= 0 && info['total-time'] >= info.downtime);
    // events: setup, active, completed in order, passes counted
    const statuses = src.qmp.eventLog.filter((e) => e.event === 'MIGRATION').map((e) => (e.data as any).status);
    assert.deepEqual(statuses, ['setup', 'active', 'completed']);
    const passes = src.qmp.eventLog.filter((e) => e.event === 'MIGRATION_PASS').map((e) => (e.data as any).pass);
    assert.equal(passes[0], 1);
    assert.equal(passes.at(-1), info.ram['dirty-sync-count']);
    // the guest goes on: cont on the destination runs it
    await dst.execute('cont');
    assert.equal(await dst.status(), 'running');
    await src.quit();
    await dst.quit();
  });
});

describe('the sweep pattern after migration', () => {
  it('verifies page by page on the destination (no stale page anywhere)', async () => {
    const dir = tempDir();
    const uri = `unix:${join(dir, 'sweep.sock')}`;
    const src = await startVm({ dir, name: 'src', args: ['-m', '32M', '-workload', 'sweep'] });
    const dst = await startVm({ dir, name: 'dst', args: ['-m', '32M', '-S', '-incoming', uri] });
    // the sweep rewrites every page all the time: at full speed the whole
    // region fits in the downtime budget, so the final pass sends it all again
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await src.execute('migrate', { uri });
    const info = await waitMigration(src);
    assert.equal(info.status, 'completed', JSON.stringify(info));
    assert.ok(info.ram['dirty-sync-count'] >= 2, 'the sweep dirtied pages during the migration');
    const file = join(dir, 'dst.ram');
    await dst.execute('pmemsave', { val: 0, size: 32 << 20, filename: file });
    const ram = readFileSync(file);
    // pages [1M, 32M): first bytes read v+1 up to the sweep position k, v from k on (mod 256)
    assertSweepPattern(ram, 1 << 20, 32 << 20);
    assert.equal(await dst.digest(), await src.digest());
    await src.quit();
    await dst.quit();
  });
});

describe('the monitor during a full-speed migration', () => {
  it('answers QMP promptly while pages stream at unlimited bandwidth', async () => {
    const dir = tempDir();
    const uri = `unix:${join(dir, 'busy.sock')}`;
    const src = await startVm({ dir, name: 'src', args: ['-m', '512M', '-fill', 'random,seed=9', '-workload', 'stress,rate=32M'] });
    const dst = await startVm({ dir, name: 'dst', args: ['-m', '512M', '-S', '-incoming', uri] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await src.execute('migrate', { uri });
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
    assert.equal((await waitMigration(src)).status, 'completed');
    assert.equal(await dst.digest(), await src.digest());
    await src.quit();
    await dst.quit();
  });
});
