import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { Machine, checkSweep, clearDirty, countDirty, type MachineConfig } from '../../src/machine/index.js';

const M = 1 << 20;

async function waitFor(cond: () => boolean, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timeout waiting for condition');
    await sleep(5);
  }
}

async function runToEnd(cfg: MachineConfig): Promise<string> {
  const m = await Machine.create(cfg);
  try {
    await waitFor(() => m.workloadDone());
    await m.stop();
    return (await m.digest()).digest;
  } finally {
    await m.destroy();
  }
}

test('pause really stops writes; running changes memory', async () => {
  const m = await Machine.create({ ramSize: 16 * M, smp: 2, workload: { kind: 'stress' } });
  try {
    assert.equal(m.runState, 'running');
    await sleep(50);
    await m.stop();
    assert.equal(m.runState, 'paused');
    assert.ok(m.lastPauseLatencyMs < 50, `pause latency ${m.lastPauseLatencyMs}`);
    const steps = m.totalSteps();
    const d1 = (await m.digest()).digest;
    await sleep(200);
    const d2 = (await m.digest()).digest;
    assert.equal(d1, d2);
    assert.equal(m.totalSteps(), steps);
    const v1 = m.vclockNs();
    await sleep(30);
    assert.equal(m.vclockNs(), v1, 'virtual clock frozen while paused');
    await m.start();
    await sleep(50);
    await m.stop();
    assert.notEqual((await m.digest()).digest, d1);
    assert.ok(m.vclockNs() > v1);
  } finally {
    await m.destroy();
  }
});

test('stress with steps=N is deterministic over several vCPUs, also across pauses', async () => {
  const cfg = (seed: number): MachineConfig => ({
    ramSize: 16 * M,
    smp: 3,
    workload: { kind: 'stress', seed, steps: 60_000, write: 32 },
  });
  const a = await runToEnd(cfg(11));
  const b = await runToEnd(cfg(11));
  const c = await runToEnd(cfg(12));
  assert.equal(a, b);
  assert.notEqual(a, c);
  // same seed, interrupted many times
  const m = await Machine.create(cfg(11));
  try {
    for (let i = 0; i < 20 && !m.workloadDone(); i++) {
      await m.stop();
      await m.start();
    }
    await waitFor(() => m.workloadDone());
    await m.stop();
    assert.deepEqual(m.vcpuSteps(), [60_000, 60_000, 60_000]);
    assert.equal((await m.digest()).digest, a);
  } finally {
    await m.destroy();
  }
});

test('sweep with steps=N is deterministic and passes the checker', async () => {
  const cfg: MachineConfig = { ramSize: 8 * M, smp: 2, workload: { kind: 'sweep', steps: 5000 } };
  const a = await runToEnd(cfg);
  const b = await runToEnd(cfg);
  assert.equal(a, b);
  const c = await runToEnd({ ...cfg, workload: { kind: 'sweep', steps: 5001 } });
  assert.notEqual(a, c);
});

test('sweep checker: running sweep is consistent at every pause; corruption is found', async () => {
  const m = await Machine.create({ ramSize: 8 * M, smp: 1, workload: { kind: 'sweep' } });
  try {
    for (let i = 0; i < 10; i++) {
      await sleep(7);
      await m.stop();
      assert.equal(checkSweep(m), null);
      await m.start();
    }
    await m.stop();
    assert.ok(m.totalSteps() > 2048, 'more than one round');
    const { block, offset } = m.locate(5 * M);
    block.bytes[offset] = (block.bytes[offset]! + 77) & 255;
    const bad = checkSweep(m);
    assert.ok(bad !== null);
    assert.equal(bad.addr === 5 * M || bad.addr === 5 * M + 4096, true);
  } finally {
    await m.destroy();
  }
});

test('dirty log: every changed page is marked', async () => {
  for (const workload of [
    { kind: 'stress', write: 1 } as const,
    { kind: 'sweep', start: 0 } as const,
  ]) {
    const m = await Machine.create({ ramSize: 8 * M, smp: 2, workload, fill: { kind: 'random', seed: 3 } });
    try {
      await sleep(20);
      await m.stop();
      const blk = m.ram[0]!;
      clearDirty(blk);
      assert.equal(countDirty(blk), 0);
      const before = new Uint8Array(blk.bytes);
      await m.start();
      await sleep(30);
      await m.stop();
      let changed = 0;
      for (let p = 0; p < blk.pages; p++) {
        const o = p * 4096;
        let diff = false;
        for (let i = 0; i < 4096; i++) {
          if (blk.bytes[o + i] !== before[o + i]) {
            diff = true;
            break;
          }
        }
        if (diff) {
          changed++;
          assert.ok((blk.dirty[p >>> 5]! & (1 << (p & 31))) !== 0, `${workload.kind}: page ${p} changed but not dirty`);
        }
      }
      assert.ok(changed > 10, `${workload.kind}: only ${changed} pages changed`);
      assert.ok(countDirty(blk) >= changed);
    } finally {
      await m.destroy();
    }
  }
});

