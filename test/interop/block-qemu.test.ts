/**
 * Block migration with a real QEMU 7.2, both ways, with a raw and a qcow2
 * drive; the images are compared with `qemu-img compare` afterwards (and the
 * destination's qcow2 checked with `qemu-img check`). The options on which
 * the two agree are in docs/spec/interop-block.md:
 *
 *   QEMU → Ferry: QEMU `-machine none,memory-backend=m` with the drive as
 *   `-drive ...,if=none,id=d0` (no device: -M none has no bus). Its stream
 *   holds `block`, `ram`, `timer`, `globalstate`: nothing Ferry must skip.
 *   QEMU's downtime-limit is 1 ms here: QEMU 7.2 may otherwise stop its
 *   bulk phase early and leave chunks behind (measured; the notes say when).
 *
 *   Ferry → QEMU: a `-machine none` QEMU cannot take block migration (its
 *   drive has no device, and 7.2 aborts on the first write: "Assertion
 *   `child->perm & BLK_PERM_WRITE' failed"). QEMU runs `-M pc` with the
 *   drive on IDE (`ide0-hd0`) and RAM from the backend `m`; Ferry's
 *   `-machine none` stream then differs only in the configuration record's
 *   machine name, so both sides set `-global migration.send-configuration=off`.
 *   Ferry sends QEMU's device sections only (x-qemu-compat=on); the pc's own
 *   devices keep their reset state.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runMigration } from '../helpers/migration.js';
import { cleanupAll, tempDir } from '../helpers/vm.js';
import { QEMU_SKIP, assertSameRam, cleanupQemu, freePort, pmem } from '../helpers/qemu.js';

after(async () => {
  await cleanupQemu();
  await cleanupAll();
});

const M = 1 << 20;
const RAM16 = ['-object', 'memory-backend-ram,id=m,size=16M'];
const NO_CONFIG = ['-global', 'migration.send-configuration=off'];

function qemuImg(...args: string[]): { status: number | null; out: string } {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
  return { status: r.status, out: r.stdout + r.stderr };
}

function mustImg(...args: string[]): void {
  const r = qemuImg(...args);
  assert.equal(r.status, 0, `qemu-img ${args.join(' ')}: ${r.out}`);
}

function assertIdentical(a: string, b: string): void {
  const r = qemuImg('compare', a, b);
  assert.equal(r.status, 0, `qemu-img compare ${a} ${b}: ${r.out}`);
  assert.match(r.out, /Images are identical/);
}

/** A source image: raw with random data and a zero hole, or qcow2 with data, zero and unallocated clusters. */
function sourceImage(dir: string, format: 'raw' | 'qcow2', name: string): string {
  const file = join(dir, `${name}.${format}`);
  if (format === 'raw') {
    const b = randomBytes(12 * M);
    b.fill(0, 4 * M, 6 * M);
    writeFileSync(file, b);
  } else {
    mustImg('create', '-q', '-f', 'qcow2', file, '12M');
    const io = spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 3M', '-c', 'write -z 3M 64k', '-c', 'write -P 0xa5 7M 100k', file], { encoding: 'utf8' });
    assert.equal(io.status, 0, io.stderr);
  }
  return file;
}

function emptyImage(dir: string, format: 'raw' | 'qcow2', name: string): string {
  const file = join(dir, `${name}.${format}`);
  mustImg('create', '-q', '-f', format, file, '12M');
  return file;
}

let dir = '';
before(() => {
  dir = tempDir('ferry-blk-interop-');
});

async function qemuToFerry(format: 'raw' | 'qcow2'): Promise<void> {
  const src = sourceImage(dir, format, `q2f-src`);
  const dst = emptyImage(dir, format, `q2f-dst`);
  const port = await freePort();
  await runMigration({
    dir,
    source: {
      qemu: true,
      name: `qemu-src-${format}`,
      args: ['-machine', 'none,memory-backend=m', ...RAM16, '-drive', `file=${src},format=${format},if=none,id=d0`],
      parameters: { 'downtime-limit': 1 },
    },
    destination: { name: `ferry-dst-${format}`, machine: ['-machine', 'none,memory-backend=m', ...RAM16], args: ['-drive', `file=${dst},format=${format},if=none,id=d0`] },
    transport: { uri: `tcp:127.0.0.1:${port}` },
    migrate: { blk: true },
    timeoutMs: 60000,
    expect: { sourceRunState: 'postmigrate', settleMs: { sourceRunState: 5000 } },
    after: async ({ d }) => {
      const [drive] = (await d.execute<{ drives: { device: string; size: number }[] }>('x-query-block-digest')).drives;
      assert.deepEqual(drive && { device: drive.device, size: drive.size }, { device: 'd0', size: 12 * M });
    },
  });
  assertIdentical(src, dst);
  if (format === 'qcow2') mustImg('check', '-q', dst);
}

