/**
 * `ferry vm` drives end to end: -drive with images made by qemu-img 7.2
 * (raw, qcow2, a backing chain; if=ide/virtio/none), query-block against
 * what QEMU 7.2 itself reports for the same drives, every bad -drive and
 * -disk-workload with its text, the disk workload over QMP (fixed by its
 * seed, stopped with the guest, its writes what qemu-img reads back, images
 * that pass qemu-img check) and its state carried by a migration.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { runMigration } from '../helpers/migration.js';
import { QEMU_SKIP, startQemu } from '../helpers/qemu.js';
import { cleanupAll, runVmExpectingExit, startVm, tempDir, waitFor, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const M = 1 << 20;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function qemuImg(...args: string[]): string {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
  assert.equal(r.status, 0, `qemu-img ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

/** sha256 of the guest-visible content, by qemu-img convert -O raw (through the backing chain). */
function contentDigest(image: string, dir: string): string {
  const out = join(dir, `conv-${Math.random().toString(36).slice(2)}.raw`);
  qemuImg('convert', '-O', 'raw', image, out);
  return createHash('sha256').update(readFileSync(out)).digest('hex');
}

interface DiskInfo {
  device: string;
  steps: number;
  'bytes-written': number;
  sum: number;
  running: boolean;
  done: boolean;
  error?: string;
}

async function diskWorkload(vm: VmHandle): Promise<DiskInfo> {
  const [w] = await vm.execute<DiskInfo[]>('x-query-disk-workload');
  assert.ok(w, 'a disk workload is configured');
  return w;
}

async function blockDigest(vm: VmHandle): Promise<{ digest: string; drives: { device: string; size: number; digest: string }[] }> {
  return vm.execute('x-query-block-digest');
}

async function untilDone(vm: VmHandle, timeoutMs = 30000): Promise<DiskInfo> {
  return waitFor(async () => {
    const w = await diskWorkload(vm);
    assert.equal(w.error, undefined, w.error);
    return w.done ? w : undefined;
  }, timeoutMs, 'the disk workload to finish', 50) as Promise<DiskInfo>;
}

let dir: string;
let raw: string; // 8M raw
let base: string; // 16M qcow2 with data
let top: string; // qcow2 over base (relative backing name)
let vq: string; // 32M qcow2, version 2 (compat 0.10)
let scratch: string; // 4M raw, read-only use

before(() => {
  dir = tempDir('ferry-drives-');
  raw = join(dir, 'disk.raw');
  base = join(dir, 'base.qcow2');
  top = join(dir, 'top.qcow2');
  vq = join(dir, 'v2.qcow2');
  scratch = join(dir, 'ro.raw');
  qemuImg('create', '-q', '-f', 'raw', raw, '8M');
  qemuImg('create', '-q', '-f', 'qcow2', base, '16M');
  const io = spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1M 3M', '-c', 'write -P 0xa5 9M 64k', base], { encoding: 'utf8' });
  assert.equal(io.status, 0, io.stderr);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', vq, '32M');
  qemuImg('create', '-q', '-f', 'raw', scratch, '4M');
});

/** The drives of the query-block tests, in QEMU's syntax (absolute paths). */
function driveArgs(): string[] {
  return [
    '-drive', `file=${raw},format=raw`,
    '-drive', `file=${top},format=qcow2,cache=writethrough`,
    '-drive', `file=${vq},format=qcow2,if=virtio,index=2,cache=unsafe`,
    '-drive', `file=${scratch},format=raw,if=virtio,id=ro0,readonly=on`,
    '-drive', `file=${base},format=qcow2,if=none,readonly=on`,
  ];
}

