/**
 * Block migration between two machines in this process (test/helpers/pair.ts):
 * raw and qcow2 drives under a disk workload end with equal digests, `inc`
 * copies only the top image, `zero-blocks` shrinks the stream, `blk`/`inc`
 * turn the capability on for one migration as QEMU 7.2 does, the
 * destination's checks fail the migration early with their texts and the
 * source runs on with its disk, a cancel leaves nothing behind, and with
 * postcopy the block section ends before the switch.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync, truncateSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createImage } from '../../src/block/index.js';
import { BLOCK_DRIVES_SECTION, BLOCK_SECTION } from '../../src/migration/index.js';
import type { BlockSaveSection } from '../../src/migration/block/section.js';
import { inspectStream, type InspectedRecord } from '../../src/migration/inspect.js';
import type { DriveConfig } from '../../src/machine/index.js';
import { Pair, type PairOptions } from '../helpers/pair.js';
import { tappedInput } from '../helpers/fault-channel.js';

const MiB = 1 << 20;
const dirs: string[] = [];
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});
function dir(): string {
  const d = mkdtempSync(join(tmpdir(), 'ferry-blkmig-'));
  dirs.push(d);
  return d;
}

function rawImage(path: string, size: number, random = true): string {
  if (random) writeFileSync(path, randomBytes(size));
  else {
    writeFileSync(path, '');
    truncateSync(path, size);
  }
  return path;
}

const drive = (file: string, format: 'raw' | 'qcow2' = 'raw', id = 'd0'): DriveConfig => ({ file, format, interface: 'none', id });

async function pair(opts: PairOptions): Promise<Pair> {
  return Pair.create({ sections: [BLOCK_SECTION, BLOCK_DRIVES_SECTION], paused: true, ...opts });
}

async function digests(p: Pair): Promise<{ src: string; dst: string }> {
  return { src: (await p.src.machine.blockDigest()).digest, dst: (await p.dst!.machine.blockDigest()).digest };
}

test('full block migration of a raw and a qcow2 drive under a disk workload: disks and memory arrive equal', async () => {
  const d = dir();
  const srcRaw = rawImage(join(d, 'a.raw'), 12 * MiB);
  const dstRaw = rawImage(join(d, 'a-dst.raw'), 12 * MiB, false);
  const srcQ = join(d, 'b.qcow2');
  await createImage(srcQ, { format: 'qcow2', size: 10 * MiB + 512 });
  const dstQ = join(d, 'b-dst.qcow2');
  await createImage(dstQ, { format: 'qcow2', size: 10 * MiB + 512 });
  const p = await pair({
    guest: {
      drives: [drive(srcRaw), drive(srcQ, 'qcow2', 'virtio0')],
      diskWorkload: { drive: 'virtio0', rate: 32 * MiB, wss: 8 * MiB, write: 65536, seed: 7 },
      workload: { kind: 'stress', rate: 4 * MiB, seed: 1 },
      fill: { kind: 'random', seed: 2 },
    },
    destinationGuest: { drives: [drive(dstRaw), drive(dstQ, 'qcow2', 'virtio0')], diskWorkload: undefined },
    params: { 'max-bandwidth': 64 * MiB },
  });
  try {
    let sawDisk: unknown;
    p.src.source.on('status', (s) => {
      if (s === 'active') setTimeout(() => (sawDisk ??= p.src.source.info().disk), 50);
    });
    p.src.source.start(p.uri, { blk: true });
    assert.equal(p.src.options.capability('block'), true, 'blk turns block on for this migration');
    await p.src.source.whenIdle();
    await p.dst!.destination.whenDone();
    assert.equal(p.src.source.status, 'completed', p.src.source.info()['error-desc']);
    assert.equal(p.dst!.destination.status, 'completed');
    assert.equal(p.src.options.capability('block'), false, 'and off again afterwards');
    const { src, dst } = await digests(p);
    assert.equal(dst, src, 'the destination\'s disks are the source\'s');
    assert.equal((await p.dst!.machine.digest()).digest, (await p.src.machine.digest()).digest);
    // the disk workload moved on the source while the disks were copied, and its state came along
    const [w] = p.src.machine.diskWorkloadInfo();
    assert.ok(w!.steps > 0);
    assert.deepEqual(p.dst!.machine.diskWorkloadInfo(), p.src.machine.diskWorkloadInfo());
    // query-migrate showed `disk` while the bulk walk ran; not any more
    const disk = sawDisk as { total: number; transferred: number; remaining: number } | undefined;
    assert.ok(disk, 'disk in query-migrate while active');
    assert.equal(disk.total, 22 * MiB + 512);
    assert.equal(disk.transferred + disk.remaining, disk.total);
    assert.equal(p.src.source.info().disk, undefined);
    // the guest writes after the stop were copied too: the dirty log is off now
    assert.equal(p.src.machine.drives.list.every((x) => !x.dirtyTracking), true);
  } finally {
    await p.close();
  }
});

test('inc: only what the top image holds goes; the destination has the same backing file', async () => {
  const d = dir();
  const base = rawImage(join(d, 'base.raw'), 16 * MiB);
  const dstBase = join(d, 'dst-base.raw');
  copyFileSync(base, dstBase);
  const top = join(d, 'top.qcow2');
  await createImage(top, { format: 'qcow2', backingFile: base, backingFormat: 'raw' });
  const dstTop = join(d, 'dst-top.qcow2');
  await createImage(dstTop, { format: 'qcow2', backingFile: dstBase, backingFormat: 'raw' });
  let sent = 0;
  const p = await pair({
    guest: { drives: [drive(top, 'qcow2')], diskWorkload: { drive: 'd0', rate: 8 * MiB, start: 4 * MiB, wss: 2 * MiB, seed: 3 } },
    destinationGuest: { drives: [drive(dstTop, 'qcow2')], diskWorkload: undefined },
    onSourceTrace: (pt, pr) => {
      if (pt === 'sent') sent = pr.src.source.current!.section<BlockSaveSection>('block')!.sender.counters.bulkChunks;
    },
  });
  try {
    p.src.source.start(p.uri, { inc: true });
    assert.equal(p.src.options.get('block-incremental'), true);
    await p.src.source.whenIdle();
    await p.dst!.destination.whenDone();
    assert.equal(p.src.source.status, 'completed', p.src.source.info()['error-desc']);
    assert.equal(p.src.options.get('block-incremental'), false);
    assert.equal(p.src.options.capability('block'), false);
    const { src, dst } = await digests(p);
    assert.equal(dst, src);
    // the bulk walk sent the chunks of the 2 MiB working set the top image holds, not 16
    assert.ok(sent >= 1 && sent <= 3, `${sent} chunks sent by the bulk walk`);
  } finally {
    await p.close();
  }
});

test('zero-blocks: all-zero chunks go as a flag, the stream is smaller by their megabytes', async () => {
  const d = dir();
  const size = 16 * MiB;
  const img = join(d, 'z.raw');
  rawImage(img, size, false);
  writeFileSync(img, randomBytes(MiB), { flag: 'r+' }); // one chunk of data, fifteen of zeros
  const bytes: Record<string, number> = {};
  for (const zero of [false, true]) {
    const out = rawImage(join(d, `z-dst-${zero}.raw`), size, false);
    const p = await pair({
      guest: { drives: [drive(img)] },
      destinationGuest: { drives: [drive(out)] },
      caps: zero ? ['zero-blocks'] : [],
    });
    try {
      p.src.source.start(p.uri, { blk: true });
      await p.src.source.whenIdle();
      await p.dst!.destination.whenDone();
      assert.equal(p.src.source.status, 'completed');
      const { src, dst } = await digests(p);
      assert.equal(dst, src);
      bytes[String(zero)] = p.src.source.current!.writer!.bytesWritten;
    } finally {
      await p.close();
    }
  }
  // fifteen chunks' data: 15 MiB less (give or take a few records of RAM's passes)
  const saved = bytes['false']! - bytes['true']!;
  assert.ok(Math.abs(saved - 15 * MiB) < 4096, `saved ${saved} bytes`);
});

test('blk and inc as QEMU 7.2: refused while the capability or the parameter is on, "No disk migration" with x-colo', async () => {
  const p = await pair({ noDestination: true, uri: () => 'exec:cat > /dev/null' });
  try {
    p.src.options.setCapabilities([{ capability: 'block', state: true }]);
    assert.throws(() => p.src.source.start(p.uri, { blk: true }), /^MigrationError: Command options are incompatible with current migration capabilities$/);
    p.src.options.setCapabilities([{ capability: 'block', state: false }]);
    p.src.options.setParameters({ 'block-incremental': true });
    assert.throws(() => p.src.source.start(p.uri, { inc: true }), /^MigrationError: Command options are incompatible with current migration capabilities$/);
    p.src.options.setParameters({ 'block-incremental': false });
    // QEMU 7.2's migrate_prepare: blk or inc with x-colo on, before any other blk check
    p.src.options.setCapabilities([{ capability: 'x-colo', state: true }]);
    for (const flags of [{ blk: true }, { inc: true }]) {
      assert.throws(() => p.src.source.start(p.uri, flags), /^MigrationError: No disk migration is required in COLO mode$/);
      assert.equal(p.src.options.capability('block'), false);
      assert.equal(p.src.options.get('block-incremental'), false);
    }
    p.src.options.setCapabilities([{ capability: 'x-colo', state: false }]);
    // a bad URI: the migration fails and blk's capability is off again
    assert.throws(() => p.src.source.start('nosuch:x', { blk: true }));
    assert.equal(p.src.options.capability('block'), false);
    assert.equal(p.src.source.status, 'failed');
  } finally {
    await p.close();
  }
});

/** A migration that the destination refuses: its text, and the source runs on with its disk as it was. */
async function refused(opts: PairOptions, flags: { blk?: boolean; inc?: boolean }, text: string): Promise<void> {
  const p = await pair({ ...opts, caps: ['return-path'] });
  try {
    const before = (await p.src.machine.blockDigest()).digest;
    p.src.source.start(p.uri, flags);
    await p.src.source.whenIdle();
    await p.dst!.destination.whenDone();
    assert.equal(p.dst!.destination.status, 'failed');
    assert.equal(p.dst!.destination.info()['error-desc'], `load of migration failed: ${text}`);
    assert.equal(p.src.source.status, 'failed');
    assert.equal(p.src.source.info()['error-desc'], 'Destination reported failure (SHUT 1)');
    assert.equal(p.src.machine.runState, 'running');
    assert.equal((await p.src.machine.blockDigest()).digest, before);
    assert.equal(p.src.options.capability('block'), false);
    // QEMU's query-migrate has `disk` only while block migration is active (populate_disk_info)
    assert.equal(p.src.source.info().disk, undefined, 'no disk once failed');
    assert.equal(p.dst!.machine.runState, 'inmigrate', 'the destination never runs');
  } finally {
    await p.close();
  }
}

