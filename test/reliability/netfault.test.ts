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
import { createNetnsPair, netnsUnavailable, nsExec, nsTry, type NetnsPair } from '../helpers/netns.js';
import { cleanupAll, waitMigration } from '../helpers/vm.js';
import { waitFor, type QmpProcess } from '../../src/cli/launch.js';
import { DETECTION_BOUND_MS } from '../../src/migration/channel/liveness.js';

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

/** Status of the migration on `vm`, and when it first reached one of `states` (ms since `t0`). */
async function failedAfter(vm: QmpProcess, t0: number): Promise<{ status: string; ms: number; info: Record<string, any> }> {
  const info = await waitMigration(vm, ['completed', 'failed', 'cancelled'], DETECTION_BOUND_MS + 20000);
  return { status: info.status, ms: Date.now() - t0, info };
}

/** Wait until the source has sent `bytes`. */
async function sent(src: QmpProcess, bytes: number): Promise<void> {
  await waitMigration(src, ['active', 'postcopy-active'], 10000);
  for (;;) {
    const i = await src.execute<Record<string, any>>('query-migrate');
    assert.ok(['active', 'postcopy-active'].includes(i.status), `still migrating: ${i.status}`);
    if ((i.ram?.transferred ?? 0) >= bytes) return;
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('a partition in the middle of the stream', { skip: NO_NETNS }, () => {
  it(`precopy: both sides fail within ${DETECTION_BOUND_MS} ms, the source runs on intact, and a migration after the link is back succeeds`, async () => {
    const net = createNetnsPair();
    try {
      const { src, dst } = await pair(net);
      const before = await src.digest();
      // 4 MB/s: the 32 MiB first pass takes about 8 s, the partition comes in its first second
      await src.execute('migrate-set-parameters', { 'max-bandwidth': 4e6 });
      await src.execute('migrate', { uri: `tcp:${net.addr.b}:${PORT}` });
      await sent(src, 1 << 20);
      const t0 = Date.now();
      net.link('down');
      const [s, d] = await Promise.all([failedAfter(src, t0), failedAfter(dst, t0)]);
      assert.equal(s.status, 'failed', JSON.stringify(s.info));
      assert.equal(d.status, 'failed', JSON.stringify(d.info));
      // the bound, plus the 50 ms polling and a loaded machine's slack
      assert.ok(s.ms <= DETECTION_BOUND_MS + 2000, `source detected after ${s.ms} ms`);
      assert.ok(d.ms <= DETECTION_BOUND_MS + 2000, `destination detected after ${d.ms} ms`);
      assert.ok(s.ms >= 2000 && d.ms >= 2000, `a partition is not seen at once (${s.ms}, ${d.ms} ms)`);
      assert.match(String(s.info['error-desc']), /timed out|Connection/i, s.info['error-desc']);
      console.log(`# partition detected: source ${s.ms} ms, destination ${d.ms} ms (bound ${DETECTION_BOUND_MS} ms)`);
      // QEMU's end states: the source runs on, the destination never ran
      assert.equal(await src.status(), 'running');
      assert.equal(await src.digest(), before, 'the source\'s memory is intact');
      assert.notEqual(await dst.status(), 'running');

      net.link('up');
      const dst2 = await net.startVm('b', ['-m', '32M', '-S', '-incoming', `tcp:${net.addr.b}:${PORT + 1}`], 'dst2');
      await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
      await src.execute('migrate', { uri: `tcp:${net.addr.b}:${PORT + 1}` });
      assert.equal((await waitMigration(src)).status, 'completed');
      assert.equal((await waitMigration(dst2)).status, 'completed');
      assert.equal(await dst2.digest(), before);
    } finally {
      await net.destroy();
    }
    assert.deepEqual(net.leftovers(), []);
  });
});

describe('postcopy during a partition', { skip: NO_NETNS }, () => {
  it('the destination\'s guest stalls; both sides fail within the bound and stay so after the link returns (no postcopy recovery)', async () => {
    const net = createNetnsPair();
    try {
      // the guest reads and writes all of its RAM, so on the destination it soon needs a page the source still has
      const guest = ['-m', '32M', '-fill', 'text,seed=4', '-workload', 'stress,rate=40M,seed=3,read=on,steps=1000000'];
      const src = await net.startVm('a', guest);
      const dst = await net.startVm('b', [...guest, '-incoming', `tcp:${net.addr.b}:${PORT}`]);
      for (const vm of [src, dst]) {
        await vm.execute('migrate-set-capabilities', { capabilities: [{ capability: 'postcopy-ram', state: true }] });
      }
      await src.execute('migrate-set-parameters', { 'max-bandwidth': 2e6 });
      await src.execute('migrate', { uri: `tcp:${net.addr.b}:${PORT}` });
      await sent(src, 256 << 10);
      await src.execute('migrate-start-postcopy');
      await waitMigration(src, ['postcopy-active'], 10000);
      await waitMigration(dst, ['postcopy-active'], 10000);
      // the destination is postcopy-active from LISTEN; its guest starts a moment later, at RUN
      await waitFor(async () => (await dst.status()) === 'running', 10000, 'the destination guest running').catch(() => undefined);
      assert.equal(await dst.status(), 'running', 'the guest runs on the destination');

      const t0 = Date.now();
      net.link('down');
      // the guest on the destination stalls: it faults on a page that cannot come
      const steps = async (): Promise<number> => (await dst.execute<{ steps: number }[]>('x-query-workload')).reduce((a, v) => a + v.steps, 0);
      await new Promise((r) => setTimeout(r, 1500));
      const stalled = await steps();
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal(await steps(), stalled, 'the destination guest made no progress while the source was unreachable');

      const [s, d] = await Promise.all([failedAfter(src, t0), failedAfter(dst, t0)]);
      assert.equal(s.status, 'failed', JSON.stringify(s.info));
      assert.equal(d.status, 'failed', JSON.stringify(d.info));
      assert.ok(s.ms <= DETECTION_BOUND_MS + 2000, `source detected after ${s.ms} ms`);
      assert.ok(d.ms <= DETECTION_BOUND_MS + 2000, `destination detected after ${d.ms} ms`);
      console.log(`# postcopy partition detected: source ${s.ms} ms, destination ${d.ms} ms (bound ${DETECTION_BOUND_MS} ms)`);

      // the documented end (docs/reliability.md): no postcopy-paused, no migrate-recover;
      // the source keeps its stale copy stopped, the destination stops with half a guest
      net.link('up');
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal(await src.status(), 'postmigrate');
      assert.equal(await dst.status(), 'internal-error');
      assert.equal((await src.execute<Record<string, any>>('query-migrate')).status, 'failed');
      assert.equal((await dst.execute<Record<string, any>>('query-migrate')).status, 'failed');
      assert.equal(await steps(), stalled, 'the half-loaded guest never ran on');
    } finally {
      await net.destroy();
    }
    assert.deepEqual(net.leftovers(), []);
  });
});

/** A 16 MiB random guest migrated a -> b at full speed; returns the source's final info. */
async function migrateUnder(net: NetnsPair, to = net.addr.b): Promise<Record<string, any>> {
  const src = await net.startVm('a', ['-m', '16M', '-fill', 'random,seed=6', '-workload', 'stress,rate=4M,seed=2,steps=2000']);
  const dst = await net.startVm('b', ['-m', '16M', '-S', '-incoming', `tcp:${to}:${PORT}`]);
  await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
  await src.execute('migrate', { uri: `tcp:${to}:${PORT}` });
  const info = await waitMigration(src, ['completed', 'failed', 'cancelled'], 60000);
  assert.equal(info.status, 'completed', JSON.stringify(info));
  assert.equal((await waitMigration(dst)).status, 'completed');
  assert.equal(await dst.digest(), await src.digest(), 'identical digests');
  return info;
}

describe('a link with a bandwidth cap, loss or latency', { skip: NO_NETNS }, () => {
  it('a bandwidth cap (tc tbf, or htb): the migration completes at the cap with identical digests', async (t) => {
    const net = createNetnsPair();
    try {
      const MBIT = 64; // 8 MB/s: the 16 MiB guest takes about 2 s
      const tbf = net.qdisc('a', ['tbf', 'rate', `${MBIT}mbit`, 'burst', '64kb', 'latency', '100ms']);
      let how = `tbf rate ${MBIT}mbit`;
      if (tbf !== undefined) {
        const htb = net.qdisc('a', ['handle', '1:', 'htb', 'default', '10'])
          ?? nsTry(net.ns.a, ['tc', 'class', 'add', 'dev', net.dev.a, 'parent', '1:', 'classid', '1:10', 'htb', 'rate', `${MBIT}mbit`, 'ceil', `${MBIT}mbit`]);
        if (htb !== undefined) return void t.skip(`no tbf (${tbf}) and no htb (${htb})`);
        how = `htb rate ${MBIT}mbit (tbf: ${tbf})`;
      }
      const info = await migrateUnder(net);
      const bytes = info.ram.transferred as number;
      const floorMs = (bytes * 8) / (MBIT * 1e6) * 1000;
      console.log(`# ${how}: ${bytes} bytes in ${info['total-time']} ms (${info.ram.mbps.toFixed(1)} mbps; the cap alone needs ${floorMs.toFixed(0)} ms)`);
      // the cap was in force: the stream could not go faster than the link allows
      assert.ok(info['total-time'] >= floorMs * 0.9, `total-time ${info['total-time']} ms < ${floorMs} ms at ${MBIT} mbit`);
    } finally {
      await net.destroy();
    }
  });

  it('random loss (nft numgen, or iptables statistic): the migration completes with identical digests', async (t) => {
    const net = createNetnsPair();
    try {
      const drop = net.dropRandom('a', 3);
      if ('skip' in drop) return void t.skip(drop.skip);
      const info = await migrateUnder(net);
      const lost = net.dropped('a');
      console.log(`# ${drop.how}: ${lost} packets dropped, ${info['total-time']} ms`);
      assert.ok(lost > 0, 'packets were dropped');
    } finally {
      await net.destroy();
    }
  });

  it('latency (tc netem, or a userspace delay line): the migration completes with identical digests', async (t) => {
    const net = createNetnsPair();
    try {
      const DELAY = 20;
      let to = net.addr.b;
      let how = `tc netem delay ${DELAY}ms`;
      const err = net.qdisc('a', ['netem', 'delay', `${DELAY}ms`]);
      if (err !== undefined) {
        // no netem in this kernel: every packet goes through a delay line of TUN devices instead
        const line = await net.delayLine(DELAY);
        if ('skip' in line) return void t.skip(`no tc netem (${err}) and no delay line (${line.skip})`);
        to = line.b;
        how = `a userspace delay line of ${DELAY} ms each way (tc netem: ${err})`;
      }
      const rtt = nsExec(net.ns.a, ['ping', '-c', '3', '-i', '0.2', '-W', '2', to]);
      const times = [...rtt.matchAll(/time=([\d.]+) ms/g)].map((m) => Number(m[1]));
      assert.ok(times.length > 0 && Math.min(...times) >= (err === undefined ? DELAY : 2 * DELAY), `the link delays packets: ${rtt}`);
      const info = await migrateUnder(net, to);
      console.log(`# ${how}: ping ${times.join(', ')} ms; migration ${info['total-time']} ms, downtime ${info.downtime} ms`);
    } finally {
      await net.destroy();
    }
    assert.deepEqual(net.leftovers(), []);
  });
});
