/**
 * Every combination of the convergence tools (xbzrle, compress,
 * auto-converge) still yields an identical guest on the destination.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { cleanupAll, startVm, tempDir, waitMigration } from '../helpers/vm.js';

after(cleanupAll);

const TOOLS = ['xbzrle', 'compress', 'auto-converge'] as const;
const combos: (typeof TOOLS)[number][][] = [];
for (let mask = 0; mask < 1 << TOOLS.length; mask++) combos.push(TOOLS.filter((_, i) => mask & (1 << i)));

describe('convergence tools in every combination', { concurrency: 2 }, () => {
  for (const caps of combos) {
    it(`[${caps.join(', ') || 'none'}] gives an identical guest`, async () => {
      const dir = tempDir();
      const uri = `unix:${join(dir, 'mig.sock')}`;
      const guest = ['-m', '32M', '-smp', '1', '-fill', 'text,seed=4'];
      const src = await startVm({ dir, name: 'src', args: [...guest, '-workload', 'stress,rate=4M,wss=8M,write=8,seed=3'] });
      const dst = await startVm({ dir, name: 'dst', args: [...guest, '-S', '-incoming', 'defer'] });
      const on = caps.map((capability) => ({ capability, state: true }));
      await src.execute('migrate-set-capabilities', { capabilities: on });
      if (caps.includes('compress')) {
        await dst.execute('migrate-set-capabilities', { capabilities: [{ capability: 'compress', state: true }] });
      }
      await src.execute('migrate-set-parameters', { 'max-bandwidth': 24 << 20, 'cpu-throttle-initial': 30 });
      await dst.execute('migrate-incoming', { uri });
      await src.execute('migrate', { uri });
      const info = await waitMigration(src, undefined, 90000);
      assert.equal(info.status, 'completed', JSON.stringify(info));
      assert.equal('xbzrle-cache' in info, caps.includes('xbzrle'));
      assert.equal((await waitMigration(dst)).status, 'completed');
      assert.equal(await dst.status(), 'paused');
      assert.equal(await dst.digest(), await src.digest());
      await src.quit();
      await dst.quit();
    });
  }
});
