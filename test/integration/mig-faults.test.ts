/**
 * A peer dies mid-stream: destination SIGKILLed → the source fails and keeps
 * running with its memory intact; source SIGKILLed → the destination fails,
 * never runs, and keeps answering QMP.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { waitIncoming } from '../helpers/streams.js';
import { cleanupAll, startVm, tempDir, waitFor, waitMigration } from '../helpers/vm.js';

after(cleanupAll);

const SRC = ['-m', '64M', '-fill', 'random,seed=21', '-workload', 'stress,rate=1M,seed=9'];
const DST = ['-m', '64M', '-S'];

describe('peer killed mid-stream', () => {
  it('destination killed: source failed with error-desc, still running, memory intact', async () => {
    const dir = tempDir();
    const path = join(dir, 'm.sock');
    const src = await startVm({ dir, name: 'src', args: SRC });
    const dst = await startVm({ dir, name: 'dst', args: [...DST, '-incoming', `unix:${path}`] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 4 << 20 });
    await src.execute('migrate', { uri: `unix:${path}` });
    await waitFor(async () => (await src.execute<any>('query-migrate')).ram?.transferred > 1 << 20, 15000, '1 MiB sent');
    dst.kill('SIGKILL');
    await dst.exited;
    const info = await waitMigration(src, ['failed', 'completed', 'cancelled'], 15000);
    assert.equal(info.status, 'failed', JSON.stringify(info));
    assert.match(info['error-desc'], /\S/);
    assert.match(info['error-desc'], /Broken pipe|Connection reset by peer|write failed/i);
    assert.deepEqual(await src.execute('query-status'), { status: 'running', running: true, singlestep: false });
    // memory intact: a stopped source has a stable digest, and migrates correctly
    await src.execute('stop');
    const d0 = await src.digest();
    assert.equal(await src.digest(), d0);
    const path2 = join(dir, 'm2.sock');
    const dst2 = await startVm({ dir, name: 'dst2', args: [...DST, '-incoming', `unix:${path2}`] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await src.execute('migrate', { uri: `unix:${path2}` });
    const i2 = await waitMigration(src);
    assert.equal(i2.status, 'completed', JSON.stringify(i2));
    assert.equal((await waitIncoming(dst2)).status, 'completed');
    assert.equal(await dst2.digest(), d0);
    assert.equal(await src.digest(), d0);
    await src.quit();
    await dst2.quit();
  });

  it('source killed: destination failed with error-desc, stays inmigrate, QMP answers', async () => {
    const dir = tempDir();
    const path = join(dir, 'm.sock');
    const src = await startVm({ dir, name: 'src', args: SRC });
    // no -S: had the load "succeeded" the guest would run; it must not
    const dst = await startVm({ dir, name: 'dst', args: ['-m', '64M', '-incoming', `unix:${path}`] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 4 << 20 });
    await src.execute('migrate', { uri: `unix:${path}` });
    await waitFor(async () => (await src.execute<any>('query-migrate')).ram?.transferred > 1 << 20, 15000, '1 MiB sent');
    src.kill('SIGKILL');
    await src.exited;
    const info = await waitIncoming(dst, 15000);
    assert.equal(info.status, 'failed');
    assert.equal(info['error-desc'], 'load of migration failed: Unexpected end of migration stream');
    assert.deepEqual(await dst.execute('query-status'), { status: 'inmigrate', running: false, singlestep: false });
    assert.ok(Array.isArray(await dst.execute('query-migrate-capabilities')));
    assert.equal(dst.exitCode, null);
    await dst.quit();
  });
});
