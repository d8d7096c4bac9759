import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  Machine,
  formatWorkload,
  parseWorkload,
  type MachineConfig,
} from '../../src/machine/index.js';
import { VcpuDevice } from '../../src/machine/device-state.js';
import { StressLoop, SweepLoop, seedXorshift, stressSalt } from '../../src/machine/workload.js';
import { VS_NSLOTS, VS_NSLOTS_V1, VS_READ, VS_STEPS, VS_SUM } from '../../src/machine/layout.js';

const M = 1 << 20;

async function waitFor(cond: () => boolean, ms = 20_000, what = 'condition'): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timeout waiting for ${what}`);
    await sleep(2);
  }
}

function clearPresent(m: Machine, block: number, page: number): void {
  Atomics.and(m.ram[block]!.present, page >>> 5, ~(1 << (page & 31)));
}

function pageBytes(m: Machine, page: number): Uint8Array {
  return m.ram[0]!.bytes.slice(page * 4096, page * 4096 + 4096);
}

/** A page that vCPU 0 of stress(seed) over a stripe of `stripe` pages writes for the first time at step 40..63. */
function earlyStressPage(stripe: number, seed: number): number {
  const bytes = [new Uint8Array(stripe * 4096)];
  const dirty = [new Int32Array(Math.ceil(stripe / 32))];
  const none = [new Int32Array(Math.ceil(stripe / 32))];
  const l = new StressLoop(bytes, dirty, 0, stripe, 8, stressSalt(0), false);
  l.setRng(seedXorshift(seed, 0));
  const seen = new Set<number>();
  for (let i = 0; i < 64; i++) {
    assert.equal(l.run(1, none), 0); // nothing present: reports the page of the next step
    if (i >= 40 && !seen.has(l.faultPage)) return l.faultPage;
    seen.add(l.faultPage);
    l.run(1);
  }
  throw new Error('no fresh page');
}

test('StressLoop/SweepLoop: a missing page stops the step and leaves the state untouched', () => {
  const pages = 64;
  const bytes = [new Uint8Array(pages * 4096)];
  const dirty = [new Int32Array(2)];
  const present = [new Int32Array(2).fill(-1)];
  const a = new StressLoop(bytes, dirty, 0, pages, 8, 7, true, true);
  const b = new StressLoop([bytes[0]!.slice()], [new Int32Array(2)], 0, pages, 8, 7, true, true);
  a.setRng(seedXorshift(5, 0));
  b.setRng(seedXorshift(5, 0));
  assert.equal(a.run(100, present), 100);
  b.run(100);
  assert.deepEqual([a.s0, a.s1, a.s2, a.s3, a.steps, a.sum], [b.s0, b.s1, b.s2, b.s3, b.steps, b.sum]);
  // all pages missing: nothing happens
  present[0]!.fill(0);
  const before = [a.s0, a.s1, a.s2, a.s3, a.steps, a.sum];
  const mem = bytes[0]!.slice();
  assert.equal(a.run(10, present), 0);
  assert.deepEqual([a.s0, a.s1, a.s2, a.s3, a.steps, a.sum], before);
  assert.deepEqual(bytes[0], mem);
  assert.equal(a.faultBlock, 0);
  assert.ok(a.faultPage >= 0 && a.faultPage < pages);
  // the missing page is the one the next step touches first (the read page with read=on)
  present[0]![a.faultPage >>> 5] = 1 << (a.faultPage & 31);
  const p1 = a.faultPage;
  const done = a.run(1, present);
  if (done === 0) assert.notEqual(a.faultPage, p1, 'second page of the step is reported next');

  const sp = [new Int32Array(2).fill(-1)];
  const s = new SweepLoop(bytes, dirty, 4, 20, true);
  sp[0]![0] = ~(1 << 10);
  assert.equal(s.run(100, sp), 6);
  assert.equal(s.pos, 10);
  assert.equal(s.steps, 6);
  assert.equal(s.faultPage, 10);
  sp[0]![0] = -1;
  assert.equal(s.run(100, sp), 100);
});

test('a running stress vCPU faults on a missing page, reports it, blocks, and continues after markPresent', async () => {
  const ram = 4 * M;
  const pages = ram / 4096;
  const seed = 9;
  const target = earlyStressPage(pages, seed);
  const m = await Machine.create({ ramSize: ram, smp: 1, startPaused: true, workload: { kind: 'stress', seed } });
  try {
    const faults: [number, number][] = [];
    clearPresent(m, 0, target);
    const orig = pageBytes(m, target);
    m.beginDemandPaging((b, p) => faults.push([b, p]));
    assert.equal(m.demandPaging, true);
    await m.start();
    await waitFor(() => faults.length > 0 && m.workloadInfo()[0]!.blocked, 10_000, 'fault');
    assert.deepEqual(faults, [[0, target]]);
    const s1 = m.workloadInfo()[0]!.steps;
    await sleep(60);
    assert.equal(m.workloadInfo()[0]!.steps, s1, 'steps do not advance while blocked');
    assert.equal(m.workloadInfo()[0]!.blocked, true);
    assert.deepEqual(pageBytes(m, target), orig, 'the faulting write did not happen');
    assert.equal(faults.length, 1, 'one fault message per fault');
    m.markPresent(0, target);
    await waitFor(() => m.workloadInfo()[0]!.steps > s1 + 1000, 10_000, 'progress');
    assert.equal(m.workloadInfo()[0]!.blocked, false);
    const st = m.faultStats();
    assert.equal(st.faults, 1);
    assert.equal(st.latenciesUs.length, 1);
    assert.ok(st.latenciesUs[0]! >= 50_000, `latency ${st.latenciesUs[0]} µs covers the blocked time`);
    m.endDemandPaging();
    assert.equal(m.demandPaging, false);
  } finally {
    await m.destroy();
  }
});

test('pause and stop(internal-error) while a vCPU is blocked; endDemandPaging releases it', async () => {
  const ram = 4 * M;
  const pages = ram / 4096;
  const seed = 4;
  const target = earlyStressPage(pages / 2, seed);
  const m = await Machine.create({ ramSize: ram, smp: 2, startPaused: true, workload: { kind: 'stress', seed } });
  try {
    const faults: number[] = [];
    clearPresent(m, 0, target);
    m.beginDemandPaging((_b, p) => faults.push(p));
    await m.start();
    await waitFor(() => m.workloadInfo()[0]!.blocked, 10_000, 'vCPU 0 blocked');
    // vCPU 1 (other stripe) keeps running
    const v1 = m.workloadInfo()[1]!.steps;
    await waitFor(() => m.workloadInfo()[1]!.steps > v1, 10_000, 'vCPU 1 runs');
    await m.stop();
    assert.ok(m.lastPauseLatencyMs < 18, `pause of a blocked vCPU took ${m.lastPauseLatencyMs} ms`);
    const info = m.workloadInfo();
    assert.equal(info[0]!.blocked, false);
    const saved = m.saveVcpu(0);
    await m.start(); // resume: the step is retried and faults again
    await waitFor(() => m.workloadInfo()[0]!.blocked && faults.length === 2, 10_000, 'blocked again after resume');
    assert.deepEqual(faults, [target, target]);
    await m.stop();
    assert.deepEqual(m.saveVcpu(0), saved, 'state saved while blocked is the same pre-step state');
    await m.start();
    await waitFor(() => m.workloadInfo()[0]!.blocked && faults.length === 3, 10_000, 'blocked once more');
    // endDemandPaging: the vCPU does its step even though the page is not marked present
    const other = (target + 1) % (pages / 2);
    clearPresent(m, 0, other);
    m.endDemandPaging();
    await waitFor(() => m.workloadInfo()[0]!.steps > saved[VS_STEPS]! + 2000, 10_000, 'released');
    assert.equal(faults.length, 3, 'no fault reported after endDemandPaging');
    // a guest that must never run again
    clearPresent(m, 0, target);
    m.beginDemandPaging(() => undefined);
    await waitFor(() => m.workloadInfo()[0]!.blocked, 10_000, 'blocked for internal-error');
    await m.stop('internal-error');
    assert.equal(m.runState, 'internal-error');
    assert.equal(m.vcpusPaused, true);
    assert.equal(m.workloadInfo()[0]!.blocked, false);
  } finally {
    await m.destroy();
  }
});

test('digest and pmemsave refuse while demand paging is on', async () => {
  const m = await Machine.create({ ramSize: 4 * M, smp: 1, startPaused: true });
  const dir = mkdtempSync(join(tmpdir(), 'ferry-dp-'));
  try {
    m.beginDemandPaging(() => undefined);
    await assert.rejects(m.digest(), /Guest memory is still being fetched from the migration source/);
    await assert.rejects(m.pmemsave(0, 4096, join(dir, 'x')), /Guest memory is still being fetched from the migration source/);
    m.endDemandPaging();
    assert.match((await m.digest()).digest, /^[0-9a-f]{64}$/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
    await m.destroy();
  }
});

async function reference(cfg: MachineConfig): Promise<{ digest: string; sums: number[]; steps: number[] }> {
  const m = await Machine.create(cfg);
  try {
    await waitFor(() => m.workloadDone(), 30_000, 'reference done');
    await m.stop();
    const info = m.workloadInfo();
    return { digest: (await m.digest()).digest, sums: info.map((i) => i.sum), steps: info.map((i) => i.steps) };
  } finally {
    await m.destroy();
  }
}

test('stress read=on to a step limit ends with the same sums and digest with or without demand faults', async () => {
  const steps = 30_000;
  const cfg: MachineConfig = {
    ramSize: 4 * M,
    smp: 2,
    fill: { kind: 'random', seed: 3 },
    workload: { kind: 'stress', seed: 21, write: 16, steps, read: true },
  };
  const ref = await reference(cfg);
  assert.deepEqual(ref.steps, [steps, steps]);
  assert.ok(ref.sums.every((s) => s !== 0));

  // read=off gives different sums (0) and a different digest? the write stream is the
  // same but the PRNG draws differ, so the digest must differ too
  const plain = await reference({ ...cfg, workload: { kind: 'stress', seed: 21, write: 16, steps } });
  assert.notEqual(plain.digest, ref.digest);
  assert.deepEqual(plain.sums, [0, 0]);

  const m = await Machine.create({ ...cfg, startPaused: true });
  try {
    const blk = m.ram[0]!;
    const snapshot = blk.bytes.slice();
    // every page but the first 16 is missing, and a hole reads as zero
    for (let p = 16; p < blk.pages; p++) clearPresent(m, 0, p);
    blk.bytes.fill(0, 16 * 4096);
    const pending = new Set<number>();
    let faults = 0;
    const deliver = (p: number): void => {
      if (Atomics.load(blk.present, p >>> 5) & (1 << (p & 31))) return;
      blk.bytes.set(snapshot.subarray(p * 4096, p * 4096 + 4096), p * 4096);
      m.markPresent(0, p);
    };
    m.beginDemandPaging((b, p) => {
      assert.equal(b, 0);
      faults++;
      if (pending.has(p)) return;
      pending.add(p);
      setTimeout(() => {
        pending.delete(p);
        deliver(p);
      }, 1);
    });
    await m.start();
    // pause and resume a few times mid-run (a vCPU may be blocked at that moment)
    for (let i = 0; i < 3; i++) {
      await sleep(40);
      await m.stop();
      await sleep(5);
      await m.start();
    }
    await waitFor(() => faults > 200, 30_000, 'faults');
    // background: everything else arrives
    for (let p = 0; p < blk.pages; p++) deliver(p);
    await waitFor(() => m.workloadDone(), 30_000, 'done');
    const st = m.faultStats();
    assert.ok(st.faults > 100 && st.faults <= faults, `faults ${st.faults} (reported ${faults})`);
    assert.equal(st.latenciesUs.length, st.faults);
    assert.ok(st.latenciesUs.every((x) => x >= 0));
    m.endDemandPaging();
    await m.stop();
    const info = m.workloadInfo();
    assert.deepEqual(info.map((i) => i.steps), ref.steps);
    assert.deepEqual(info.map((i) => i.sum), ref.sums);
    assert.equal((await m.digest()).digest, ref.digest);
  } finally {
    await m.destroy();
  }
});

test('workload read=on: parse, format, ferry-vcpu v2 carries the checksum and v1 still loads', async () => {
  const w = parseWorkload('stress,seed=1,read=on');
  assert.deepEqual(w, { kind: 'stress', seed: 1, read: true });
  assert.equal(formatWorkload(w), 'stress,seed=1,read=on');
  assert.deepEqual(parseWorkload('stress,read=off'), { kind: 'stress' });
  assert.throws(() => parseWorkload('stress,read=yes'), /expected on or off/);
  assert.throws(() => parseWorkload('sweep,read=on'), /Unknown workload sweep option 'read'/);

  const a = await Machine.create({ ramSize: 4 * M, smp: 1, fill: { kind: 'random' }, workload: { kind: 'stress', steps: 5000, read: true } });
  const b = await Machine.create({ ramSize: 4 * M, smp: 1, startPaused: true });
  try {
    await waitFor(() => a.workloadDone(), 10_000, 'done');
    await a.stop();
    const devA = a.devices.find((d) => d.idstr === 'ferry-vcpu') as VcpuDevice;
    const devB = b.devices.find((d) => d.idstr === 'ferry-vcpu') as VcpuDevice;
    assert.equal(devA.version, 2);
    const payload = devA.save();
    assert.equal(payload.length, 8 + VS_NSLOTS * 8);
    devB.load(payload, 2);
    assert.equal(b.workloadInfo()[0]!.sum, a.workloadInfo()[0]!.sum);
    assert.notEqual(a.workloadInfo()[0]!.sum, 0);
    assert.equal(b.workload.kind === 'stress' && b.workload.read, true);
    // version 1: the first 20 slots, read off and sum 0
    const v1 = new Uint8Array(8 + VS_NSLOTS_V1 * 8);
    v1.set(payload.subarray(0, v1.length));
    new DataView(v1.buffer).setUint32(4, VS_NSLOTS_V1);
    devB.load(v1, 1);
    const s = b.saveVcpu(0);
    assert.equal(s[VS_READ], 0);
    assert.equal(s[VS_SUM], 0);
    assert.equal(b.workload.kind === 'stress' && b.workload.read, undefined);
    assert.throws(() => devB.load(payload, 1), /version 1 has 20 slots/);
  } finally {
    await a.destroy();
    await b.destroy();
  }
});
