/**
 * return-path: the source completes only after the destination's SHUT 0; a
 * destination that fails to load makes the source fail (the destination's
 * truth), even though the source wrote the whole stream.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { waitIncoming } from '../helpers/streams.js';
import { cleanupAll, startVm, tempDir, waitMigration } from '../helpers/vm.js';

after(cleanupAll);

const SRC = ['-m', '32M', '-fill', 'random,seed=31'];

describe('return-path capability', () => {
  it('completes after SHUT 0: the destination already completed when the source does', async () => {
    const dir = tempDir();
    const path = join(dir, 'm.sock');
    const src = await startVm({ dir, name: 'src', args: [...SRC, '-workload', 'stress,rate=1M,seed=3'] });
    const dst = await startVm({ dir, name: 'dst', args: ['-m', '32M', '-S', '-incoming', `unix:${path}`] });
    await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'return-path', state: true }, { capability: 'events', state: true }] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await src.execute('migrate', { uri: `unix:${path}` });
    const info = await waitMigration(src);
    assert.equal(info.status, 'completed', JSON.stringify(info));
    // SHUT 0 is sent after the destination finished loading: it is already completed
    const d = await dst.execute<any>('query-migrate');
    assert.equal(d.status, 'completed');
    assert.equal(await dst.digest(), await src.digest());
    await src.quit();
    await dst.quit();
  });

  it('destination fails to load (wrong RAM size): the source reports failed', async () => {
    const dir = tempDir();
    const path = join(dir, 'm.sock');
    const src = await startVm({ dir, name: 'src', args: SRC });
    const dst = await startVm({ dir, name: 'dst', args: ['-m', '64M', '-S', '-incoming', `unix:${path}`] });
    await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'return-path', state: true }] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await src.execute('migrate', { uri: `unix:${path}` });
    const info = await waitMigration(src);
    assert.equal(info.status, 'failed', JSON.stringify(info));
    assert.match(info['error-desc'], /\S/);
    const d = await waitIncoming(dst);
    assert.equal(d.status, 'failed');
    assert.match(d['error-desc'], /^load of migration failed: Size mismatch: /);
    assert.equal(await dst.status(), 'inmigrate');
    // the source stays usable: it was running and runs again
    assert.equal(await src.status(), 'running');
    await src.quit();
    await dst.quit();
  });

  it('return-path over exec:cat > FILE: nothing ever answers, the source waits in active until cancelled', async () => {
    const dir = tempDir();
    const src = await startVm({ dir, name: 'src', args: SRC });
    await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'return-path', state: true }] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await src.execute('migrate', { uri: `exec:cat > ${join(dir, 'f.mig')}` });
    // qmp.md E.6: nothing ever arrives on the command's stdout; the source waits in active
    // (Ferry may instead fail at once if it treats the exec channel as one-way)
    const first = await waitMigration(src, ['active', 'failed'], 15000);
    if (first.status === 'failed') {
      assert.equal(first['error-desc'], 'Unable to open return-path for postcopy');
    } else {
      await new Promise((r) => setTimeout(r, 1500));
      assert.equal((await src.execute<any>('query-migrate')).status, 'active');
      await src.execute('migrate_cancel');
      assert.equal((await waitMigration(src)).status, 'cancelled');
    }
    assert.equal(await src.status(), 'running');
    await src.quit();
  });
});
