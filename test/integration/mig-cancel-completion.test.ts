/**
 * The known bug of a cancel during completion: every byte is out, but an
 * exec: destination keeps its stdin open for a few seconds, so the channel
 * has not closed yet. migrate_cancel then must end in `cancelled` with the
 * source running again (as QEMU does), not stay in `cancelling` with the
 * source stopped in postmigrate and every later `migrate` refused.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { cleanupAll, startVm, tempDir, waitFor, waitMigration } from '../helpers/vm.js';

after(cleanupAll);

describe('migrate_cancel after the last byte, before the channel closed', () => {
  it('ends in cancelled, the source runs on, and a new migration succeeds', { timeout: 60000 }, async () => {
    const dir = tempDir();
    const src = await startVm({ dir, name: 'src', args: ['-m', '32M', '-fill', 'random,seed=2', '-workload', 'stress,rate=1M,seed=3'] });
    await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    const file = join(dir, 'stream.bin');
    // cat takes the whole stream and ends at its EOF; the shell then keeps the channel open
    await src.execute('migrate', { uri: `exec:cat > ${file}; sleep 4` });
    // the switchover: the VM stops, the rest goes out, then the source lingers on the open channel
    await waitFor(async () => (await src.status()) === 'finish-migrate', 20000, 'the stop for completion');
    await new Promise((r) => setTimeout(r, 700));
    assert.equal((await src.execute<{ status: string }>('query-migrate')).status, 'active', 'still lingering on the channel');
    const t0 = Date.now();
    assert.deepEqual(await src.execute('migrate_cancel'), {});
    const info = await waitMigration(src, ['cancelled', 'failed', 'completed'], 10000);
    assert.deepEqual(info, { status: 'cancelled' });
    assert.ok(Date.now() - t0 < 2500, `the cancel took ${Date.now() - t0} ms (the linger must not run out first)`);
    assert.equal(await src.status(), 'running');
    const statuses = src.qmp.eventLog.filter((e) => e.event === 'MIGRATION').map((e) => (e.data as { status: string }).status);
    assert.deepEqual(statuses, ['setup', 'active', 'cancelling', 'cancelled']);
    // a later migration is not refused, and completes
    const dst = await startVm({ dir, name: 'dst', args: ['-m', '32M', '-S', '-incoming', `unix:${join(dir, 'm.sock')}`] });
    await src.execute('migrate', { uri: `unix:${join(dir, 'm.sock')}` });
    assert.equal((await waitMigration(src)).status, 'completed');
    assert.equal((await waitMigration(dst)).status, 'completed');
    assert.equal(await dst.digest(), await src.digest());
    await src.quit();
    await dst.quit();
  });
});