describe('query-block', () => {
  it('shows each drive with its name, format, size, backing chain, read-only and cache', async () => {
    const vm = await startVm({ args: ['-m', '16M', ...driveArgs()] });
    const info = await vm.execute<any[]>('query-block');
    assert.deepEqual(
      info.map((b) => [b.device, b.removable, b['io-status'], b.inserted.drv, b.inserted.ro, b.inserted.image['virtual-size'], b.inserted.backing_file_depth]),
      [
        ['ide0-hd0', false, 'ok', 'raw', false, 8 * M, 0],
        ['ide0-hd1', false, 'ok', 'qcow2', false, 16 * M, 1],
        ['virtio2', false, 'ok', 'qcow2', false, 32 * M, 0],
        ['ro0', false, 'ok', 'raw', true, 4 * M, 0],
        ['none0', true, undefined, 'qcow2', true, 16 * M, 0],
      ],
    );
    for (const b of info) {
      assert.equal(b.type, 'unknown');
      assert.equal(b.locked, false);
      assert.equal(b.inserted.encrypted, false);
      assert.equal(b.inserted.detect_zeroes, 'off');
    }
    const [r, t, v, , n] = info;
    assert.equal(r.inserted.file, raw);
    assert.deepEqual(r.inserted.image, { filename: raw, format: 'raw', 'virtual-size': 8 * M, 'actual-size': r.inserted.image['actual-size'], 'dirty-flag': false });
    assert.deepEqual(r.inserted.cache, { writeback: true, direct: false, 'no-flush': false });
    // the backing chain: the resolved path in backing_file, the stored name in the image info
    assert.equal(t.inserted.backing_file, base);
    assert.equal(t.inserted.image['backing-filename'], 'base.qcow2');
    assert.equal(t.inserted.image['full-backing-filename'], base);
    assert.equal(t.inserted.image['backing-filename-format'], 'qcow2');
    assert.equal(t.inserted.image['backing-image'].filename, base);
    assert.equal(t.inserted.image['backing-image']['virtual-size'], 16 * M);
    assert.deepEqual(t.inserted.cache, { writeback: false, direct: false, 'no-flush': false });
    assert.deepEqual(t.inserted.image['format-specific'], {
      type: 'qcow2',
      data: { compat: '1.1', 'compression-type': 'zlib', 'lazy-refcounts': false, 'refcount-bits': 16, corrupt: false, 'extended-l2': false },
    });
    assert.deepEqual(v.inserted.image['format-specific'], { type: 'qcow2', data: { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 16 } });
    assert.deepEqual(v.inserted.cache, { writeback: true, direct: false, 'no-flush': true });
    assert.equal(v.inserted.image['cluster-size'], 65536);
    assert.equal(n.inserted.backing_file, undefined);
    await vm.quit();
    assert.equal(vm.exitCode, 0);
  });

  it('probes the format when format= is omitted, and warns about raw as QEMU does', async () => {
    const vm = await startVm({ args: ['-m', '16M', '-drive', `file=${raw},if=virtio,readonly=on`, '-drive', `file=${vq},if=none,readonly=on`] });
    const info = await vm.execute<any[]>('query-block');
    assert.deepEqual(info.map((b) => [b.device, b.inserted.drv]), [['virtio0', 'raw'], ['none0', 'qcow2']]);
    await vm.quit();
    assert.match(vm.stderr, new RegExp(`warning: Image format was not specified for '${raw}' and probing guessed raw\\.`));
    assert.doesNotMatch(vm.stderr, /v2\.qcow2/);
  });

  it('is what QEMU 7.2 reports for the same drives (pc machine), less the members Ferry leaves out', { skip: QEMU_SKIP }, async () => {
    // QEMU's ide-hd cannot be read-only: the read-only drives are virtio and none here too
    const q = await startQemu({ args: ['-M', 'pc', '-S', ...driveArgs()] });
    const want = await q.execute<any[]>('query-block');
    await q.quit();
    const vm = await startVm({ args: ['-m', '16M', ...driveArgs()] });
    const got = await vm.execute<any[]>('query-block');
    await vm.quit();
    for (const b of want) {
      delete b.qdev; // Ferry has no QOM tree
      delete b.inserted['node-name']; // nor a block graph
    }
    assert.deepEqual(got, want);
  });
});