async function ferryToQemu(format: 'raw' | 'qcow2'): Promise<void> {
  const src = sourceImage(dir, format, `f2q-src`);
  const dst = emptyImage(dir, format, `f2q-dst`);
  const port = await freePort();
  let ram: Buffer | undefined;
  await runMigration({
    dir,
    guest: {},
    source: {
      name: `ferry-src-${format}`,
      fill: 'random,seed=6',
      machine: ['-machine', 'none,memory-backend=m,x-qemu-compat=on', ...RAM16],
      // the guest writes its disk while it moves (the workload's own state stays behind)
      args: [...NO_CONFIG, '-drive', `file=${src},format=${format},if=ide`, '-disk-workload', 'drive=ide0-hd0,rate=4M,wss=8M,write=64K,seed=2'],
      parameters: { 'max-bandwidth': 32 * M },
    },
    destination: {
      qemu: true,
      name: `qemu-dst-${format}`,
      args: ['-M', 'pc,memory-backend=m', ...RAM16, ...NO_CONFIG, '-drive', `file=${dst},format=${format},if=ide`, '-S'],
    },
    transport: { uri: `tcp:127.0.0.1:${port}` },
    migrate: { blk: true },
    timeoutMs: 60000,
    expect: { destinationRunState: 'paused', settleMs: { destinationRunState: 5000 } },
    after: async ({ src: s, d }) => {
      // RAM too (on pc, 640K..1M shows the BIOS area, not RAM)
      ram = await pmem(s, dir, 16 * M);
      const theirs = await pmem(d, dir, 16 * M);
      assertSameRam(theirs.subarray(0, 0xa0000), ram.subarray(0, 0xa0000), 'ferry → qemu RAM below 640K');
      assertSameRam(theirs.subarray(M), ram.subarray(M), 'ferry → qemu RAM above 1M');
      assert.equal(d.stderr.replace(/Receiving block device images\s*|Completed \d+ %\s*/g, '').trim(), '', 'QEMU complained of nothing');
    },
  });
  // the source stopped at the switchover with every write on its disk: that is what QEMU has
  assertIdentical(src, dst);
  if (format === 'qcow2') mustImg('check', '-q', dst);
}

describe('block migration with QEMU 7.2', { skip: QEMU_SKIP, timeout: 300000 }, () => {
  it('QEMU → Ferry, raw', { timeout: 90000 }, () => qemuToFerry('raw'));
  it('QEMU → Ferry, qcow2', { timeout: 90000 }, () => qemuToFerry('qcow2'));
  it('Ferry → QEMU, raw, under a disk workload', { timeout: 90000 }, () => ferryToQemu('raw'));
  it('Ferry → QEMU, qcow2, under a disk workload', { timeout: 90000 }, () => ferryToQemu('qcow2'));

  it('a QEMU pc guest is not a source Ferry takes: its machine type, and without the configuration record its RAM blocks', { timeout: 90000 }, async () => {
    for (const [extra, text] of [
      [[], "Machine type received is 'pc-i440fx-7.2' and local is 'none'"],
      [NO_CONFIG, 'Unknown ramblock "/rom@etc/acpi/tables", cannot accept migration'],
    ] as const) {
      const src = sourceImage(dir, 'raw', 'pc-src');
      const dst = emptyImage(dir, 'raw', 'pc-dst');
      const port = await freePort();
      await runMigration({
        dir,
        source: { qemu: true, name: `qemu-pc-${port}`, args: ['-M', 'pc,memory-backend=m', ...RAM16, ...extra, '-drive', `file=${src},format=raw,if=ide`, '-S'] },
        destination: { name: `ferry-pc-${port}`, machine: ['-machine', 'none,memory-backend=m', ...RAM16, ...extra], args: ['-drive', `file=${dst},format=raw,if=ide`] },
        transport: { uri: `tcp:127.0.0.1:${port}` },
        migrate: { blk: true },
        expect: { source: 'ended', destination: 'failed', sourceRunState: null, destinationRunState: 'inmigrate' },
        after: ({ dinfo }) => assert.equal(dinfo!['error-desc'], `load of migration failed: ${text}`),
      });
    }
  });

});

