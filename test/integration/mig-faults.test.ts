/**
 * A peer dies mid-stream: destination SIGKILLed → the source fails and keeps
 * running with its memory intact; source SIGKILLed → the destination fails,
 * never runs, and keeps answering QMP.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runMigration, type Guest } from '../helpers/migration.js';
import { cleanupAll, waitFor, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const SRC: Guest = { mem: '64M', fill: 'random,seed=21', workload: 'stress,rate=1M,seed=9' };

/** Once 1 MiB was sent, SIGKILL `which` side and wait for it to be gone. */
const killAfterAMiB = (which: 'src' | 'dst') => async (m: { src: VmHandle; d: VmHandle }) => {
  await waitFor(async () => (await m.src.execute<any>('query-migrate')).ram?.transferred > 1 << 20, 15000, '1 MiB sent');
  const victim = which === 'src' ? m.src : m.d;
  victim.kill('SIGKILL');
  await victim.exited;
};

describe('peer killed mid-stream', () => {
  it('destination killed: source failed with error-desc, still running, memory intact', async () => {
    const first = await runMigration({
      guest: SRC,
      source: { parameters: { 'max-bandwidth': 4 << 20 } },
      during: killAfterAMiB('dst'),
      timeoutMs: 15000,
      expect: { source: 'failed' },
      quit: false,
    });
    const { src, info } = first;
    assert.match(info['error-desc'], /\S/);
    assert.match(info['error-desc'], /Broken pipe|Connection reset by peer|write failed/i);
    assert.deepEqual(await src.execute('query-status'), { status: 'running', running: true, singlestep: false });
    // memory intact: a stopped source has a stable digest, and migrates correctly
    await src.execute('stop');
    const d0 = await src.digest();
    assert.equal(await src.digest(), d0);
    // completed on both sides, the new destination's digest equals the source's
    await runMigration({
      source: { vm: src, parameters: { 'max-bandwidth': 0 } },
      destination: { mem: '64M', name: 'dst2' },
      after: async ({ d }) => {
        assert.equal(await d.digest(), d0);
        assert.equal(await src.digest(), d0);
      },
    });
    await first.quit();
  });

  it('source killed: destination failed with error-desc, stays inmigrate, QMP answers', async () => {
    const { dinfo } = await runMigration({
      guest: SRC,
      // no -S: had the load "succeeded" the guest would run; it must not
      destination: { paused: false },
      source: { parameters: { 'max-bandwidth': 4 << 20 } },
      during: killAfterAMiB('src'),
      destinationTimeoutMs: 15000,
      expect: { source: null, destination: 'failed' },
      after: async ({ d }) => {
        assert.deepEqual(await d.execute('query-status'), { status: 'inmigrate', running: false, singlestep: false });
        assert.ok(Array.isArray(await d.execute('query-migrate-capabilities')));
        assert.equal(d.exitCode, null);
      },
    });
    assert.equal(dinfo!['error-desc'], 'load of migration failed: Unexpected end of migration stream');
  });
});
