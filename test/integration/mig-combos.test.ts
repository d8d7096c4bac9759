/**
 * Every combination of the convergence tools (xbzrle, compress,
 * auto-converge) still yields an identical guest on the destination.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runMigration } from '../helpers/migration.js';
import { cleanupAll } from '../helpers/vm.js';

after(cleanupAll);

const TOOLS = ['xbzrle', 'compress', 'auto-converge'] as const;
const combos: (typeof TOOLS)[number][][] = [];
for (let mask = 0; mask < 1 << TOOLS.length; mask++) combos.push(TOOLS.filter((_, i) => mask & (1 << i)));

describe('convergence tools in every combination', { concurrency: 2 }, () => {
  for (const caps of combos) {
    it(`[${caps.join(', ') || 'none'}] gives an identical guest`, async () => {
      // compress goes on the destination too; completed on both sides, the
      // destination paused, digests equal (the harness's defaults)
      const { info } = await runMigration({
        guest: { mem: '32M', smp: 1, fill: 'text,seed=4', workload: 'stress,rate=4M,wss=8M,write=8,seed=3' },
        destination: { fill: 'text,seed=4', defer: true },
        capabilities: [...caps],
        source: { parameters: { 'max-bandwidth': 24 << 20, 'cpu-throttle-initial': 30 } },
        timeoutMs: 90000,
      });
      assert.equal('xbzrle-cache' in info, caps.includes('xbzrle'));
    });
  }
});
