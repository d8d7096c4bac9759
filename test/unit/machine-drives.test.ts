/**
 * The machine's drives: slots and names as QEMU 7.2 gives them, the open
 * errors, the dirty-chunk log (exactly the touched 1 MiB chunks), and the
 * disk workload (fixed by its seed, paused with the guest, its migrated
 * state going on where the source stopped).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { createImage } from '../../src/block/index.js';
import { DirtyChunks, DIRTY_CHUNK_SIZE } from '../../src/machine/dirty-chunks.js';
import { Drives, DriveError, planDrives, type DriveConfig } from '../../src/machine/drives.js';
import { DiskWorkloadDevice } from '../../src/machine/device-state.js';
import { DiskWorkloadError, fillStep } from '../../src/machine/disk-workload.js';
import { Machine, type MachineConfig } from '../../src/machine/index.js';
import { qemuImg, qemuIo, tmpDir } from './block-helpers.js';

const M = 1 << 20;

function setChunks(bm: Uint32Array, chunks: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < chunks; i++) if ((bm[i >>> 5]! >>> (i & 31)) & 1) out.push(i);
  return out;
}

/* ------------------------------------------------------- dirty chunks */

test('dirty chunks: a write marks exactly the 1 MiB chunks it touches', () => {
  assert.equal(DIRTY_CHUNK_SIZE, 2048 * 512);
  const d = new DirtyChunks(40 * M + 4096); // 41 chunks, the last one short
  assert.equal(d.chunks, 41);
  d.mark(0, 4096); // tracking off: nothing
  d.start();
  assert.equal(d.count(), 0);
  d.mark(0, 1);
  d.mark(M - 1, 2); // straddles chunks 0 and 1
  d.mark(5 * M, M); // exactly chunk 5
  d.mark(7 * M + 1, 0); // empty
  d.mark(32 * M - 512, 512); // the last sector of chunk 31 (word boundary)
  d.mark(32 * M, 512); // the first of chunk 32
  d.mark(40 * M + 4095, 1); // the short last chunk
  assert.deepEqual(setChunks(d.take(), 41), [0, 1, 5, 31, 32, 40]);
  assert.equal(d.count(), 0, 'take clears');
  assert.deepEqual(setChunks(d.take(), 41), []);
  d.mark(10 * M - 1, 3 * M + 2); // chunks 9..13
  assert.deepEqual(setChunks(d.take(), 41), [9, 10, 11, 12, 13]);
  d.mark(2 * M, 1);
  d.start(); // a new start is clean
  assert.equal(d.count(), 0);
  d.mark(2 * M, 1);
  d.stop();
  assert.equal(d.count(), 0);
  assert.throws(() => d.take(), /tracking is off/);
});

test('dirty chunks: guest writes and zero writes through a drive mark their chunks; reads do not', async () => {
  const dir = tmpDir();
  for (const format of ['raw', 'qcow2'] as const) {
    const file = join(dir, `d.${format}`);
    await createImage(file, { format, size: 8 * M });
    const drives = await Drives.open([{ file, format, interface: 'virtio' }]);
    try {
      const d = drives.get('virtio0')!;
      await d.write(0, new Uint8Array(512)); // before tracking
      d.startDirtyTracking();
      assert.equal(d.dirtyTracking, true);
      await d.write(3 * M - 512, new Uint8Array(1024)); // chunks 2, 3
      await d.read(6 * M, new Uint8Array(M)); // a read marks nothing
      await d.writeZeroes(7 * M, 4096); // chunk 7
      assert.equal(d.dirtyChunkCount(), 3);
      assert.deepEqual(setChunks(d.takeDirtyChunks(), 8), [2, 3, 7], format);
      await d.write(M, new Uint8Array(M)); // exactly chunk 1
      assert.deepEqual(setChunks(d.takeDirtyChunks(), 8), [1], format);
      d.stopDirtyTracking();
      await d.write(4 * M, new Uint8Array(512));
      assert.equal(d.dirtyChunkCount(), 0);
    } finally {
      await drives.closeAll();
    }
  }
});

/* ------------------------------------------------------ slots and names */

