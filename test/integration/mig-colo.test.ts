/**
 * COLO between real `ferry vm` processes (docs/colo.md): entering it with
 * x-colo, the checkpoint cadence, memory that matches the primary's at a
 * checkpoint, failover on either side (also after kills at random
 * moments, a checkpoint cut short, an unexpected message), the console
 * comparison, the heartbeat timeout, and a failed-over secondary that
 * becomes the primary of a new pair.
 *
 * To know the primary's state at a checkpoint from outside, the primary is
 * paused (`stop`): the checkpoints taken then carry exactly its memory, and
 * a secondary mirrors the pause once it loaded one of them.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { capabilities, runMigration, type Guest, type Migration } from '../helpers/migration.js';
import { ColoLinkControl, coloLinkProxy } from '../helpers/colo-link.js';
import { cleanupAll, readText, startVm, tempDir, waitFor, waitMigration, type QmpProcess } from '../helpers/vm.js';

after(cleanupAll);

const gen = (desc: string) => (e: any) => {
  assert.equal(e.errorClass, 'GenericError');
  assert.equal(e.desc, desc);
  return true;
};

interface ColoOpts {
  guest?: Guest;
  delay?: number;
  /** source capabilities besides x-colo and events */
  caps?: string[];
  /** destination capabilities (default x-colo, events) */
  dstCaps?: string[];
  /** put a controlled link between the two */
  link?: ColoLinkControl;
  srcArgs?: string[];
  /** wait for the first checkpoint (default true) */
  firstCheckpoint?: boolean;
}

interface ColoRun {
  m: Migration;
  src: QmpProcess;
  dst: QmpProcess;
  dir: string;
  srcSerial: string;
  dstSerial: string;
}

async function colo(s: QmpProcess): Promise<Record<string, any>> {
  return s.execute('query-colo-status');
}

/** Both sides started, migrated with x-colo, and in COLO (the secondary ready). */
async function startColo(o: ColoOpts = {}): Promise<ColoRun> {
  const dir = tempDir('ferry-colo-');
  const srcSerial = join(dir, 'src.serial');
  const dstSerial = join(dir, 'dst.serial');
  let proxy: { close(): void } | undefined;
  const m = await runMigration({
    dir,
    guest: { mem: '16M', ...o.guest },
    source: { args: ['-serial', `file:${srcSerial}`, ...(o.srcArgs ?? [])], parameters: { 'max-bandwidth': 0, 'x-checkpoint-delay': o.delay ?? 200 } },
    destination: { args: ['-serial', `file:${dstSerial}`], capabilities: o.dstCaps ?? ['x-colo', 'events'], paused: false },
    capabilities: ['x-colo', 'events', ...(o.caps ?? [])],
    transport: o.link ? (d) => ({ uri: `unix:${join(d, 'proxy.sock')}`, incoming: `unix:${join(d, 'mig.sock')}` }) : 'unix',
    before: async () => {
      if (o.link) proxy = await coloLinkProxy(o.link, join(dir, 'proxy.sock'), join(dir, 'mig.sock'));
    },
    expect: { source: null },
    quit: false,
  });
  if (proxy) after(() => proxy!.close());
  const src = m.src;
  const dst = m.d;
  await waitFor(async () => (await colo(src)).mode === 'primary' && (await colo(dst)).mode === 'secondary', 20000, 'both in COLO');
  // the first checkpoint: the secondary is ready
  if (o.firstCheckpoint ?? true) await waitFor(async () => (await colo(dst))['x-checkpoints'] >= 1, 20000, 'the first checkpoint');
  return { m, src, dst, dir, srcSerial, dstSerial };
}

async function checkpointsOf(vm: QmpProcess): Promise<number> {
  return (await colo(vm))['x-checkpoints'];
}

/** Wait for `n` more checkpoints completed on `vm`. */
async function moreCheckpoints(vm: QmpProcess, n: number, ms = 20000): Promise<void> {
  const from = await checkpointsOf(vm);
  await waitFor(async () => (await checkpointsOf(vm)) >= from + n, ms, `${n} more checkpoints`);
}

function heartbeats(file: string): number[] {
  return readText(file)
    .split('\n')
    .filter((l) => l.startsWith('heartbeat '))
    .map((l) => Number(l.split(' ')[1]));
}

function consecutive(ns: number[], what: string): void {
  for (let i = 1; i < ns.length; i++) assert.equal(ns[i], ns[i - 1]! + 1, `${what}: ${ns.slice(Math.max(0, i - 3), i + 2).join(',')}`);
}

