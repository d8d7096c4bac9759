/**
 * migrate_cancel in setup (a tcp listener that accepts and never reads), in
 * active (slow, rate-limited), and when idle; the source keeps running and a
 * new migration then succeeds with equal digests.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import * as net from 'node:net';
import { join } from 'node:path';
import { waitIncoming } from '../helpers/streams.js';
import { cleanupAll, startVm, tempDir, waitFor, waitMigration } from '../helpers/vm.js';

after(cleanupAll);

const SRC = ['-m', '64M', '-fill', 'random,seed=8', '-workload', 'stress,rate=1M,seed=4'];
const migStatuses = (vm: { qmp: { eventLog: { event: string; data?: unknown }[] } }) =>
  vm.qmp.eventLog.filter((e) => e.event === 'MIGRATION').map((e) => (e.data as { status: string }).status);
describe('migrate_cancel', () => {
  it('when idle returns {} and changes nothing', async () => {
    const vm = await startVm({ args: ['-m', '32M'] });
    assert.deepEqual(await vm.execute('migrate_cancel'), {});
    assert.deepEqual(await vm.execute('query-migrate'), {});
    await vm.quit();
  });

  it('in setup/active against a listener that never reads', async () => {
    const dir = tempDir();
    const held: net.Socket[] = [];
    const server = net.createServer((s) => { s.pause(); held.push(s); });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const port = (server.address() as net.AddressInfo).port;
    const src = await startVm({ dir, name: 'src', args: SRC });
    await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await src.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    // the stream fills the socket buffers and stalls: setup or active, never completed
    await waitFor(async () => held.length > 0, 10000, 'connection');
    const st = (await src.execute<any>('query-migrate')).status;
    assert.ok(st === 'setup' || st === 'active', st);
    assert.deepEqual(await src.execute('migrate_cancel'), {});
    const info = await waitMigration(src, ['cancelled', 'failed', 'completed'], 15000);
    assert.deepEqual(info, { status: 'cancelled' });
    const ev = migStatuses(src);
    assert.equal(ev[0], 'setup');
    assert.deepEqual(ev.slice(-2), ['cancelling', 'cancelled']);
    assert.equal(await src.status(), 'running');
    for (const s of held) s.destroy();
    server.close();
    await src.quit();
  });

  it('in active (rate-limited), then a new migration succeeds', async () => {
    const dir = tempDir();
    const path = join(dir, 'm.sock');
    const src = await startVm({ dir, name: 'src', args: SRC });
    const dst1 = await startVm({ dir, name: 'dst1', args: ['-m', '64M', '-S', '-incoming', `unix:${path}`] });
    await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 2 << 20 });
    await src.execute('migrate', { uri: `unix:${path}` });
    await waitMigration(src, ['active'], 10000);
    await waitFor(async () => (await src.execute<any>('query-migrate')).ram?.transferred > 0, 10000, 'bytes');
    assert.deepEqual(await src.execute('migrate_cancel'), {});
    const info = await waitMigration(src, ['cancelled', 'failed', 'completed'], 15000);
    assert.deepEqual(info, { status: 'cancelled' });
    assert.deepEqual(migStatuses(src), ['setup', 'active', 'cancelling', 'cancelled']);
    assert.deepEqual(await src.execute('query-status'), { status: 'running', running: true, singlestep: false });
    // the workload goes on: memory keeps changing
    const d1 = await src.digest();
    await waitFor(async () => (await src.digest()) !== d1, 10000, 'guest still writing');
    // the aborted destination failed (it never runs)
    const di = await waitIncoming(dst1);
    assert.equal(di.status, 'failed');
    assert.equal(await dst1.status(), 'inmigrate');
    // a new migration to a fresh destination completes with equal digests
    const path2 = join(dir, 'm2.sock');
    const dst2 = await startVm({ dir, name: 'dst2', args: ['-m', '64M', '-S', '-incoming', `unix:${path2}`] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await src.execute('migrate', { uri: `unix:${path2}` });
    const i2 = await waitMigration(src);
    assert.equal(i2.status, 'completed', JSON.stringify(i2));
    assert.equal((await waitIncoming(dst2)).status, 'completed');
    assert.equal(await dst2.digest(), await src.digest());
    assert.deepEqual(migStatuses(src).slice(4), ['setup', 'active', 'completed']);
    await src.quit();
    await dst1.quit();
    await dst2.quit();
  });
});