test('drive names and slots follow QEMU 7.2 (pc machine)', () => {
  const f = (c: Partial<DriveConfig>): DriveConfig => ({ file: 'x', ...c });
  const names = (cs: Partial<DriveConfig>[]) => planDrives(cs.map(f)).map((s) => s.name);
  // if=ide by default, first free index, bus = index / 2, unit = index % 2
  assert.deepEqual(names([{}, {}, {}, {}]), ['ide0-hd0', 'ide0-hd1', 'ide1-hd0', 'ide1-hd1']);
  assert.deepEqual(names([{ index: 1 }, {}, {}]), ['ide0-hd1', 'ide0-hd0', 'ide1-hd0']);
  // virtio<index>, none<index>, an id instead; indexes count per interface
  assert.deepEqual(
    names([{ interface: 'none', index: 5 }, { interface: 'none' }, { interface: 'virtio', index: 3 }, { interface: 'virtio' }, { interface: 'none', id: 'x' }, {}]),
    ['none5', 'none0', 'virtio3', 'virtio0', 'x', 'ide0-hd0'],
  );
  // an id takes its interface's index too
  assert.deepEqual(names([{ interface: 'none', id: 'none0' }, { interface: 'none' }]), ['none0', 'none1']);
  const slot = planDrives([f({ index: 3 })])[0]!;
  assert.deepEqual(slot, { interface: 'ide', index: 3, bus: 1, unit: 1, name: 'ide1-hd1' });

  const err = (cs: Partial<DriveConfig>[], drive: number, re: RegExp) =>
    assert.throws(() => planDrives(cs.map(f)), (e: unknown) => e instanceof DriveError && e.drive === drive && re.test(e.message));
  err([{ id: 'a' }, { id: 'a', interface: 'virtio' }], 1, /^Duplicate ID 'a' for drive$/);
  err([{ index: 0 }, { index: 0 }], 1, /^drive with bus=0, unit=0 \(index=0\) exists$/);
  err([{ interface: 'virtio', index: 2 }, { interface: 'virtio', index: 2 }], 1, /^drive with bus=0, unit=2 \(index=2\) exists$/);
  err([{ id: 'ide0-hd1' }, {}, {}], 1, /^Device with id 'ide0-hd1' already exists$/);
  err([{}, { id: 'ide0-hd0' }], 1, /^Device with id 'ide0-hd0' already exists$/);
  err([{ interface: 'virtio', id: 'virtio1' }, { interface: 'virtio' }], 1, /^Device with id 'virtio1' already exists$/);
  err([{ id: '1abc' }], 0, /^Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '\.', '_', starting with a letter\.$/);
  // duplicate ids are found before any slot (QEMU checks them when it parses the options)
  err([{ index: 0 }, { index: 0 }, { id: 'a' }, { id: 'a' }], 3, /Duplicate ID/);
});

test('opening drives: QEMU\'s texts, and nothing stays open after a failure', async () => {
  const dir = tmpDir();
  const raw = join(dir, 'r.img');
  await createImage(raw, { format: 'raw', size: M });
  const orphan = join(dir, 'orphan.qcow2');
  qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', orphan, '1M']);
  const fails = async (cfgs: DriveConfig[], drive: number, text: string) => {
    await assert.rejects(Drives.open(cfgs), (e: unknown) => {
      assert.ok(e instanceof DriveError, String(e));
      assert.equal(e.message, text);
      assert.equal(e.drive, drive);
      return true;
    });
  };
  const missing = join(dir, 'missing.img');
  await fails([{ file: missing, format: 'raw' }], 0, `Could not open '${missing}': No such file or directory`);
  await fails([{ file: dir, format: 'raw' }], 0, `'file' driver requires '${dir}' to be a regular file`);
  await fails([{ file: raw, format: 'qcow2' }], 0, 'Image is not in qcow2 format');
  await fails([{ file: orphan, format: 'qcow2' }], 0, `Could not open backing file: Could not open '${join(dir, 'gone.qcow2')}': No such file or directory`);
  await fails([{ file: '', format: 'raw' }], 0, 'A block device must be specified for "file"');
  // the machine's devices are checked once every image is open
  await fails([{ file: raw, format: 'raw', index: 4 }], 0, 'machine type does not support if=ide,bus=2,unit=0');
  await fails([{ file: missing, format: 'raw', index: 4 }], 0, `Could not open '${missing}': No such file or directory`);
  await fails([{ file: raw, format: 'raw', readOnly: true }], 0, 'Block node is read-only');
  // the first drive opened, the second failed: the first is closed again (a write lock would show it; here: reopen works)
  await fails([{ file: raw, format: 'raw', interface: 'virtio' }, { file: missing, format: 'raw' }], 1, `Could not open '${missing}': No such file or directory`);
  const ok = await Drives.open([{ file: raw, format: 'raw', interface: 'virtio', readOnly: true }, { file: raw, interface: 'none', readOnly: true }]);
  assert.deepEqual(ok.list.map((d) => [d.name, d.readOnly, d.image.format]), [['virtio0', true, 'raw'], ['none0', true, 'raw']]);
  await ok.closeAll();
});

/* --------------------------------------------------------- disk workload */

