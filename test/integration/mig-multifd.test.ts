import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runMigration } from '../helpers/migration.js';
import { cleanupAll } from '../helpers/vm.js';

after(cleanupAll);

describe('multifd between two ferry vm processes', () => {
  for (const transport of ['tcp', 'unix'] as const) {
    it(`migrates a dirtying guest over ${transport}: with 3 channels and equal digests`, async () => {
      const { info } = await runMigration({
        guest: { mem: '64M', smp: 2, workload: 'stress,rate=4M,seed=7', fill: 'random,seed=3' },
        destination: { workload: 'stress,rate=4M,seed=7', capabilities: ['multifd'], parameters: { 'multifd-channels': 3 } },
        source: { parameters: { 'multifd-channels': 3 } },
        capabilities: ['multifd'],
        transport,
      });
      assert.ok(info.ram['multifd-bytes'] > 40 << 20, `multifd-bytes ${info.ram['multifd-bytes']}`);
      assert.ok(info.ram.transferred >= info.ram['multifd-bytes']);
    });
  }
});
