/**
 * return-path: the source completes only after the destination's SHUT 0; a
 * destination that fails to load makes the source fail (the destination's
 * truth), even though the source wrote the whole stream.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { runMigration, type Guest } from '../helpers/migration.js';
import { cleanupAll, waitMigration } from '../helpers/vm.js';

after(cleanupAll);

const SRC: Guest = { mem: '32M', fill: 'random,seed=31' };

describe('return-path capability', () => {
  it('completes after SHUT 0: the destination already completed when the source does', async () => {
    // SHUT 0 is sent after the destination finished loading: it is already
    // completed (read once, not waited for); digests equal
    await runMigration({
      guest: { ...SRC, workload: 'stress,rate=1M,seed=3' },
      capabilities: ['return-path', 'events'],
      expect: { destinationEndedFirst: true },
    });
  });

  it('destination fails to load (wrong RAM size): the source reports failed', async () => {
    const { info, dinfo } = await runMigration({
      guest: SRC,
      destination: { mem: '64M' },
      capabilities: ['return-path'],
      expect: {
        source: 'failed',
        destination: 'failed',
        destinationRunState: 'inmigrate',
        // the source stays usable: it was running and runs again
        sourceRunState: 'running',
      },
    });
    assert.match(info['error-desc'], /\S/);
    assert.match(dinfo!['error-desc'], /^load of migration failed: Size mismatch: /);
  });

  it('return-path over exec:cat > FILE: the source ends the command\'s input after its last byte and fails without a SHUT (QEMU 7.2 waits in active until cancelled); the source runs on', async () => {
    await runMigration({
      guest: SRC,
      destination: null,
      transport: (dir) => ({ uri: `exec:cat > ${join(dir, 'f.mig')}` }),
      capabilities: ['return-path'],
      during: async ({ src }) => {
        // docs/reliability.md: a file cannot answer on the return path; waiting for it (as 7.2 does) would hang for ever
        const info = await waitMigration(src, ['failed', 'completed', 'cancelled'], 30000);
        assert.equal(info.status, 'failed');
        assert.match(info['error-desc'], /return path \(no SHUT\)/);
      },
      expect: { source: null, sourceRunState: 'running' },
    });
  });
});