async function machineWith(dir: string, name: string, extra: Partial<MachineConfig>, init?: string): Promise<{ m: Machine; file: string }> {
  const file = join(dir, `${name}.qcow2`);
  if (init !== undefined) copyFileSync(init, file);
  else await createImage(file, { format: 'qcow2', size: 16 * M });
  const m = await Machine.create({ ramSize: 16 * M, smp: 1, drives: [{ file, format: 'qcow2', interface: 'virtio' }], ...extra });
  return { m, file };
}

async function untilDone(m: Machine, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (!m.diskWorkloadInfo()[0]!.done) {
    if (Date.now() > end) throw new Error(`disk workload not done: ${JSON.stringify(m.diskWorkloadInfo())}`);
    await sleep(10);
  }
}

function sha(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}

test('disk workload: the same seed and steps give the same disk and checksum; another seed differs', async () => {
  const dir = tmpDir();
  const run = async (name: string, seed: number) => {
    const { m, file } = await machineWith(dir, name, {
      diskWorkload: { drive: 'virtio0', rate: 0, wss: 8 * M, write: 4096, seed, steps: 300, read: true },
    });
    try {
      await untilDone(m);
      await m.stop();
      const info = m.diskWorkloadInfo()[0]!;
      assert.equal(info.steps, 300);
      assert.equal(info.bytesWritten, 300 * 4096);
      return { digest: (await m.blockDigest()).drives[0]!.digest, sum: info.sum, file };
    } finally {
      await m.destroy();
    }
  };
  const a = await run('a', 7);
  const b = await run('b', 7);
  const c = await run('c', 8);
  assert.equal(a.digest, b.digest);
  assert.equal(a.sum, b.sum);
  assert.notEqual(a.sum, 0, 'read=on folds the sectors read (later steps read what earlier ones wrote)');
  assert.notEqual(a.digest, c.digest);
  assert.notEqual(a.sum, c.sum);
  const raw = join(dir, 'a.raw');
  qemuImg(['convert', '-O', 'raw', a.file, raw]);
  assert.equal(sha(raw), a.digest, 'x-query-block-digest is the sha256 of the guest-visible content');
  qemuImg(['check', '-q', a.file]);
});

test('disk workload: paced by the rate, paused with the guest, resumed with it', async () => {
  const dir = tmpDir();
  const { m } = await machineWith(dir, 'p', { diskWorkload: { drive: 'virtio0', rate: 2 * M, write: 4096 } });
  try {
    await sleep(300);
    await m.stop();
    const s1 = m.diskWorkloadInfo()[0]!;
    assert.equal(s1.running, false);
    // 2 MiB/s of 4 KiB = 512 steps/s: ~150 in 300 ms, never more than the clock allows (+ one 50 ms burst)
    assert.ok(s1.steps > 20 && s1.steps <= 512 * (m.vclockNs() / 1e9) + 30, `steps ${s1.steps} at vclock ${m.vclockNs()}`);
    const d1 = (await m.blockDigest()).digest;
    await sleep(200);
    assert.equal(m.diskWorkloadInfo()[0]!.steps, s1.steps, 'no step while stopped');
    assert.equal((await m.blockDigest()).digest, d1, 'no write while stopped');
    await m.start();
    assert.equal(m.diskWorkloadInfo()[0]!.running, true);
    await sleep(200);
    await m.stop();
    assert.ok(m.diskWorkloadInfo()[0]!.steps > s1.steps, 'cont resumes');
  } finally {
    await m.destroy();
  }
});

