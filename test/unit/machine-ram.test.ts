import { test } from 'node:test';
import assert from 'node:assert/strict';
import { deflateSync } from 'node:zlib';
import { readFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Machine, encodeGlobalState, decodeGlobalState } from '../../src/machine/index.js';

const M = 1 << 20;
const G = 2 ** 30;

test('RAM: 16M is one pc.ram block', async () => {
  const m = await Machine.create({ ramSize: 16 * M, smp: 1, startPaused: true });
  try {
    assert.equal(m.ram.length, 1);
    assert.equal(m.ram[0]!.name, 'pc.ram');
    assert.equal(m.ram[0]!.size, 16 * M);
    assert.equal(m.ram[0]!.pages, 4096);
    assert.equal(m.ram[0]!.dirty.length, 4096 / 32);
    assert.equal(m.ramSize, 16 * M);
    assert.equal(m.runState, 'prelaunch');
  } finally {
    await m.destroy();
  }
});

test('RAM: memory backend id names the block', async () => {
  const m = await Machine.create({ ramSize: 16 * M, smp: 1, startPaused: true, memoryBackendId: 'm' });
  try {
    assert.deepEqual(m.ram.map((b) => b.name), ['m']);
  } finally {
    await m.destroy();
  }
});

test('RAM: 5G is pc.ram, pc.ram.1, pc.ram.2 (2G, 2G, 1G)', async () => {
  const m = await Machine.create({ ramSize: 5 * G, smp: 1, incoming: true });
  try {
    assert.deepEqual(
      m.ram.map((b) => [b.name, b.size]),
      [
        ['pc.ram', 2 * G],
        ['pc.ram.1', 2 * G],
        ['pc.ram.2', 1 * G],
      ],
    );
    assert.equal(m.runState, 'inmigrate');
    // last byte of RAM is addressable
    const { block, offset } = m.locate(5 * G - 1);
    assert.equal(block.name, 'pc.ram.2');
    assert.equal(offset, G - 1);
  } finally {
    await m.destroy();
  }
});

test('RAM: bad sizes are refused', async () => {
  await assert.rejects(Machine.create({ ramSize: 1000, smp: 1 }), /multiple of 4096/);
  await assert.rejects(Machine.create({ ramSize: 16 * M, smp: 0 }), /Invalid smp/);
});

test('fill text compresses about 3:1 with zlib level 1, deterministic by seed', async () => {
  const a = await Machine.create({ ramSize: 16 * M, smp: 1, startPaused: true, fill: { kind: 'text', seed: 4 } });
  const b = await Machine.create({ ramSize: 16 * M, smp: 1, startPaused: true, fill: { kind: 'text', seed: 4 } });
  try {
    const sample = Buffer.from(a.read(3 * M, 4 * M));
    const ratio = sample.length / deflateSync(sample, { level: 1 }).length;
    assert.ok(ratio > 2.5 && ratio < 4, `ratio ${ratio}`);
    assert.equal((await a.digest()).digest, (await b.digest()).digest);
  } finally {
    await a.destroy();
    await b.destroy();
  }
});

test('fill random is incompressible and seed-dependent', async () => {
  const a = await Machine.create({ ramSize: 8 * M, smp: 1, startPaused: true, fill: { kind: 'random', seed: 1 } });
  const b = await Machine.create({ ramSize: 8 * M, smp: 1, startPaused: true, fill: { kind: 'random', seed: 1 } });
  const c = await Machine.create({ ramSize: 8 * M, smp: 1, startPaused: true, fill: { kind: 'random', seed: 2 } });
  try {
    const sample = Buffer.from(a.read(0, 1 * M));
    const ratio = sample.length / deflateSync(sample, { level: 1 }).length;
    assert.ok(ratio < 1.01, `ratio ${ratio}`);
    const [da, db, dc] = await Promise.all([a.digest(), b.digest(), c.digest()]);
    assert.equal(da.digest, db.digest);
    assert.notEqual(da.digest, dc.digest);
    assert.equal(da.blocks[0]!.name, 'pc.ram');
    assert.match(da.digest, /^[0-9a-f]{64}$/);
  } finally {
    await Promise.all([a.destroy(), b.destroy(), c.destroy()]);
  }
});