test('the destination lacks the drive, has one of another size, or (inc) one without a backing file: refused before any chunk', async () => {
  const d = dir();
  const img = rawImage(join(d, 's.raw'), 4 * MiB);
  await refused({ guest: { drives: [drive(img)] }, destinationGuest: { drives: [] } }, { blk: true }, 'Error unknown block device d0');
  const other = rawImage(join(d, 'o.raw'), 4 * MiB, false);
  await refused({ guest: { drives: [drive(img)] }, destinationGuest: { drives: [drive(other, 'raw', 'd1')] } }, { blk: true }, 'Error unknown block device d0');
  const small = rawImage(join(d, 'small.raw'), 3 * MiB, false);
  await refused(
    { guest: { drives: [drive(img)] }, destinationGuest: { drives: [drive(small)] } },
    { blk: true },
    "Block device 'd0': Source and target image have different sizes (source 4194304 bytes, target 3145728 bytes)",
  );
  const same = rawImage(join(d, 'same.raw'), 4 * MiB, false);
  await refused(
    { guest: { drives: [drive(img)] }, destinationGuest: { drives: [drive(same)] } },
    { inc: true },
    "Block device 'd0' has no backing file: an incremental block migration (inc, block-incremental) needs the source's backing chain on the destination",
  );
  const ro = rawImage(join(d, 'ro.raw'), 4 * MiB, false);
  await refused(
    { guest: { drives: [drive(img)] }, destinationGuest: { drives: [{ ...drive(ro), readOnly: true }] } },
    { blk: true },
    "Block device 'd0' is read-only: it cannot receive block migration data",
  );
});