test('disk workload: its migrated state goes on exactly where the source stopped', async () => {
  const dir = tmpDir();
  const w = { drive: 'virtio0', rate: 4 * M, wss: 4 * M, write: 8192, seed: 99, steps: 400, read: true };
  // the reference runs straight through
  const ref = await machineWith(dir, 'ref', { diskWorkload: w });
  let want: { digest: string; sum: number };
  try {
    await untilDone(ref.m);
    await ref.m.stop();
    want = { digest: (await ref.m.blockDigest()).drives[0]!.digest, sum: ref.m.diskWorkloadInfo()[0]!.sum };
  } finally {
    await ref.m.destroy();
  }

  // the source stops somewhere in the middle (at whatever step the clock got to)
  const src = await machineWith(dir, 'src', { diskWorkload: w });
  let state: Uint8Array;
  let stoppedAt: number;
  try {
    await sleep(150);
    await src.m.stop('finish-migrate');
    stoppedAt = src.m.diskWorkloadInfo()[0]!.steps;
    assert.ok(stoppedAt > 0 && stoppedAt < 400, `stopped at ${stoppedAt}`);
    const dev = src.m.devices.find((d) => d.idstr === 'ferry-disk-workload')!;
    assert.ok(dev instanceof DiskWorkloadDevice);
    assert.equal(dev.needed!(), true);
    state = dev.save();
  } finally {
    await src.m.destroy();
  }

  // the destination has the source's disk (shared storage, or block migration) and no -disk-workload of its own
  const dst = await machineWith(dir, 'dst', { incoming: true }, src.file);
  try {
    const ddev = dst.m.devices.find((d) => d.idstr === 'ferry-disk-workload')!;
    assert.equal(ddev.needed!(), false, 'a machine without a disk workload sends no section');
    ddev.load(state, 1);
    assert.equal(dst.m.diskWorkloadInfo()[0]!.steps, stoppedAt);
    await dst.m.start();
    await untilDone(dst.m);
    await dst.m.stop();
    assert.equal(dst.m.diskWorkloadInfo()[0]!.sum, want.sum);
    assert.equal((await dst.m.blockDigest()).drives[0]!.digest, want.digest);
    // a bad payload is refused with the device's own text
    assert.throws(() => ddev.load(state.subarray(0, 20), 1), /ferry-disk-workload: payload is 20 bytes/);
    const bad = Uint8Array.from(state);
    bad[8] = 'x'.charCodeAt(0); // another drive name
    assert.throws(() => ddev.load(bad, 1), /ferry-disk-workload: drive 'xirtio0' not found \(drives: virtio0\)/);
  } finally {
    await dst.m.destroy();
  }
});

test('disk workload: the bytes of a step are a function of seed and step', () => {
  const a = new Uint8Array(4096);
  const b = new Uint8Array(4096);
  fillStep(a, 1, 10);
  fillStep(b, 1, 10);
  assert.deepEqual(a, b);
  fillStep(b, 2, 10);
  assert.notDeepEqual(a, b);
  fillStep(b, 1, 11);
  assert.notDeepEqual(a, b);
  fillStep(b, 1, 10 + 2 ** 32); // the step's high bits count too
  assert.notDeepEqual(a, b);
});

test('disk workload: a configuration the drive cannot take is refused', async () => {
  const dir = tmpDir();
  const file = join(dir, 'ro.img');
  await createImage(file, { format: 'raw', size: 4 * M });
  mkdirSync(join(dir, 'x'));
  const bad = async (drives: DriveConfig[], dw: NonNullable<MachineConfig['diskWorkload']>, re: RegExp) =>
    assert.rejects(Machine.create({ ramSize: 16 * M, smp: 1, drives, diskWorkload: dw }), (e: unknown) => e instanceof DiskWorkloadError && re.test(e.message));
  const rw: DriveConfig[] = [{ file, format: 'raw', interface: 'virtio' }];
  await bad(rw, { drive: 'nope' }, /^drive 'nope' not found \(drives: virtio0\)$/);
  await bad([{ file, format: 'raw', interface: 'virtio', readOnly: true }], { drive: 'virtio0' }, /^drive 'virtio0' is read-only$/);
  await bad(rw, { drive: 'virtio0', write: 1000 }, /write 1000 must be a multiple of 512/);
  await bad(rw, { drive: 'virtio0', start: 3 * M, wss: 2 * M }, /beyond the drive's 4194304 bytes/);
  await bad(rw, { drive: 'virtio0', wss: 512, write: 4096 }, /wss 512 is smaller than write 4096/);
});

test('drives another process may have written are read again before the guest runs (incoming; after postmigrate)', async () => {
  const dir = tmpDir();
  const file = join(dir, 'shared.qcow2');
  await createImage(file, { format: 'qcow2', size: 4 * M });
  const m = await Machine.create({ ramSize: 16 * M, smp: 1, incoming: true, drives: [{ file, format: 'qcow2', interface: 'virtio' }] });
  try {
    const seen = async () => {
      const b = new Uint8Array(4);
      await m.drives.get('virtio0')!.read(M, b);
      return Buffer.from(b).toString('hex');
    };
    // the source writes a new cluster while this machine has the image open
    qemuIo(file, ['write -P 0x11 1M 64k']);
    assert.equal(await seen(), '00000000', 'the premise: the open image does not see it (its L1 table is cached)');
    await m.setRunState('paused'); // the incoming migration ended
    assert.equal(await seen(), '11111111');
    // migrated away: the other side writes; cont must not use what was cached
    await m.start();
    await m.stop('finish-migrate');
    await m.stop('postmigrate');
    qemuIo(file, ['write -P 0x22 1M 64k', 'write -P 0x33 2M 64k']);
    await m.start();
    assert.equal(await seen(), '22222222');
    await m.stop();
    qemuImg(['check', '-q', file]);
  } finally {
    await m.destroy();
  }
});
