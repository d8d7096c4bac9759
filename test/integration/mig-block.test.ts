/**
 * Block migration between `ferry vm` processes: full and incremental under a
 * disk workload (block and memory digests equal), zero-blocks on the wire,
 * a destination without the drive or with one of another size, either side
 * killed in the bulk phase, a destination whose disk fills up (a small tmpfs),
 * and broken images on either side. In every failure the source runs on with
 * its disk and the destination never runs.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { inspectStream } from '../../src/migration/inspect.js';
import { runMigration } from '../helpers/migration.js';
import { cleanupAll, startVm, tempDir, waitFor, waitMigration, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const M = 1 << 20;

function qemuImg(...args: string[]): string {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
  assert.equal(r.status, 0, `qemu-img ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

function qemuIo(file: string, ...cmds: string[]): void {
  const r = spawnSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), file], { encoding: 'utf8' });
  assert.equal(r.status, 0, `qemu-io: ${r.stdout}${r.stderr}`);
}

function randomRaw(path: string, size: number): string {
  writeFileSync(path, randomBytes(size));
  return path;
}

const drive = (file: string, format: string, id = 'd0') => ['-drive', `file=${file},format=${format},if=none,id=${id}`];

interface Digest {
  digest: string;
  drives: { device: string; size: number; digest: string }[];
}
const blockDigest = (vm: VmHandle) => vm.execute<Digest>('x-query-block-digest');
const diskSteps = async (vm: VmHandle) => (await vm.execute<{ steps: number }[]>('x-query-disk-workload'))[0]!.steps;
const blockCap = async (vm: VmHandle) =>
  (await vm.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities')).find((c) => c.capability === 'block')!.state;

describe('block migration between ferry vm processes', { timeout: 600000 }, () => {
  it('full, a raw and a qcow2 drive under a disk workload: disks and memory arrive equal, disk in query-migrate', { timeout: 90000 }, async () => {
    const dir = tempDir('ferry-blk-');
    const raw = randomRaw(join(dir, 'a.raw'), 24 * M);
    const q = join(dir, 'b.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', q, '16M');
    const rawD = join(dir, 'a-dst.raw');
    qemuImg('create', '-q', '-f', 'raw', rawD, '24M');
    const qD = join(dir, 'b-dst.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', qD, '16M');
    let disk: Record<string, number> | undefined;
    await runMigration({
      dir,
      guest: { mem: '32M' },
      source: {
        fill: 'random,seed=1',
        workload: 'stress,rate=2M,seed=2',
        args: [...drive(raw, 'raw'), ...drive(q, 'qcow2', 'd1'), '-disk-workload', 'drive=d1,rate=8M,wss=8M,write=64K,seed=3'],
        parameters: { 'max-bandwidth': 48 * M },
      },
      destination: { args: [...drive(rawD, 'raw'), ...drive(qD, 'qcow2', 'd1')] },
      migrate: { blk: true },
      during: async (m) => {
        assert.equal(await blockCap(m.src), true, 'blk: the block capability is on while it runs');
        disk = (await waitMigration(m.src, ['active'], 10000)).disk as Record<string, number> | undefined;
      },
      expect: { sameDisks: true },
      after: async (m) => {
        assert.equal(m.info.disk, undefined, 'no disk figures once completed');
        assert.equal(await blockCap(m.src), false, 'and off again after the migration');
        assert.deepEqual(await m.d.execute('x-query-disk-workload'), await m.src.execute('x-query-disk-workload'));
        assert.ok((await diskSteps(m.src)) > 0);
      },
    });
    assert.ok(disk, 'query-migrate had disk while active');
    assert.equal(disk.total, 40 * M);
    assert.equal(disk.transferred + disk.remaining, disk.total);
    for (const k of ['duplicate', 'skipped', 'normal', 'normal-bytes', 'dirty-pages-rate', 'mbps', 'dirty-sync-count', 'postcopy-requests', 'page-size']) {
      assert.equal(disk[k], 0, k);
    }
  });

  it('incremental (inc): over the same base on both sides, under a disk workload', { timeout: 60000 }, async () => {
    const dir = tempDir('ferry-blk-');
    const base = randomRaw(join(dir, 'base.raw'), 32 * M);
    const dstDir = join(dir, 'dst');
    mkdirSync(dstDir);
    writeFileSync(join(dstDir, 'base.raw'), readFileSync(base));
    const top = join(dir, 'top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', top);
    qemuIo(top, 'write -P 7 5M 1M');
    const dtop = join(dstDir, 'top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', dtop);
    const m = await runMigration({
      dir,
      guest: { mem: '16M' },
      transport: 'file', // the stream stays for a look at what went
      source: { args: [...drive(top, 'qcow2'), '-disk-workload', 'drive=d0,rate=4M,start=20M,wss=2M,seed=8'] },
      destination: { args: drive(dtop, 'qcow2') },
      migrate: { inc: true },
      expect: { sameDisks: true },
      after: async (mm) => {
        const p = await mm.src.execute<Record<string, unknown>>('query-migrate-parameters');
        assert.equal(p['block-incremental'], false, 'inc: block-incremental again off afterwards');
      },
    });
    // 32 MiB of disk, of which the top holds a few chunks: the stream holds those (some more than
    // once: the workload writes on, and a loaded machine makes more passes), never a chunk of the base
    const { records } = await inspectStream(readFileSync(m.file!), { keepRecords: false });
    const offsets = new Set<number>();
    for (const r of records) {
      if (r.type !== 'section' || r.idstr !== 'block') continue;
      for (const b of r.block ?? []) if (b.kind === 'chunk') offsets.add(b.offset);
    }
    // the top holds 5M (qemu-io's write) and what the workload wrote in 20M..22M
    assert.ok(offsets.has(5 * M), `the top's chunk at 5M went: ${[...offsets].join(', ')}`);
    for (const o of offsets) assert.ok(o === 5 * M || (o >= 20 * M && o < 22 * M), `a chunk of the base went: ${o}`);
  });

  it('zero-blocks: the stream is smaller by the zero chunks\' megabytes', { timeout: 60000 }, async () => {
    const sizes: number[] = [];
    for (const zero of [false, true]) {
      const dir = tempDir('ferry-blk-');
      const img = join(dir, 'z.raw');
      qemuImg('create', '-q', '-f', 'raw', img, '24M');
      writeFileSync(img, randomBytes(2 * M), { flag: 'r+' }); // 2 chunks of data, 22 of zeros
      const out = join(dir, 'z-dst.raw');
      qemuImg('create', '-q', '-f', 'raw', out, '24M');
      const m = await runMigration({
        dir,
        guest: { mem: '16M' },
        transport: 'file',
        capabilities: zero ? ['zero-blocks'] : [],
        source: { args: drive(img, 'raw') },
        destination: { args: drive(out, 'raw') },
        migrate: { blk: true },
        expect: { sameDisks: true },
      });
      sizes.push(statSync(m.file!).size);
    }
    const saved = sizes[0]! - sizes[1]!;
    assert.ok(Math.abs(saved - 22 * M) < 4096, `zero-blocks saved ${saved} bytes (${sizes.join(' -> ')})`);
  });

  it('misuse: a destination without the drive, or with one of another size: refused with the texts, the source runs on', { timeout: 60000 }, async () => {
    const dir = tempDir('ferry-blk-');
    const img = randomRaw(join(dir, 'm.raw'), 8 * M);
    const other = join(dir, 'other.raw');
    qemuImg('create', '-q', '-f', 'raw', other, '6M');
    const cases: Array<{ args: string[]; text: string }> = [
      { args: [], text: 'Error unknown block device d0' },
      { args: drive(other, 'raw', 'd1'), text: 'Error unknown block device d0' },
      { args: drive(other, 'raw'), text: "Block device 'd0': Source and target image have different sizes (source 8388608 bytes, target 6291456 bytes)" },
    ];
    for (const c of cases) {
      let before: Digest | undefined;
      await runMigration({
        dir,
        guest: { mem: '16M' },
        source: { args: drive(img, 'raw') },
        destination: { args: c.args },
        capabilities: ['return-path'],
        migrate: { blk: true },
        before: async (m) => (before = await blockDigest(m.src)),
        expect: { source: 'failed', destination: 'failed', sourceRunState: 'running', destinationRunState: 'inmigrate' },
        after: async (m) => {
          assert.equal(m.dinfo!['error-desc'], `load of migration failed: ${c.text}`);
          assert.equal(m.info['error-desc'], 'Destination reported failure (SHUT 1)');
          assert.deepEqual(await blockDigest(m.src), before);
          assert.equal(await blockCap(m.src), false);
          // cont on the failed destination does not start a half-loaded guest
          await m.d.execute('cont');
          assert.equal(await m.d.status(), 'inmigrate');
        },
      });
    }
  });

  it('the destination killed during the bulk phase: the source runs on; a new destination then gets the disk whole', { timeout: 90000 }, async () => {
    const dir = tempDir('ferry-blk-');
    const img = randomRaw(join(dir, 'k.raw'), 32 * M);
    const outs = [0, 1].map((i) => {
      const p = join(dir, `k-dst${i}.raw`);
      qemuImg('create', '-q', '-f', 'raw', p, '32M');
      return p;
    });
    const src = await startVm({ dir, name: 'src', args: ['-m', '16M', ...drive(img, 'raw'), '-disk-workload', 'drive=d0,rate=2M,seed=4'] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 12 * M });
    const dst0 = await startVm({ dir, name: 'dst0', args: ['-m', '16M', ...drive(outs[0]!, 'raw'), '-S', '-incoming', `unix:${join(dir, 'm0.sock')}`] });
    await src.execute('migrate', { uri: `unix:${join(dir, 'm0.sock')}`, blk: true });
    await waitFor(async () => ((await src.execute<{ disk?: { transferred: number } }>('query-migrate')).disk?.transferred ?? 0) >= 4 * M, 20000, 'the bulk walk under way', 20);
    dst0.proc.kill('SIGKILL');
    const info = await waitMigration(src, ['completed', 'failed', 'cancelled'], 20000);
    assert.equal(info.status, 'failed');
    assert.equal(await src.status(), 'running');
    assert.equal(await blockCap(src), false);
    const steps = await diskSteps(src);
    await waitFor(async () => (await diskSteps(src)) > steps, 5000, 'the disk workload goes on');
    // the source's disk, writes during the failed migration included, moves whole to the next destination
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    const dst1 = await startVm({ dir, name: 'dst1', args: ['-m', '16M', ...drive(outs[1]!, 'raw'), '-S', '-incoming', `unix:${join(dir, 'm1.sock')}`] });
    await src.execute('migrate', { uri: `unix:${join(dir, 'm1.sock')}`, blk: true });
    assert.equal((await waitMigration(src)).status, 'completed');
    assert.equal((await waitMigration(dst1)).status, 'completed');
    assert.deepEqual(await blockDigest(dst1), await blockDigest(src));
    await Promise.all([src.quit(), dst1.quit()]);
  });

  it('the source killed during the bulk phase: the destination fails and never runs', { timeout: 60000 }, async () => {
    const dir = tempDir('ferry-blk-');
    const img = randomRaw(join(dir, 's.raw'), 32 * M);
    const out = join(dir, 's-dst.raw');
    qemuImg('create', '-q', '-f', 'raw', out, '32M');
    const src = await startVm({ dir, name: 'src', args: ['-m', '16M', ...drive(img, 'raw')] });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 12 * M });
    const dst = await startVm({ dir, name: 'dst', args: ['-m', '16M', ...drive(out, 'raw'), '-incoming', `unix:${join(dir, 'm.sock')}`] });
    await src.execute('migrate', { uri: `unix:${join(dir, 'm.sock')}`, blk: true });
    await waitFor(async () => ((await src.execute<{ disk?: { transferred: number } }>('query-migrate')).disk?.transferred ?? 0) >= 4 * M, 20000, 'the bulk walk under way', 20);
    src.proc.kill('SIGKILL');
    const info = await waitMigration(dst, ['completed', 'failed'], 20000);
    assert.equal(info.status, 'failed');
    assert.equal(info['error-desc'], 'load of migration failed: Unexpected end of migration stream');
    assert.equal(await dst.status(), 'inmigrate');
    await dst.execute('cont');
    assert.equal(await dst.status(), 'inmigrate');
    await dst.quit();
  });

  const root = process.getuid?.() === 0;
  it('a full disk on the destination (an 8 MiB tmpfs): the destination fails, the source runs on with its image intact',
    { timeout: 60000, skip: root ? false : 'mounting a tmpfs needs root' }, async () => {
      const dir = tempDir('ferry-blk-');
      const mnt = join(dir, 'mnt');
      mkdirSync(mnt);
      const mount = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=8M', 'tmpfs', mnt], { encoding: 'utf8' });
      if (mount.status !== 0) return void assert.fail(`mount -t tmpfs failed: ${mount.stderr}`);
      try {
        const src = join(dir, 'f.qcow2');
        qemuImg('create', '-q', '-f', 'qcow2', src, '32M');
        qemuIo(src, 'write -P 5 0 30M');
        const out = join(mnt, 'f-dst.qcow2');
        qemuImg('create', '-q', '-f', 'qcow2', out, '32M');
        let before: Digest | undefined;
        await runMigration({
          dir,
          guest: { mem: '16M' },
          source: { args: drive(src, 'qcow2') },
          destination: { args: drive(out, 'qcow2') },
          capabilities: ['return-path'],
          migrate: { blk: true },
          before: async (m) => (before = await blockDigest(m.src)),
          expect: { source: 'failed', destination: 'failed', sourceRunState: 'running', destinationRunState: 'inmigrate' },
          after: async (m) => {
            assert.match(m.dinfo!['error-desc'], /^load of migration failed: Block device 'd0': write at byte \d+ failed: No space left on device$/);
            assert.equal(m.info['error-desc'], 'Destination reported failure (SHUT 1)');
            assert.deepEqual(await blockDigest(m.src), before);
          },
        });
        const check = spawnSync('qemu-img', ['check', src], { encoding: 'utf8' });
        assert.equal(check.status, 0, `the source image passes qemu-img check: ${check.stdout}${check.stderr}`);
      } finally {
        spawnSync('umount', ['-l', mnt]);
      }
    });

  it('broken images: a source cluster past the end of its file fails the migration (source runs on); so does one in the destination\'s image', { timeout: 60000 }, async () => {
    const dir = tempDir('ferry-blk-');
    const corrupt = (file: string, at: number, to: number) => {
      const b = readFileSync(file);
      b.writeUInt32BE(0x80000000 + Math.floor(to / 2 ** 32), at);
      b.writeUInt32BE(to >>> 0, at + 4);
      writeFileSync(file, b);
    };
    // source: an L2 entry (cluster 1) points past the end of the file; the guest reads elsewhere
    const src = join(dir, 'bad-src.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', src, '8M');
    qemuIo(src, 'write -P 1 0 64k', 'write -P 2 64k 64k');
    corrupt(src, 0x40008, 0x1000000);
    const size = statSync(src).size;
    const out = join(dir, 'ok-dst.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', out, '8M');
    await runMigration({
      dir,
      guest: { mem: '16M' },
      source: { args: drive(src, 'qcow2') },
      destination: { args: drive(out, 'qcow2') },
      migrate: { blk: true },
      expect: { source: 'failed', destination: 'failed', sourceRunState: 'running', destinationRunState: 'inmigrate' },
      after: (m) => {
        assert.equal(
          m.info['error-desc'],
          `Block device 'd0': read at byte 0 failed: qcow2 image '${src}' is corrupt: data cluster offset 0x1000000 (L1 index: 0x0, L2 index: 0x1) lies past the end of the file (${size} bytes)`,
        );
      },
    });
    // destination: its own image has the broken entry; the chunk written there fails the load
    const good = join(dir, 'good-src.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', good, '8M');
    qemuIo(good, 'write -P 3 0 1M');
    const bad = join(dir, 'bad-dst.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', bad, '8M');
    qemuIo(bad, 'write -P 1 0 64k', 'write -P 2 64k 64k');
    corrupt(bad, 0x40008, 0x1000000);
    const badSize = statSync(bad).size;
    await runMigration({
      dir,
      guest: { mem: '16M' },
      source: { args: drive(good, 'qcow2') },
      destination: { args: drive(bad, 'qcow2') },
      capabilities: ['return-path'],
      migrate: { blk: true },
      expect: { source: 'failed', destination: 'failed', sourceRunState: 'running', destinationRunState: 'inmigrate' },
      after: (m) => {
        assert.equal(
          m.dinfo!['error-desc'],
          `load of migration failed: Block device 'd0': write at byte 0 failed: qcow2 image '${bad}' is corrupt: data cluster offset 0x1000000 (L1 index: 0x0, L2 index: 0x1) lies past the end of the file (${badSize} bytes)`,
        );
      },
    });
  });
});