describe('command line', { concurrency: true }, () => {
  // [what, args, the whole error line after "ferry vm: "]
  const cases: () => [string, string[], string][] = () => [
    ['missing file', ['-drive', `file=${dir}/nope.img,format=raw`], `-drive file=${dir}/nope.img,format=raw: Could not open '${dir}/nope.img': No such file or directory`],
    ['a directory', ['-drive', `file=${dir},format=raw`], `-drive file=${dir},format=raw: 'file' driver requires '${dir}' to be a regular file`],
    ['unknown format', ['-drive', `file=${raw},format=vmdk2`], `-drive file=${raw},format=vmdk2: Unknown driver 'vmdk2'`],
    ['a format Ferry lacks', ['-drive', `file=${raw},format=vmdk`], `-drive file=${raw},format=vmdk: Ferry opens raw and qcow2 images only, not 'vmdk'`],
    ['raw as qcow2', ['-drive', `file=${raw},format=qcow2`], `-drive file=${raw},format=qcow2: Image is not in qcow2 format`],
    ['duplicate id', ['-drive', `file=${raw},format=raw,id=a`, '-drive', `file=${scratch},format=raw,id=a,if=none`], `-drive file=${scratch},format=raw,id=a,if=none: Duplicate ID 'a' for drive`],
    ['taken index', ['-drive', `file=${raw},format=raw,index=1`, '-drive', `file=${scratch},format=raw,index=1`], `-drive file=${scratch},format=raw,index=1: drive with bus=0, unit=1 (index=1) exists`],
    ['name clash', ['-drive', `file=${raw},format=raw,id=ide0-hd1`, '-drive', `file=${scratch},format=raw`], `-drive file=${scratch},format=raw: Device with id 'ide0-hd1' already exists`],
    ['IDE index too big', ['-drive', `file=${raw},format=raw,index=7`], `-drive file=${raw},format=raw,index=7: machine type does not support if=ide,bus=3,unit=1`],
    ['bad index', ['-drive', `file=${raw},format=raw,index=1.5`], `-drive file=${raw},format=raw,index=1.5: Parameter 'index' expects a number`],
    ['bad interface', ['-drive', `file=${raw},format=raw,if=foo`], `-drive file=${raw},format=raw,if=foo: unsupported bus type 'foo'`],
    ['bad cache', ['-drive', `file=${raw},format=raw,cache=bogus`], `-drive file=${raw},format=raw,cache=bogus: invalid cache option`],
    ['bad readonly', ['-drive', `file=${raw},format=raw,if=virtio,readonly=maybe`], `-drive file=${raw},format=raw,if=virtio,readonly=maybe: Parameter 'read-only' expects 'on' or 'off'`],
    ['read-only IDE disk', ['-drive', `file=${raw},format=raw,readonly=on`], `-drive file=${raw},format=raw,readonly=on: Block node is read-only`],
    ['unknown option', ['-drive', `file=${raw},format=raw,bogus=1`], `-drive file=${raw},format=raw,bogus=1: Block format 'raw' does not support the option 'bogus'`],
    ['bad id', ['-drive', `file=${raw},format=raw,id=1x`], `-drive file=${raw},format=raw,id=1x: Parameter 'id' expects an identifier`],
    ['empty file', ['-drive', 'file=,format=raw'], `-drive file=,format=raw: A block device must be specified for "file"`],
    ['backing file missing', ['-drive', `file=${dir}/orphan.qcow2,format=qcow2`], `-drive file=${dir}/orphan.qcow2,format=qcow2: Could not open backing file: Could not open '${dir}/gone.qcow2': No such file or directory`],
    ['disk workload without drive=', ['-disk-workload', 'rate=1M'], `-disk-workload rate=1M: Parameter 'drive' is missing (the drive's name, as query-block shows it)`],
    ['disk workload on no such drive', ['-drive', `file=${raw},format=raw`, '-disk-workload', 'drive=virtio0'], `-disk-workload drive=virtio0: drive 'virtio0' not found (drives: ide0-hd0)`],
    ['disk workload on a read-only drive', ['-drive', `file=${raw},format=raw,if=none,readonly=on`, '-disk-workload', 'drive=none0'], `-disk-workload drive=none0: drive 'none0' is read-only`],
    ['disk workload bad write', ['-drive', `file=${raw},format=raw`, '-disk-workload', 'drive=ide0-hd0,write=1000'], `-disk-workload drive=ide0-hd0,write=1000: write 1000 must be a multiple of 512 from 512 to 1M`],
    ['disk workload beyond the drive', ['-drive', `file=${raw},format=raw`, '-disk-workload', 'drive=ide0-hd0,start=4M,wss=8M'], `-disk-workload drive=ide0-hd0,start=4M,wss=8M: start 4194304 + wss 8388608 is beyond the drive's 8388608 bytes`],
    ['disk workload unknown option', ['-disk-workload', 'drive=x,speed=3'], `-disk-workload drive=x,speed=3: Unknown disk workload option 'speed' (allowed: drive, rate, wss, start, write, seed, steps, read)`],
    ['two disk workloads', ['-disk-workload', 'drive=a', '-disk-workload', 'drive=b'], `-disk-workload drive=b: only one disk workload per VM`],
  ];
  before(() => {
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', join(dir, 'orphan.qcow2'), '1M');
  });
  it('each bad -drive and -disk-workload exits with QEMU\'s text (or Ferry\'s), no stack trace', async () => {
    // four processes at a time: 25 node starts at once overran the exit
    // timeout on a loaded two-core machine (killed, so "not exited by itself")
    const todo = cases();
    await Promise.all(
      Array.from({ length: 4 }, async () => {
        for (let c = todo.shift(); c; c = todo.shift()) {
          const [what, args, line] = c;
          const r = await runVmExpectingExit(['-m', '16M', ...args], 30000);
          assert.notEqual(r.code, 0, what);
          assert.notEqual(r.code, null, `${what}: exited by itself`);
          assert.ok(r.stderr.startsWith(`ferry vm: ${line}`), `${what}: ${r.stderr}`);
          assert.ok(!/\n\s+at /.test(r.stderr), `${what}: no stack trace: ${r.stderr}`);
        }
      }),
    );
  });
});