test('device save/load into a second machine continues the workload exactly', async () => {
  // slow enough (about 4 s of work) that the stop below always lands mid-workload, even on a loaded box
  const wl = { kind: 'stress', seed: 77, steps: 10000, write: 8, rate: 20 * M } as const;
  const src = await Machine.create({ ramSize: 16 * M, smp: 2, workload: wl, heartbeatPeriodNs: 20e6 });
  const dst = await Machine.create({ ramSize: 16 * M, smp: 2, incoming: true, heartbeatPeriodNs: 20e6 });
  try {
    await waitFor(() => src.totalSteps() > 1500 && src.heartbeatState().count >= 2);
    await src.stop('finish-migrate');
    assert.ok(!src.workloadDone());
    // "migrate": RAM copy + device sections in order
    for (let i = 0; i < src.ram.length; i++) dst.ram[i]!.bytes.set(src.ram[i]!.bytes);
    for (let i = 0; i < src.devices.length; i++) {
      const s = src.devices[i]!;
      const d = dst.devices[i]!;
      assert.equal(d.idstr, s.idstr);
      if (s.needed?.() === false) continue; // not sent (ferry-disk-workload without a disk workload)
      const payload = s.save();
      if (s.payloadSize?.(s.version) !== undefined) assert.equal(payload.length, s.payloadSize(s.version));
      d.load(payload, s.version);
    }
    assert.equal(dst.loadedGlobalState, 'running');
    assert.deepEqual(dst.workload, src.workload);
    assert.deepEqual(dst.vcpuSteps(), src.vcpuSteps());
    assert.equal(dst.vclockNs(), Math.floor(src.vclockNs()));
    const hb = src.heartbeatState().count;
    assert.equal(dst.heartbeatState().count, hb);
    const beats: number[] = [];
    dst.on('heartbeat', (n: number) => beats.push(n));
    await dst.start();
    await waitFor(() => dst.workloadDone() && beats.length > 0);
    assert.equal(beats[0], hb + 1);
    // the source, resumed, reaches the same memory
    await src.start();
    await waitFor(() => src.workloadDone());
    await src.stop();
    await dst.stop();
    assert.equal((await dst.digest()).digest, (await src.digest()).digest);
  } finally {
    await src.destroy();
    await dst.destroy();
  }
});

test('device load validates', async () => {
  const a = await Machine.create({ ramSize: 16 * M, smp: 2, startPaused: true, workload: { kind: 'stress' } });
  const b = await Machine.create({ ramSize: 8 * M, smp: 2, incoming: true });
  const c = await Machine.create({ ramSize: 16 * M, smp: 1, incoming: true });
  try {
    const v0 = a.devices[2]!.save();
    assert.throws(() => b.devices[2]!.load(v0, 2), /does not fit/);
    assert.throws(() => c.devices[2]!.load(v0, 2), /source has 2 vCPUs, this machine has 1/);
    assert.throws(() => b.devices[3]!.load(v0, 2), /state is for vCPU 0/);
    assert.throws(() => b.devices[2]!.load(v0.subarray(0, 20), 2), /payload/);
    assert.throws(() => b.devices[1]!.load(new Uint8Array(3), 1), /ferry-serial: payload is 3 bytes/);
  } finally {
    await Promise.all([a.destroy(), b.destroy(), c.destroy()]);
  }
});

test('throttle reduces the write rate', async () => {
  const m = await Machine.create({ ramSize: 16 * M, smp: 1, workload: { kind: 'stress' } });
  try {
    const rate = async (): Promise<number> => {
      const s0 = m.totalSteps();
      const t0 = performance.now();
      await sleep(300);
      return (m.totalSteps() - s0) / (performance.now() - t0);
    };
    await sleep(30);
    const r0 = await rate();
    m.setThrottle(80);
    assert.equal(m.getThrottle(), 80);
    const r80 = await rate();
    m.setThrottle(0);
    assert.ok(r80 < r0 * 0.5, `throttled ${r80}/ms vs ${r0}/ms`);
    assert.throws(() => m.setThrottle(100), /out of range/);
    // pause is prompt even while throttled hard
    m.setThrottle(99);
    await sleep(20);
    const t = performance.now();
    await m.stop();
    assert.ok(performance.now() - t < 100);
  } finally {
    await m.destroy();
  }
});

test('stress rate limit', async () => {
  const m = await Machine.create({ ramSize: 16 * M, smp: 2, workload: { kind: 'stress', rate: 40 * M } });
  try {
    await sleep(500);
    await m.stop();
    const pagesPerSec = m.totalSteps() / (m.vclockNs() / 1e9);
    const want = (40 * M) / 4096;
    assert.ok(pagesPerSec > want * 0.7 && pagesPerSec < want * 1.2, `${pagesPerSec} pages/s, want ~${want}`);
  } finally {
    await m.destroy();
  }
});