test('migrate_cancel during the bulk phase: the source runs on, its dirty logs are off, block is off again', async () => {
  const d = dir();
  const img = rawImage(join(d, 'c.raw'), 32 * MiB);
  const out = rawImage(join(d, 'c-dst.raw'), 32 * MiB, false);
  const p = await pair({
    guest: { drives: [drive(img)], diskWorkload: { drive: 'd0', rate: 4 * MiB, seed: 5 } },
    destinationGuest: { drives: [drive(out)], diskWorkload: undefined },
    params: { 'max-bandwidth': 16 * MiB },
    onSourceTrace: (pt, pr) => {
      if (pt === 'slice' && (pr.src.source.info().disk?.transferred ?? 0) >= 2 * MiB) pr.src.source.cancel();
    },
  });
  try {
    p.src.source.start(p.uri, { blk: true });
    await p.src.source.whenIdle();
    assert.equal(p.src.source.status, 'cancelled');
    assert.equal(p.src.source.info().disk, undefined, 'no disk once cancelled');
    assert.equal(p.src.machine.runState, 'running');
    assert.equal(p.src.machine.drives.list[0]!.dirtyTracking, false);
    assert.equal(p.src.options.capability('block'), false);
    await p.dst!.destination.whenDone();
    assert.equal(p.dst!.destination.status, 'failed');
    assert.equal(p.dst!.machine.runState, 'inmigrate');
    // the guest goes on writing its disk
    const steps = p.src.machine.diskWorkloadInfo()[0]!.steps;
    await new Promise((r) => setTimeout(r, 200));
    assert.ok(p.src.machine.diskWorkloadInfo()[0]!.steps > steps);
  } finally {
    await p.close();
  }
});