describe('the disk workload', () => {
  const workload = (seed: number, steps: number) => `drive=virtio0,rate=8M,wss=4M,write=4K,seed=${seed},steps=${steps},read=on`;

  async function runToEnd(name: string, seed: number, steps: number, image = 'qcow2'): Promise<{ file: string; digest: string; sum: number }> {
    const file = join(dir, `${name}.${image}`);
    qemuImg('create', '-q', '-f', image, file, '8M');
    const vm = await startVm({ args: ['-m', '16M', '-drive', `file=${file},format=${image},if=virtio`, '-disk-workload', workload(seed, steps)] });
    const w = await untilDone(vm);
    assert.equal(w.steps, steps);
    assert.equal(w['bytes-written'], steps * 4096);
    assert.equal(w.running, false);
    await vm.execute('stop');
    const d = await blockDigest(vm);
    await vm.quit();
    assert.equal(vm.exitCode, 0);
    return { file, digest: d.drives[0]!.digest, sum: w.sum };
  }

  it('is fixed by its seed: same seed and steps, same disk and checksum; another seed differs', async () => {
    const [a, b, c] = await Promise.all([runToEnd('seed1a', 1, 600), runToEnd('seed1b', 1, 600, 'raw'), runToEnd('seed2', 2, 600)]);
    assert.equal(a.digest, b.digest, 'qcow2 and raw drives see the same writes');
    assert.equal(a.sum, b.sum);
    assert.notEqual(a.digest, c.digest);
    assert.notEqual(a.sum, c.sum);
    // what the guest wrote is what qemu-img reads, and the images are sound
    assert.equal(contentDigest(a.file, dir), a.digest);
    assert.equal(contentDigest(b.file, dir), b.digest);
    qemuImg('check', '-q', a.file);
    qemuImg('check', '-q', c.file);
  });

  it('writes only while the guest runs: stop freezes the digest and the steps, cont resumes', async () => {
    const file = join(dir, 'pause.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', file, '8M');
    const vm = await startVm({ args: ['-m', '16M', '-smp', '2', '-workload', 'stress,rate=4M', '-drive', `file=${file},format=qcow2,if=virtio`, '-disk-workload', 'drive=virtio0,rate=4M,write=4K'] });
    await waitFor(async () => (await diskWorkload(vm)).steps > 50, 10000, 'disk writes');
    await vm.execute('stop');
    const w1 = await diskWorkload(vm);
    assert.equal(w1.running, false);
    const d1 = (await blockDigest(vm)).drives[0]!.digest;
    // stopped and flushed: qemu-img reads what the guest wrote (the VM still has the image open)
    assert.equal(contentDigest(file, dir), d1);
    await sleep(300);
    assert.equal((await diskWorkload(vm)).steps, w1.steps, 'no steps while stopped');
    assert.equal((await blockDigest(vm)).drives[0]!.digest, d1, 'no writes while stopped');
    await vm.execute('cont');
    await waitFor(async () => (await diskWorkload(vm)).steps > w1.steps + 50, 10000, 'disk writes after cont');
    assert.notEqual((await blockDigest(vm)).drives[0]!.digest, d1);
    await vm.quit();
    // quit flushed and closed the image: it checks clean and reads as the guest left it
    qemuImg('check', '-q', file);
  });

  it('writes through a backing chain: the top image takes the writes, the digest reads through to the base', async () => {
    const baseCopy = join(dir, 'chain-base.qcow2');
    copyFileSync(base, baseCopy);
    const over = join(dir, 'chain-top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'chain-base.qcow2', '-F', 'qcow2', over);
    const before = contentDigest(baseCopy, dir);
    const vm = await startVm({ args: ['-m', '16M', '-drive', `file=${over},format=qcow2,if=virtio`, '-disk-workload', 'drive=virtio0,rate=0,wss=12M,write=64K,seed=4,steps=200,read=on'] });
    await untilDone(vm);
    const d = await blockDigest(vm);
    await vm.quit();
    assert.equal(contentDigest(over, dir), d.drives[0]!.digest);
    assert.notEqual(d.drives[0]!.digest, before);
    assert.equal(contentDigest(baseCopy, dir), before, 'the backing file is never written');
    qemuImg('check', '-q', over);
  });

  for (const format of ['raw', 'qcow2']) {
  it(`migrates (${format} on shared storage): the destination goes on with the source's sequence exactly where it stopped`, async () => {
    const steps = 1500;
    const w = `drive=virtio0,rate=2M,wss=4M,write=4K,seed=11,steps=${steps},read=on`;
    // the reference runs the whole sequence on its own disk
    const refFile = join(dir, `ref.${format}`);
    qemuImg('create', '-q', '-f', format, refFile, '8M');
    const ref = await startVm({ args: ['-m', '16M', '-drive', `file=${refFile},format=${format},if=virtio`, '-disk-workload', w] });
    // source and destination share one image (block migration is not there yet); the destination
    // opened it before the source wrote most of it, so it must read its metadata again at the end
    const shared = join(dir, `shared.${format}`);
    qemuImg('create', '-q', '-f', format, shared, '8M');
    const drive = ['-drive', `file=${shared},format=${format},if=virtio`];
    let stoppedAt = -1;
    await runMigration({
      guest: { mem: '16M' },
      source: { args: [...drive, '-disk-workload', w] },
      // the destination has the drive but no -disk-workload: it adopts the source's
      destination: { args: drive, paused: false },
      before: async ({ src }) => {
        await waitFor(async () => (await diskWorkload(src)).steps > 200, 10000, 'source disk writes');
      },
      after: async ({ src, d }) => {
        const s = await diskWorkload(src);
        stoppedAt = s.steps;
        assert.equal(s.running, false, 'the source stopped writing at the switchover');
        const end = await untilDone(d);
        const want = await untilDone(ref);
        assert.equal(end.steps, steps);
        assert.equal(end.sum, want.sum);
        await d.execute('stop');
        await ref.execute('stop');
        assert.equal((await blockDigest(d)).drives[0]!.digest, (await blockDigest(ref)).drives[0]!.digest);
      },
    });
    await ref.quit();
    assert.ok(stoppedAt > 200 && stoppedAt < steps, `the source stopped in the middle (step ${stoppedAt})`);
    if (format === 'qcow2') qemuImg('check', '-q', shared);
    assert.equal(contentDigest(shared, dir), contentDigest(refFile, dir));
  });
  }
});
