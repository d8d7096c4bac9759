/**
 * COLO between two machines in this process (test/helpers/pair.ts), with
 * the link between them under control (test/helpers/colo-link.ts). The
 * primary's memory digest is taken inside every checkpoint's pause (a
 * replication hook: the guest is stopped there), the secondary's at the
 * moment it takes over (its failover hook: put back, still stopped), so
 * "the secondary runs from the last complete checkpoint" is checked byte
 * for byte, also after a checkpoint cut short, a corrupt one, an
 * unexpected message and a silently dead link.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Pair } from '../helpers/pair.js';
import { ColoLinkControl, coloLinkWrapper } from '../helpers/colo-link.js';
import { waitFor } from '../helpers/vm.js';
import type { ColoService } from '../../src/migration/index.js';

interface Snap {
  digest: string;
  steps: number[];
  heartbeats: number;
}

interface Colo {
  p: Pair;
  src: ColoService;
  dst: ColoService;
  /** the primary at each checkpoint attempt (1-based: [0] is unused) */
  atCheckpoint: Snap[];
  /** the secondary at its takeover */
  takeover: Snap | null;
}

const pairs: Pair[] = [];
after(async () => {
  for (const p of pairs) await p.close();
});

async function snap(m: Pair['src']['machine']): Promise<Snap> {
  return { digest: (await m.digest()).digest, steps: m.vcpuSteps(), heartbeats: m.heartbeatState().count };
}

async function startColo(opts: { link?: ColoLinkControl; delay?: number; heartbeatNs?: number } = {}): Promise<Colo> {
  const p = await Pair.create({
    guest: { ramSize: 16 << 20, smp: 1, fill: { kind: 'text', seed: 2 }, workload: { kind: 'stress', rate: 4 << 20, seed: 3 }, heartbeatPeriodNs: opts.heartbeatNs },
    caps: ['x-colo'],
    params: { 'x-checkpoint-delay': opts.delay ?? 100 },
    wrapDestination: opts.link ? coloLinkWrapper(opts.link) : undefined,
  });
  pairs.push(p);
  const c: Colo = { p, src: p.src.source.colo, dst: p.dst!.destination.colo, atCheckpoint: [{ digest: '', steps: [], heartbeats: 0 }], takeover: null };
  c.src.addReplication({ checkpoint: async () => void c.atCheckpoint.push(await snap(p.src.machine)) });
  c.dst.addReplication({ failover: async () => void (c.takeover = await snap(p.dst!.machine)) });
  p.src.source.start(p.uri);
  await waitFor(() => c.src.status().mode === 'primary' && c.dst.status().mode === 'secondary', 10000, 'both sides in COLO');
  return c;
}

function checkpoints(s: ColoService): number {
  return s.status()['x-checkpoints'];
}