function events(vm: QmpProcess, name: string): any[] {
  return vm.qmp.eventLog.filter((e) => e.event === name);
}

function eventMs(e: any): number {
  return e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000;
}

/**
 * The sweep workload's memory as a function of its step count: pages
 * [start, start + steps mod n) have (round + 1) & 255, the rest round & 255.
 * A state made of two checkpoints, or of a checkpoint and pages the
 * secondary wrote after it, does not fit its own step count.
 */
async function assertSweepConsistent(vm: QmpProcess, dir: string, mem: number): Promise<void> {
  await vm.execute('stop');
  const steps = (await vm.execute<any[]>('x-query-workload'))[0].steps as number;
  const file = join(dir, `sweep-${Date.now()}.ram`);
  await vm.execute('pmemsave', { val: 0, size: mem, filename: file });
  const ram = readFileSync(file);
  const start = 1 << 20;
  const n = (mem - start) / 4096;
  const round = Math.floor(steps / n);
  const pos = steps % n;
  for (let i = 0; i < n; i++) {
    const want = (i < pos ? round + 1 : round) & 255;
    const got = ram[start + i * 4096]!;
    if (got !== want) assert.fail(`page ${i} reads ${got}, the sweep at step ${steps} (round ${round}, page ${pos}) wrote ${want}`);
  }
  await vm.execute('cont');
}