test('pmemsave writes guest-physical memory; out of range is an error', async () => {
  const m = await Machine.create({ ramSize: 4 * M, smp: 1, startPaused: true, fill: { kind: 'random', seed: 9 } });
  const dir = mkdtempSync(join(tmpdir(), 'ferry-pmem-'));
  try {
    const f = join(dir, 'mem');
    await m.pmemsave(4096, 3 * 4096 + 5, f);
    assert.deepEqual(new Uint8Array(readFileSync(f)), m.read(4096, 3 * 4096 + 5));
    await assert.rejects(m.pmemsave(4 * M - 10, 11, f), /beyond guest RAM/);
    await assert.rejects(m.pmemsave(-1, 1, f), /invalid address/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
    await m.destroy();
  }
});

test('globalstate layout (QEMU 7.2 bytes)', () => {
  const b = encodeGlobalState('prelaunch');
  assert.equal(b.length, 104);
  assert.deepEqual([...b.subarray(0, 14)], [0, 0, 0, 10, ...Buffer.from('prelaunch'), 0]);
  assert.ok(b.subarray(13).every((x) => x === 0));
  assert.equal(decodeGlobalState(b), 'prelaunch');
  const bad = new Uint8Array(b);
  bad[3] = 3; // size 3 but name longer
  assert.throws(() => decodeGlobalState(bad), /NUL-terminated/);
  assert.throws(() => decodeGlobalState(b.subarray(0, 100)), /100 bytes, expected 104/);
  assert.throws(() => decodeGlobalState(encodeGlobalState('nosuch')), /invalid run state 'nosuch'/);
});

test('devices: fixed order, globalstate records the state before finish-migrate', async () => {
  const m = await Machine.create({ ramSize: 4 * M, smp: 2, startPaused: true });
  try {
    assert.deepEqual(
      m.devices.map((d) => `${d.idstr}/${d.instanceId}/v${d.version}`),
      ['timer/0/v2', 'ferry-serial/0/v1', 'ferry-vcpu/0/v2', 'ferry-vcpu/1/v2', 'ferry-disk-workload/0/v1', 'globalstate/0/v1'],
    );
    // without a disk workload its section is not sent
    assert.deepEqual(m.devices.filter((d) => d.needed?.() !== false).map((d) => d.idstr), ['timer', 'ferry-serial', 'ferry-vcpu', 'ferry-vcpu', 'globalstate']);
    const gs = m.devices.find((d) => d.idstr === 'globalstate')!;
    assert.equal(gs.payloadSize!(1), 104);
    assert.equal(decodeGlobalState(gs.save()), 'prelaunch');
    const events: string[] = [];
    m.on('runstate', (n: string, o: string) => events.push(`${o}->${n}`));
    await m.start();
    await m.stop('finish-migrate');
    assert.equal(m.savedRunStateForMigration, 'running');
    assert.equal(decodeGlobalState(gs.save()), 'running');
    await m.stop('postmigrate');
    assert.deepEqual(events, ['prelaunch->running', 'running->finish-migrate', 'finish-migrate->postmigrate']);
    // timer: 24 bytes, both offsets = vclock, middle zero
    const timer = m.devices[0]!;
    const t = timer.save();
    assert.equal(t.length, 24);
    const dv = new DataView(t.buffer);
    assert.equal(dv.getBigInt64(0), dv.getBigInt64(16));
    assert.equal(dv.getBigInt64(8), 0n);
    assert.equal(Number(dv.getBigInt64(16)), m.vclockNs());
    assert.ok(m.vclockNs() > 0);
    assert.throws(() => timer.load(t.subarray(0, 20), 2), /timer: payload is 20 bytes, expected 24/);
    assert.throws(() => timer.load(t, 1), /unsupported version 1/);
    const neg = new Uint8Array(24);
    new DataView(neg.buffer).setBigInt64(16, -5n);
    assert.throws(() => timer.load(neg, 2), /out of range/);
    gs.load(encodeGlobalState('paused'), 1);
    assert.equal(m.loadedGlobalState, 'paused');
    await m.setRunState('paused');
    assert.equal(m.runState, 'paused');
    await m.stop(); // stop of a stopped VM: no change
    assert.equal(m.runState, 'paused');
  } finally {
    await m.destroy();
  }
});

test('serial heartbeat lines go to the file; quit shuts down', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-serial-'));
  const path = join(dir, 'serial.log');
  const m = await Machine.create({ ramSize: 4 * M, smp: 1, serial: { kind: 'file', path }, heartbeatPeriodNs: 30e6 });
  try {
    const deadline = Date.now() + 5000;
    while (m.heartbeatState().count < 3 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    const states: string[] = [];
    m.on('runstate', (s: string) => states.push(s));
    await m.quit();
    assert.deepEqual(states, ['shutdown']);
    const lines = readFileSync(path, 'utf8').trim().split('\n');
    assert.ok(lines.length >= 3);
    assert.match(lines[0]!, /^heartbeat 1 vclock=0\.\d{3}s steps=0$/);
    assert.match(lines[2]!, /^heartbeat 3 /);
    await assert.rejects(m.start(), /destroyed/);
  } finally {
    await m.destroy();
    rmSync(dir, { recursive: true, force: true });
  }
});