describe('COLO in process', () => {
  it('the secondary takes over exactly the primary of its last checkpoint (its own writes put back)', async () => {
    const c = await startColo();
    await waitFor(() => checkpoints(c.dst) >= 4, 15000, '4 checkpoints');
    assert.deepEqual(c.p.src.statuses, ['setup', 'active', 'colo']);
    assert.deepEqual(c.p.dst!.statuses, ['setup', 'active', 'colo']);
    assert.equal(c.p.dst!.machine.runState, 'running', 'the standby runs');
    const last = c.dst.status()['x-last-checkpoint']!;
    assert.ok(last['reset-pages'] > 0, `the secondary's own writes were put back: ${JSON.stringify(last)}`);
    // the primary dies: the secondary reports it and waits
    c.p.src.source.shutdown();
    await waitFor(() => c.dst.status()['x-error'] !== undefined, 10000, 'the secondary sees the link go');
    assert.match(c.dst.status()['x-error']!, /^Can't receive COLO message: /);
    assert.equal(c.p.dst!.destination.status, 'colo');
    const n = checkpoints(c.dst);
    c.dst.lostHeartbeat();
    await waitFor(() => c.p.dst!.destination.status === 'completed', 10000, 'failover');
    assert.ok(c.takeover, 'takeover captured');
    assert.equal(c.takeover.digest, c.atCheckpoint[n]!.digest, `RAM at takeover = the primary at checkpoint ${n}`);
    assert.deepEqual(c.takeover.steps, c.atCheckpoint[n]!.steps, 'workload counters from the checkpoint');
    assert.equal(c.takeover.heartbeats, c.atCheckpoint[n]!.heartbeats, 'heartbeat count from the checkpoint');
    assert.equal(c.p.dst!.machine.runState, 'running');
    const st = c.dst.status();
    assert.equal(st.mode, 'unknown');
    assert.equal(st['last-mode'], 'secondary');
    assert.equal(st.reason, 'request');
    assert.equal(st['x-failover-status'], 'completed');
    assert.deepEqual(c.p.dst!.statuses, ['setup', 'active', 'colo', 'completed']);
  });

  it('a checkpoint cut short in transit leaves the previous one', async () => {
    const link = new ColoLinkControl();
    link.fault = { checkpoint: 3, truncateAt: 100_000 };
    const c = await startColo({ link });
    await waitFor(() => link.applied && c.dst.status()['x-error'] !== undefined, 15000, 'the cut checkpoint');
    assert.match(c.dst.status()['x-error']!, /^Got \d+ VMState data, less than expected \d+$/);
    assert.equal(checkpoints(c.dst), 2);
    await waitFor(() => c.src.status()['x-error'] !== undefined, 10000, 'the primary sees it');
    assert.equal(c.p.src.machine.runState, 'colo', 'the primary stops until a failover');
    c.dst.lostHeartbeat();
    await waitFor(() => c.takeover !== null, 10000, 'takeover');
    assert.equal(c.takeover!.digest, c.atCheckpoint[2]!.digest, 'the secondary is at checkpoint 2');
    assert.notEqual(c.atCheckpoint[3]!.digest, c.atCheckpoint[2]!.digest, 'checkpoint 3 had changes');
    // the primary runs alone after its own failover
    c.src.lostHeartbeat();
    await waitFor(() => c.p.src.source.status === 'completed', 10000, 'primary failover');
    assert.equal(c.p.src.machine.runState, 'running');
  });

  it('a complete but corrupt checkpoint is refused whole: none of its pages is applied', async () => {
    const link = new ColoLinkControl();
    // the flags byte of a page record in the middle of the checkpoint's `ram` END section (layout:
    // header 8, configuration 9 'none', START 17 + block list 31, footer 5, END 5, the first
    // record 8 + "pc.ram" 7 + 4096, then 8 + 4096 per record)
    const firstData = 8 + 9 + 17 + 31 + 5 + 5 + 8 + 7;
    link.fault = { checkpoint: 3, flipAt: firstData + 4096 + 2 * (8 + 4096) + 7 };
    const c = await startColo({ link });
    await waitFor(() => c.dst.status()['x-error'] !== undefined, 15000, 'the refused checkpoint');
    // the flipped flags lose CONTINUE too: the record then names a block, read from the page before it
    assert.match(c.dst.status()['x-error']!, /^COLO: loadvm failed: (Unknown combination of migration flags|Can't find block)/);
    c.dst.lostHeartbeat();
    await waitFor(() => c.takeover !== null, 10000, 'takeover');
    assert.equal(c.takeover!.digest, c.atCheckpoint[2]!.digest, 'the secondary is at checkpoint 2');
  });

  it('an unexpected COLO message breaks the session with QEMU\'s text; failover on the primary', async () => {
    const link = new ColoLinkControl();
    link.fault = { checkpoint: 2, rewriteReply: 5 };
    const c = await startColo({ link });
    await waitFor(() => c.src.status()['x-error'] !== undefined, 15000, 'the primary refuses the message');
    assert.equal(c.src.status()['x-error'], 'Unexpected COLO message 5, expected 2');
    assert.equal(c.p.src.source.status, 'colo');
    await waitFor(() => c.p.src.machine.runState === 'colo', 5000, 'the primary guest stopped');
    c.src.lostHeartbeat();
    assert.throws(() => c.src.lostHeartbeat(), { message: 'COLO failover is already activated' });
    await waitFor(() => c.p.src.source.status === 'completed', 10000, 'primary failover');
    assert.equal(c.p.src.machine.runState, 'running');
    assert.throws(() => c.src.lostHeartbeat(), { message: "The feature 'colo' is not enabled" });
    const st = c.src.status();
    assert.equal(st['last-mode'], 'primary');
    assert.equal(st.reason, 'request');
  });

  it('a message the secondary does not expect while it waits for a checkpoint: "Got unknown COLO message"', async () => {
    const link = new ColoLinkControl();
    const c = await startColo({ link, delay: 60_000 });
    link.injectForward(Buffer.from([0, 0, 0, 6]));
    await waitFor(() => c.dst.status()['x-error'] !== undefined, 10000, 'the secondary refuses it');
    assert.equal(c.dst.status()['x-error'], 'Got unknown COLO message: 6');
    await waitFor(() => c.src.status()['x-error'] !== undefined, 10000, 'the primary sees the link go');
    assert.equal(c.p.dst!.destination.status, 'colo');
  });

  it('x-checkpoint-delay: a new value checkpoints at once', async () => {
    const c = await startColo({ delay: 60_000 });
    const before = checkpoints(c.src);
    c.p.src.options.setParameters({ 'x-checkpoint-delay': 60_000 });
    c.src.checkpointDelayChanged();
    await waitFor(() => checkpoints(c.src) === before + 1, 10000, 'the checkpoint at once');
    assert.equal(c.src.status()['x-last-checkpoint']!.trigger, 'parameter');
  });

  it('console comparison: differing lines trigger a checkpoint; full holds the primary\'s lines until one is loaded', async () => {
    const c = await startColo({ delay: 60_000, heartbeatNs: 100e6 });
    const written: string[] = [];
    const m = c.p.src.machine;
    const orig = m.writeSerial.bind(m);
    m.writeSerial = (t: string) => {
      written.push(t);
      orig(t);
    };
    c.src.parameters.set({ compare: 'full', 'compare-timeout': 5000 });
    await waitFor(() => checkpoints(c.src) >= 2, 15000, 'checkpoints asked by the comparison');
    const st = c.src.status();
    assert.equal(st['x-last-checkpoint']!.trigger, 'compare');
    assert.ok(st['x-compare-checkpoints'] >= 2);
    // every released line came out after a loaded checkpoint that covered it: none is newer than the secondary's
    const beats = written.join('').split('\n').filter(Boolean).map((l) => Number(l.split(' ')[1]));
    assert.ok(beats.length > 0, 'lines were released');
    for (let i = 1; i < beats.length; i++) assert.equal(beats[i], beats[i - 1]! + 1, 'in order, none lost');
    assert.ok(beats.at(-1)! <= c.p.dst!.machine.heartbeatState().count, 'no released line is ahead of the secondary');
  });

  it('a silently dead link: with a witness the primary keeps the pair, the secondary stays fenced', async () => {
    const witness = mkdtempSync(join(tmpdir(), 'ferry-witness-'));
    try {
      const link = new ColoLinkControl();
      const c = await startColo({ link });
      for (const s of [c.src, c.dst]) s.parameters.set({ 'heartbeat-timeout': 600, witness });
      await waitFor(() => checkpoints(c.dst) >= 2, 15000, 'checkpoints with the new parameters');
      link.freeze();
      await waitFor(() => c.p.src.source.status === 'completed', 10000, 'the primary fails over by itself');
      assert.equal(c.p.src.machine.runState, 'running');
      assert.equal(c.src.status().reason, 'error', 'an automatic failover');
      assert.deepEqual(readdirSync(witness).length, 1);
      // the secondary waits past the primary's timeout and a grace period, then loses the claim
      await waitFor(() => /claimed the pair/.test(c.dst.status()['x-error'] ?? ''), 10000, 'the secondary loses the claim');
      assert.equal(c.p.dst!.destination.status, 'colo');
      assert.equal(c.p.dst!.machine.runState, 'colo', 'the secondary guest stays stopped');
      assert.throws(() => c.dst.lostHeartbeat(), /claimed the pair/, 'not even by hand');
    } finally {
      rmSync(witness, { recursive: true, force: true });
    }
  });

  it('without a witness the secondary never fails over by itself', async () => {
    const link = new ColoLinkControl();
    const c = await startColo({ link });
    for (const s of [c.src, c.dst]) s.parameters.set({ 'heartbeat-timeout': 500 });
    link.freeze();
    await waitFor(() => c.p.src.source.status === 'completed', 10000, 'the primary fails over by itself');
    await waitFor(() => c.p.dst!.log.some((l) => /does not fail over by itself without a witness/.test(l)), 10000, 'the secondary says why it waits');
    assert.equal(c.p.dst!.destination.status, 'colo');
  });
});