test('postcopy: the block section ends (guest stopped) before the switch, and the disk arrives whole', async () => {
  const d = dir();
  const img = rawImage(join(d, 'pc.raw'), 8 * MiB);
  const out = rawImage(join(d, 'pc-dst.raw'), 8 * MiB, false);
  const got: Buffer[] = [];
  const p = await pair({
    guest: { drives: [drive(img)], workload: { kind: 'stress', rate: 64 * MiB, seed: 4 }, ramSize: 32 * MiB },
    destinationGuest: { drives: [drive(out)] },
    caps: ['postcopy-ram'],
    // RAM never converges at this rate: only postcopy ends the migration
    params: { 'max-bandwidth': 32 * MiB },
    paused: false,
    wrapDestination: tappedInput((b) => got.push(b)),
  });
  try {
    p.src.source.start(p.uri, { blk: true });
    p.src.source.requestPostcopy();
    await p.src.source.whenIdle();
    await p.dst!.destination.whenDone();
    assert.equal(p.src.source.status, 'completed', p.src.source.info()['error-desc']);
    assert.ok(p.src.statuses.includes('postcopy-active'));
    const { records } = await inspectStream(Buffer.concat(got), { keepRecords: false });
    const at = (pred: (r: InspectedRecord) => boolean) => records.findIndex(pred);
    const blockEnd = at((r) => r.type === 'section' && r.idstr === 'block' && r.kind === 'end');
    const pkg = at((r) => r.type === 'command' && r.command.cmd === 'PACKAGED');
    assert.ok(blockEnd > 0 && pkg > blockEnd, `block END (${blockEnd}) before the package (${pkg})`);
    // the destination's guest runs; its disk is the source's at the stop
    assert.equal(p.dst!.machine.runState, 'running');
    await p.dst!.machine.stop();
    const { src, dst } = await digests(p);
    assert.equal(dst, src);
  } finally {
    await p.close();
  }
});