describe('COLO between processes', () => {
  it('x-colo on both sides: both in colo and running, checkpoints flow, refusals; failover on each side; the survivor becomes the primary of a new pair', async () => {
    // with the return-path capability too: the secondary's SHUT 0, then COLO's messages
    const r = await startColo({ caps: ['return-path'], guest: { workload: 'stress,rate=2M,seed=5', fill: 'text,seed=1' } });
    const { src, dst } = r;
    assert.deepEqual(events(src, 'MIGRATION').map((e) => e.data.status), ['setup', 'active', 'colo']);
    // (the destination's setup event came before the test's monitor connected)
    assert.deepEqual(events(dst, 'MIGRATION').map((e) => e.data.status), ['active', 'colo']);
    assert.deepEqual(await src.execute('query-migrate'), { status: 'colo' });
    assert.deepEqual(await dst.execute('query-migrate'), { status: 'colo' });
    assert.equal(await src.status(), 'running');
    assert.equal(await dst.status(), 'running');
    await moreCheckpoints(dst, 2);
    const st = await colo(src);
    assert.equal(st['last-mode'], 'unknown');
    assert.equal(st.reason, 'none');
    assert.equal(st['x-failover-status'], 'none');
    assert.ok(st['x-last-checkpoint'].size > 0 && st['x-last-checkpoint'].pause > 0, JSON.stringify(st));
    assert.ok(events(src, 'MIGRATION_PASS').length >= 3, 'a pass per checkpoint');
    // nothing may change under a running COLO
    await assert.rejects(src.execute('migrate-set-capabilities', capabilities(['x-colo'], false)), gen("There's a migration process in progress"));
    await assert.rejects(src.execute('migrate', { uri: 'unix:/nowhere' }), gen("There's a migration process in progress"));
    await assert.rejects(dst.execute('migrate', { uri: 'unix:/nowhere' }), gen("There's a migration process in progress"));
    // (migrate_cancel in colo breaks the link, as in QEMU 7.2: test/reliability/matrix.test.ts, COLO checkpoint × cancel)

    // the primary leaves COLO and runs alone
    assert.deepEqual(await src.execute('x-colo-lost-heartbeat'), {});
    await waitFor(async () => (await src.execute<any>('query-migrate')).status === 'completed', 10000, 'primary completed');
    assert.equal(await src.status(), 'running');
    assert.deepEqual(events(src, 'COLO_EXIT').map((e) => e.data), [{ mode: 'primary', reason: 'request' }]);
    assert.deepEqual(await colo(src).then((s) => [s.mode, s['last-mode'], s.reason, s['x-failover-status']]), ['unknown', 'primary', 'request', 'completed']);
    await assert.rejects(src.execute('x-colo-lost-heartbeat'), gen("The feature 'colo' is not enabled"));
    // the secondary sees the link go, reports it, waits (2.10)
    await waitFor(() => events(dst, 'COLO_EXIT').length === 1, 10000, 'COLO_EXIT on the secondary');
    assert.deepEqual(events(dst, 'COLO_EXIT')[0].data, { mode: 'secondary', reason: 'error' });
    assert.match((await colo(dst))['x-error'], /^Can't receive COLO message: /);
    assert.equal((await dst.execute<any>('query-migrate')).status, 'colo');
    // ... and takes over when told
    await dst.execute('x-colo-lost-heartbeat');
    await waitMigration(dst, ['completed'], 10000);
    assert.equal(await dst.status(), 'running');
    assert.deepEqual(events(dst, 'MIGRATION').map((e) => e.data.status), ['active', 'colo', 'completed']);
    await waitFor(() => heartbeats(r.dstSerial).length >= 2, 10000, 'the secondary prints after the takeover');
    consecutive(heartbeats(r.dstSerial), 'its console');

    // the survivor is the primary of a new pair
    const third = await startVm({ dir: r.dir, name: 'third', args: ['-m', '16M', '-incoming', `unix:${join(r.dir, 'mig3.sock')}`] });
    await dst.execute('migrate-set-capabilities', capabilities(['x-colo'], true));
    await dst.execute('migrate-set-parameters', { 'max-bandwidth': 0, 'x-checkpoint-delay': 200 });
    await dst.execute('migrate', { uri: `unix:${join(r.dir, 'mig3.sock')}` });
    await waitFor(async () => (await colo(dst)).mode === 'primary' && (await colo(third)).mode === 'secondary', 20000, 'the new pair');
    await moreCheckpoints(third, 2);
    assert.equal((await colo(dst))['last-mode'], 'secondary');
    await Promise.all([src.quit(), dst.quit(), third.quit()]);
  });

  it('x-colo on one side only, and the refusals outside COLO', async () => {
    const vm = await startVm({ args: ['-m', '16M'] });
    assert.deepEqual(await vm.execute('query-colo-status'), {
      mode: 'unknown', 'last-mode': 'unknown', reason: 'none', 'x-failover-status': 'none',
      'x-checkpoints': 0, 'x-compare-checkpoints': 0, 'x-console-held': 0,
    });
    await assert.rejects(vm.execute('x-colo-lost-heartbeat'), gen("The feature 'colo' is not enabled"));
    await vm.execute('migrate-set-capabilities', capabilities(['x-colo']));
    await assert.rejects(vm.execute('migrate', { uri: 'unix:/x', blk: true }), gen('No disk migration is required in COLO mode'));
    await vm.execute('migrate-set-capabilities', capabilities(['postcopy-ram']));
    await assert.rejects(vm.execute('migrate', { uri: 'unix:/x' }), gen('COLO is not compatible with postcopy'));
    await assert.rejects(vm.execute('x-colo-set-parameters', { 'heartbeat-timeout': 100 }), gen("Parameter 'heartbeat-timeout' expects 0 or a value between 500 and 3600000"));
    await assert.rejects(vm.execute('x-colo-set-parameters', { witness: '/nonexistent/dir' }), gen("Parameter 'witness' expects a directory, '/nonexistent/dir' is not one"));
    assert.deepEqual(await vm.execute('x-query-colo-parameters'), { compare: 'off', 'compare-timeout': 3000, 'heartbeat-timeout': 0, witness: '' });
    await vm.quit();

    // the source asks: the destination follows without x-colo of its own (QEMU 2.10 and 7.2)
    const a = await startColo({ dstCaps: ['events'] });
    assert.equal((await a.dst.execute<any>('query-migrate')).status, 'colo');
    await a.m.quit();
    // only the destination has it: an ordinary migration
    await runMigration({
      guest: { mem: '16M' },
      destination: { capabilities: ['x-colo'] },
      expect: { source: 'completed', destination: 'completed' },
    });
  });

  it('checkpoints every x-checkpoint-delay; a new delay checkpoints at once and counts from there', async () => {
    const r = await startColo({ delay: 300, guest: { workload: 'stress,rate=1M,seed=2' } });
    const passes = (): any[] => events(r.src, 'MIGRATION_PASS');
    const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;
    const gaps = (es: any[]): number[] => es.slice(1).map((e, i) => eventMs(e) - eventMs(es[i]));
    let seen = passes().length;
    await waitFor(() => passes().length >= seen + 6, 20000, '6 checkpoints');
    const first = gaps(passes().slice(seen, seen + 6));
    assert.ok(median(first) >= 270 && median(first) <= 600, `intervals at 300 ms: ${first.map(Math.round)}`);
    seen = passes().length;
    const t = Date.now();
    await r.src.execute('migrate-set-parameters', { 'x-checkpoint-delay': 1000 });
    // a checkpoint already under way when the delay changed ends first (trigger 'delay'); the
    // 'parameter' one follows at once, and its MIGRATION_PASS is the last one when it is done
    const cp = await waitFor(
      async () => (passes().length > seen && (await colo(r.src))['x-last-checkpoint']?.trigger === 'parameter' ? passes().length : null),
      5000,
      'the checkpoint at once',
      20,
    );
    const at = eventMs(passes()[cp! - 1]);
    assert.ok(at - t < 700, `a checkpoint ${Math.round(at - t)} ms after the change (the old delay was 300, the new 1000)`);
    seen = cp! - 1;
    await waitFor(() => passes().length >= seen + 4, 20000, '3 more checkpoints');
    const later = gaps(passes().slice(seen, seen + 4));
    assert.ok(median(later) >= 900 && median(later) <= 1500, `intervals at 1000 ms: ${later.map(Math.round)}`);
    await r.m.quit();
  });

  it('a checkpoint taken with the primary stopped: equal digests; after failover the secondary is put back to it and continues from it', async () => {
    const r = await startColo({ guest: { workload: 'stress,rate=4M,seed=7', fill: 'text,seed=3' } });
    const { src, dst } = r;
    await waitFor(() => heartbeats(r.srcSerial).length >= 1, 10000, 'a heartbeat');
    await src.execute('stop');
    // two checkpoints: one in flight at the stop may have been taken before it
    await moreCheckpoints(dst, 2);
    await waitFor(async () => (await dst.status()) === 'paused', 5000, 'the secondary mirrors the pause');
    const d = await src.digest();
    assert.equal(await dst.digest(), d, 'the secondary holds the primary at the checkpoint');
    const steps = await src.execute('x-query-workload');
    assert.deepEqual(await dst.execute('x-query-workload'), steps);
    // the standby runs ahead on its own (allowed), writing pages of its own
    await dst.execute('cont');
    await waitFor(async () => (await dst.digest()) !== d, 5000, 'the secondary diverges');
    // the primary dies
    r.src.kill();
    await waitFor(async () => /^Can't receive COLO message/.test((await colo(dst))['x-error'] ?? ''), 10000, 'the secondary reports the broken link');
    await dst.execute('x-colo-lost-heartbeat');
    await waitMigration(dst, ['completed'], 10000);
    // the last checkpoint: the primary's memory, vCPU state and run state (paused)
    assert.equal(await dst.status(), 'paused');
    assert.equal(await dst.digest(), d, 'the pages the secondary wrote are put back');
    assert.deepEqual(await dst.execute('x-query-workload'), steps);
    const last = heartbeats(r.srcSerial).at(-1)!;
    assert.deepEqual(heartbeats(r.dstSerial), [], 'nothing printed during COLO');
    await dst.execute('cont');
    await waitFor(() => heartbeats(r.dstSerial).length >= 2, 10000, 'heartbeats after the takeover');
    assert.equal(heartbeats(r.dstSerial)[0], last + 1, 'the heartbeat continues from the checkpoint');
    const w = await dst.execute<any[]>('x-query-workload');
    assert.ok(w[0].steps > (steps as any[])[0].steps, 'the workload continues');
    await r.m.quit();
  });

  it('the primary killed at random moments, in and between checkpoints: the secondary reports it and takes over a consistent checkpoint', async () => {
    for (let i = 0; i < 2; i++) {
      const r = await startColo({ delay: 100, guest: { workload: 'sweep' } });
      await new Promise((res) => setTimeout(res, Math.random() * 250));
      r.src.kill();
      await waitFor(() => events(r.dst, 'COLO_EXIT').length === 1, 10000, 'COLO_EXIT');
      assert.deepEqual(events(r.dst, 'COLO_EXIT')[0].data, { mode: 'secondary', reason: 'error' });
      await r.dst.execute('x-colo-lost-heartbeat');
      await waitMigration(r.dst, ['completed'], 10000);
      assert.equal(await r.dst.status(), 'running');
      await assertSweepConsistent(r.dst, r.dir, 16 << 20);
      await r.m.quit();
    }
  });

  it('the secondary killed at random moments: the primary reports it, stops, and runs alone after its failover', async () => {
    for (let i = 0; i < 2; i++) {
      const r = await startColo({ delay: 100, guest: { workload: 'sweep' } });
      await new Promise((res) => setTimeout(res, Math.random() * 250));
      r.dst.kill();
      await waitFor(() => events(r.src, 'COLO_EXIT').length === 1, 10000, 'COLO_EXIT');
      assert.deepEqual(events(r.src, 'COLO_EXIT')[0].data, { mode: 'primary', reason: 'error' });
      await waitFor(async () => (await r.src.status()) === 'colo', 5000, 'fail-stop');
      assert.equal((await r.src.execute<any>('query-migrate')).status, 'colo');
      await r.src.execute('x-colo-lost-heartbeat');
      await waitMigration(r.src, ['completed'], 10000);
      assert.equal(await r.src.status(), 'running');
      await assertSweepConsistent(r.src, r.dir, 16 << 20);
      await waitFor(() => heartbeats(r.srcSerial).length >= 2, 10000, 'heartbeats');
      consecutive(heartbeats(r.srcSerial), 'the primary console');
      await r.m.quit();
    }
  });

  it('a checkpoint cut short in transit: the secondary keeps the one before; an unexpected message breaks the next pair', async () => {
    const link = new ColoLinkControl();
    const r = await startColo({ link, guest: { workload: 'stress,rate=4M,seed=9', fill: 'text,seed=4' } });
    const { src, dst } = r;
    await src.execute('stop');
    await moreCheckpoints(dst, 2);
    const d = await src.digest();
    // the next checkpoint reaches the secondary only in part
    link.fault = { checkpoint: link.replies + 1, truncateAt: 200_000 };
    await src.execute('cont');
    await new Promise((res) => setTimeout(res, 300));
    await src.execute('stop');
    assert.notEqual(await src.digest(), d);
    await src.execute('migrate-set-parameters', { 'x-checkpoint-delay': 200 });
    await waitFor(async () => (await colo(dst))['x-error'] !== undefined, 10000, 'the cut checkpoint');
    assert.match((await colo(dst))['x-error'], /^Got \d+ VMState data, less than expected \d+$/);
    await waitFor(async () => (await colo(src))['x-error'] !== undefined, 10000, 'the primary sees the cut');
    await dst.execute('x-colo-lost-heartbeat');
    await waitMigration(dst, ['completed'], 10000);
    assert.equal(await dst.digest(), d, 'the secondary is at the checkpoint before the cut');
    await r.m.quit();

    const link2 = new ColoLinkControl();
    link2.fault = { checkpoint: 2, rewriteReply: 5 };
    const r2 = await startColo({ link: link2 });
    await waitFor(async () => (await colo(r2.src))['x-error'] !== undefined, 10000, 'the primary refuses');
    assert.equal((await colo(r2.src))['x-error'], 'Unexpected COLO message 5, expected 2');
    assert.match(r2.src.stderr, /Unexpected COLO message 5, expected 2/);
    await r2.m.quit();
  });

  it('the console comparison asks for a checkpoint when the consoles differ', async () => {
    // heartbeat lines carry the guest clock and step count, which two runs never share
    const r = await startColo({ delay: 60_000, firstCheckpoint: false, guest: { workload: 'stress,rate=1M,seed=4' } });
    const before = await checkpointsOf(r.src);
    await r.src.execute('x-colo-set-parameters', { compare: 'trigger' });
    await waitFor(async () => (await checkpointsOf(r.src)) > before, 10000, 'a checkpoint the comparison asked for');
    const st = await colo(r.src);
    assert.equal(st['x-last-checkpoint'].trigger, 'compare');
    assert.ok(st['x-compare-checkpoints'] >= 1);
    // full: the primary's lines are held until a checkpoint that covers them was loaded, then printed in order
    await r.src.execute('x-colo-set-parameters', { compare: 'full' });
    const n = heartbeats(r.srcSerial).length;
    await waitFor(() => heartbeats(r.srcSerial).length >= n + 2, 10000, 'lines released');
    consecutive(heartbeats(r.srcSerial), 'the primary console');
    await r.m.quit();
  });

  it('heartbeat timeout with a witness: the secondary takes over by itself when the primary dies', async () => {
    const dir = tempDir('ferry-witness-');
    const r = await startColo();
    for (const vm of [r.src, r.dst]) await vm.execute('x-colo-set-parameters', { 'heartbeat-timeout': 800, witness: dir });
    await moreCheckpoints(r.dst, 2); // the secondary learns the primary's settings from a checkpoint
    r.src.kill();
    await waitMigration(r.dst, ['completed'], 15000);
    assert.equal(await r.dst.status(), 'running');
    const st = await colo(r.dst);
    assert.equal(st.reason, 'error', 'an automatic failover');
    assert.match(readFileSync(join(dir, (await import('node:fs')).readdirSync(dir)[0]!), 'utf8'), /^secondary /);
    await r.m.quit();
  });
});
