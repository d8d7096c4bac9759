/**
 * Block replication in one process: a primary's and a secondary's drives
 * (from QEMU-style -drive strings, through the CLI's parser), the
 * secondary disk exported by a real NBD server over a unix socket, the
 * primary mirroring to it. Digests at every step: the secondary's guest
 * sees the last checkpoint plus its own writes whatever the primary
 * writes; a checkpoint makes it the primary's disk; a failover leaves the
 * secondary disk exactly at the last checkpoint plus the secondary's own
 * writes. Then every wrong-state call with QEMU 7.2's text, a mirror that
 * fails (the primary's guest writes on), a failover whose commit fails,
 * and concurrent mirrored writes against the copy-before-write.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { copyFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createImage, openImage, type BlockImage } from '../../src/block/index.js';
import { parseDrive } from '../../src/cli/vm-args.js';
import { driveTarget } from '../../src/commands/nbd.js';
import { Drives } from '../../src/machine/drives.js';
import { NbdServer } from '../../src/nbd/index.js';
import { ReplicationSecondary, type SecondaryDisk } from '../../src/replication/index.js';
import { tmpDir } from './block-helpers.js';

const SIZE = 4 << 20;
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  let x = seed * 2654435761 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

async function content(read: (o: number, b: Uint8Array) => Promise<void>): Promise<Buffer> {
  const b = Buffer.alloc(SIZE);
  await read(0, b);
  return b;
}

interface Pair {
  dir: string;
  server: NbdServer;
  pri: Drives;
  sec: Drives;
  /** The primary's drive, the secondary disk, the secondary's replicated drive. */
  P: Drives['list'][number];
  S: Drives['list'][number];
  R: Drives['list'][number];
  failures: string[];
  close(): Promise<void>;
}

async function pair(opts: { hiddenSize?: number; topId?: string } = {}): Promise<Pair> {
  const dir = tmpDir();
  const initial = pattern(SIZE, 1);
  writeFileSync(join(dir, 'p.raw'), initial);
  writeFileSync(join(dir, 's.raw'), initial);
  await createImage(join(dir, 'a.qcow2'), { format: 'qcow2', size: SIZE });
  await createImage(join(dir, 'h.qcow2'), { format: 'qcow2', size: opts.hiddenSize ?? SIZE });
  const failures: string[] = [];
  const sink = (d: string, e: Error) => failures.push(`${d}: ${e.message}`);
  const sec = await Drives.open(
    [
      parseDrive(`if=none,driver=raw,file.filename=${join(dir, 's.raw')},id=colo1`),
      parseDrive(
        `if=virtio,id=childs1,driver=replication,mode=secondary,top-id=${opts.topId ?? 'childs1'},file.file.filename=${join(dir, 'a.qcow2')},file.driver=qcow2,` +
          `file.backing.file.filename=${join(dir, 'h.qcow2')},file.backing.driver=qcow2,file.backing.backing=colo1`,
      ),
    ],
    sink,
  );
  const sock = join(dir, 'nbd.sock');
  const server = await NbdServer.listen({ kind: 'unix', path: sock });
  server.addExport('colo1', driveTarget(sec.get('colo1')!), { writable: true });
  const pri = await Drives.open(
    [
      parseDrive(
        `if=virtio,id=colo1,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.file.filename=${join(dir, 'p.raw')},children.0.driver=raw,` +
          `children.1.driver=replication,children.1.mode=primary,children.1.file.driver=nbd,children.1.file.path=${sock},children.1.file.export=colo1`,
      ),
    ],
    sink,
  );
  return {
    dir,
    server,
    pri,
    sec,
    P: pri.get('colo1')!,
    S: sec.get('colo1')!,
    R: sec.get('childs1')!,
    failures,
    async close() {
      await pri.closeAll();
      await server.close();
      await sec.closeAll();
    },
  };
}

describe('block replication', { timeout: 60000 }, () => {
  let p: Pair;
  before(async () => {
    p = await pair();
  });
  after(() => p.close());

  it('refuses what the stage does not allow, with QEMU 7.2\'s texts', async () => {
    const { pri, sec, R } = p;
    assert.equal(sec.replication.getErrorAll(), 'Block replication is not running');
    assert.equal(pri.replication.getErrorAll(), 'Block replication is not running');
    await assert.rejects(sec.replication.checkpointAll(), /^ReplicationError: Backup job was cancelled unexpectedly$/);
    await assert.rejects(sec.replication.stopAll(false), /^ReplicationError: Block replication is not running$/);
    await assert.rejects(pri.replication.stopAll(false), /^ReplicationError: Block replication is not running$/);
    await assert.rejects(pri.replication.startAll('secondary'), /^ReplicationError: The parameter mode's value is invalid, needs 0, but got 1$/);
    await assert.rejects(sec.replication.startAll('primary'), /^ReplicationError: The parameter mode's value is invalid, needs 1, but got 0$/);
    // the secondary's guest may not write before start (start empties the overlays)
    await assert.rejects(R.write(0, Buffer.alloc(512)), /Block replication is not running/);
    // the primary cannot start before the secondary serves its disk
    await p.server.removeExport('colo1', 'hard');
    await assert.rejects(pri.replication.startAll('primary'), /Requested export not available: export 'colo1' not present/);
    p.server.addExport('colo1', driveTarget(p.S), { writable: true });
  });

  let checkpointed: Buffer;
  let ownWrites: [number, Buffer][] = [];

  it('mirrors every primary write; the secondary\'s guest keeps seeing the last checkpoint and its own writes', async () => {
    const { pri, sec, P, S, R } = p;
    const initial = await content((o, b) => R.read(o, b));
    await sec.replication.startAll('secondary');
    await pri.replication.startAll('primary');
    assert.equal(sec.replication.getErrorAll(), null);
    assert.equal(pri.replication.getErrorAll(), null);
    await assert.rejects(sec.replication.startAll('secondary'), /^ReplicationError: Block replication is running or done$/);
    // the primary writes (unaligned, across clusters), and zeroes
    await P.write(100000, pattern(200000, 2));
    await P.write(SIZE - 7, pattern(7, 3));
    await P.writeZeroes(2 << 20, 70000);
    await P.flush();
    const primary = await content((o, b) => P.read(o, b));
    assert.equal(sha(await content((o, b) => S.read(o, b))), sha(primary), 'the secondary disk has every primary write');
    assert.equal(sha(await content((o, b) => R.read(o, b))), sha(initial), "the secondary's guest does not see them before a checkpoint");
    // the secondary's guest writes: it sees its own writes, the secondary disk does not
    const g = pattern(5000, 4);
    await R.write(150000, g);
    const expectR = Buffer.from(initial);
    g.copy(expectR, 150000);
    assert.equal(sha(await content((o, b) => R.read(o, b))), sha(expectR));
    assert.equal(sha(await content((o, b) => S.read(o, b))), sha(primary));
  });

  it('a checkpoint makes the secondary\'s drive the primary\'s disk and empties the overlays', async () => {
    const { sec, P, S, R } = p;
    await sec.replication.checkpointAll();
    checkpointed = await content((o, b) => P.read(o, b));
    assert.equal(sha(await content((o, b) => R.read(o, b))), sha(checkpointed));
    assert.equal(sha(await content((o, b) => S.read(o, b))), sha(checkpointed));
    for (const f of ['a.qcow2', 'h.qcow2']) {
      const img = await openImage(join(p.dir, f), { readOnly: true });
      const st = await img.blockStatus(0, SIZE);
      await img.close();
      assert.deepEqual([st.allocated, st.length], [false, SIZE], `${f} is empty`);
    }
  });

  it('a failover leaves the secondary disk at the last checkpoint plus the secondary\'s own writes', async () => {
    const { pri, sec, P, S, R } = p;
    // after the checkpoint both write on
    await P.write(0, pattern(300000, 5));
    await P.write(3 << 20, pattern(65536, 6));
    ownWrites = [
      [1000, pattern(3000, 7)],
      [(3 << 20) + 4096, pattern(4096, 8)],
      [SIZE - 512, pattern(512, 9)],
    ];
    for (const [o, b] of ownWrites) await R.write(o, b);
    const expected = Buffer.from(checkpointed);
    for (const [o, b] of ownWrites) b.copy(expected, o);
    assert.equal(sha(await content((o, b) => R.read(o, b))), sha(expected), 'the guest view before the failover');
    assert.notEqual(sha(await content((o, b) => S.read(o, b))), sha(expected), 'the secondary disk holds the primary\'s writes before');
    await sec.replication.stopAll(true);
    assert.equal(sha(await content((o, b) => S.read(o, b))), sha(expected), 'the secondary disk after the failover');
    assert.equal(sha(await content((o, b) => R.read(o, b))), sha(expected));
    assert.equal(sec.replication.getErrorAll(), null);
    // the drive is the secondary disk now
    await R.write(4096, pattern(100, 10));
    pattern(100, 10).copy(expected, 4096);
    assert.equal(sha(await content((o, b) => S.read(o, b))), sha(expected));
    // a promoted secondary ignores start, checkpoint and stop (QEMU does)
    await sec.replication.startAll('secondary');
    await sec.replication.checkpointAll();
    await sec.replication.stopAll(false);
    // the primary stops (its peer is gone): nothing is mirrored any more
    await pri.replication.stopAll(true);
    const before = sha(await content((o, b) => S.read(o, b)));
    await P.write(0, pattern(4096, 11));
    assert.equal(sha(await content((o, b) => S.read(o, b))), before);
    assert.equal(pri.replication.getErrorAll(), null);
    assert.deepEqual(p.failures, []);
  });
});

describe('block replication: failures', { timeout: 60000 }, () => {
  it('a mirrored write that fails does not fail the guest write; the status says so and nothing more is mirrored', async () => {
    const p = await pair();
    try {
      await p.sec.replication.startAll('secondary');
      await p.pri.replication.startAll('primary');
      await p.P.write(0, pattern(4096, 1));
      // the secondary goes away (its NBD server is stopped hard)
      await p.server.close();
      const data = pattern(8192, 2);
      await p.P.write(8192, data);
      const back = Buffer.alloc(8192);
      await p.P.read(8192, back);
      assert.deepEqual(back, data, 'the local write happened');
      assert.equal(p.pri.replication.getErrorAll(), 'I/O error occurred');
      assert.match(p.failures.join('\n'), /colo1: .*(could not be mirrored|lost the connection)/);
      const sBefore = sha(await content((o, b) => p.S.read(o, b)));
      await p.P.write(0, pattern(4096, 3));
      assert.equal(sha(await content((o, b) => p.S.read(o, b))), sBefore);
      // the toolstack fails over on the primary: the error is cleared, the stage is done
      await p.pri.replication.stopAll(true);
      assert.equal(p.pri.replication.getErrorAll(), null);
    } finally {
      await p.close();
    }
  });

  it('the secondary notes a primary that went away without a goodbye', async () => {
    const p = await pair();
    try {
      await p.sec.replication.startAll('secondary');
      p.sec.replicationPeerLost('colo1', 'test');
      assert.equal(p.sec.replication.getErrorAll(), 'I/O error occurred');
    } finally {
      await p.close();
    }
  });

  it('checks the overlays and the top id at start', async () => {
    const a = await pair({ hiddenSize: SIZE / 2 });
    try {
      await assert.rejects(a.sec.replication.startAll('secondary'), /^ReplicationError: Active disk, hidden disk, secondary disk's length are not the same$/);
    } finally {
      await a.close();
    }
    const b = await pair({ topId: 'nosuch' });
    try {
      await assert.rejects(b.sec.replication.startAll('secondary'), /^ReplicationError: No top_bs or it is invalid$/);
    } finally {
      await b.close();
    }
  });

  it('a non-failover stop empties the overlays: the drive is the secondary disk (the primary\'s)', async () => {
    const p = await pair();
    try {
      await p.sec.replication.startAll('secondary');
      await p.pri.replication.startAll('primary');
      await p.P.write(5000, pattern(10000, 1));
      await p.R.write(500000, pattern(10000, 2));
      await p.pri.replication.stopAll(false);
      await p.sec.replication.stopAll(false);
      const primary = sha(await content((o, b) => p.P.read(o, b)));
      assert.equal(sha(await content((o, b) => p.R.read(o, b))), primary);
      assert.equal(sha(await content((o, b) => p.S.read(o, b))), primary);
      assert.equal(p.sec.replication.getErrorAll(), null);
    } finally {
      await p.close();
    }
  });

  it('the secondary\'s guest view holds under concurrent mirrored writes and reads', async () => {
    const p = await pair();
    try {
      await p.sec.replication.startAll('secondary');
      await p.pri.replication.startAll('primary');
      const view = await content((o, b) => p.R.read(o, b));
      const ops: Promise<void>[] = [];
      for (let i = 0; i < 60; i++) {
        const off = (i * 977 * 613) % (SIZE - 20000);
        ops.push(p.P.write(off, pattern(3000 + (i % 7) * 1000, 100 + i)));
        const rb = Buffer.alloc(20000);
        ops.push(p.R.read(off, rb).then(() => assert.equal(sha(rb), sha(view.subarray(off, off + 20000)), `read ${i} at ${off}`)));
      }
      await Promise.all(ops);
      assert.equal(sha(await content((o, b) => p.R.read(o, b))), sha(view));
      await p.sec.replication.checkpointAll();
      assert.equal(sha(await content((o, b) => p.R.read(o, b))), sha(await content((o, b) => p.P.read(o, b))));
    } finally {
      await p.close();
    }
  });

  it('a failover whose commit fails: failover-failed, the error reported, writes go where the overlays hold the data', async () => {
    const dir = tmpDir();
    await createImage(join(dir, 'a.qcow2'), { format: 'qcow2', size: SIZE });
    await createImage(join(dir, 'h.qcow2'), { format: 'qcow2', size: SIZE });
    writeFileSync(join(dir, 's.raw'), Buffer.alloc(SIZE));
    const img: BlockImage = await openImage(join(dir, 's.raw'), { format: 'raw' });
    let broken = false;
    const disk: SecondaryDisk = {
      name: 's',
      size: SIZE,
      image: img,
      writeHook: null,
      write: async (o, d) => {
        if (broken) throw new Error('EIO: the secondary disk failed');
        const hook = disk.writeHook;
        if (hook !== null) await hook(o, d.length, () => img.write(o, d));
        else await img.write(o, d);
      },
      writeZeroes: (o, n) => img.writeZeroes(o, n),
      flush: () => img.flush(),
    };
    const failures: string[] = [];
    const node = await ReplicationSecondary.open(
      { mode: 'secondary', topId: 'r', active: join(dir, 'a.qcow2'), hidden: join(dir, 'h.qcow2'), secondary: 's' },
      'r',
      disk,
      (t) => t === 'r',
      (_d, e) => failures.push(e.message),
    );
    try {
      await node.start('secondary');
      await disk.write(0, Buffer.alloc(65536, 1)); // mirrored: old content copied to the hidden disk
      await node.write(1 << 20, Buffer.alloc(4096, 2)); // the guest's own
      broken = true;
      await node.stop(true);
      assert.equal(node.stage, 'failover-failed');
      assert.equal(node.getError(), 'I/O error occurred');
      assert.match(failures.join(), /committing the active and hidden disks into 's' failed: EIO/);
      // a write where the overlays hold data goes to the active disk; elsewhere to the (broken) disk
      await node.write((1 << 20) + 100, Buffer.alloc(10, 3));
      await assert.rejects(node.write(2 << 20, Buffer.alloc(10, 3)), /EIO/);
      const b = Buffer.alloc(4096);
      await node.read(1 << 20, b);
      assert.equal(b[0], 2);
      assert.equal(b[100], 3);
      assert.equal(b[110], 2);
    } finally {
      await node.close();
      await img.close();
    }
  });

  it('refuses replicated drives it cannot open, with QEMU\'s texts', async () => {
    const dir = tmpDir();
    await createImage(join(dir, 'a.qcow2'), { format: 'qcow2', size: SIZE });
    copyFileSync(join(dir, 'a.qcow2'), join(dir, 'h.qcow2'));
    const spec = `if=virtio,id=r,driver=replication,mode=secondary,top-id=r,file.file.filename=${join(dir, 'a.qcow2')},file.driver=qcow2,file.backing.file.filename=${join(dir, 'h.qcow2')},file.backing.driver=qcow2,file.backing.backing=nosuch`;
    await assert.rejects(Drives.open([parseDrive(spec)]), /Could not open backing file: Could not open backing file: Cannot find device='nosuch' nor node-name='nosuch'/);
  });
});

describe('replicated -drive options', () => {
  const bad: [string, RegExp][] = [
    ['driver=replication,file.file.filename=a', /^Missing the option mode$/],
    ['driver=replication,mode=x,file.file.filename=a', /^The option mode's value should be primary or secondary$/],
    ['driver=replication,mode=primary,top-id=r,file.file.filename=a', /^The primary side does not support option top-id$/],
    ['driver=replication,mode=secondary,file.file.filename=a', /^Missing the option top-id$/],
    ['driver=replication,mode=secondary,top-id=r,file.driver=raw,file.file.filename=a,file.backing.file.filename=h,file.backing.backing=s', /the active disk must be qcow2/],
    ['driver=quorum,children.0.file.filename=d.raw,children.0.driver=raw', /^Parameter 'vote-threshold' expects a value >= 1$/],
    ['driver=quorum,vote-threshold=1,read-pattern=bogus,children.0.file.filename=d.raw', /^Please set read-pattern as fifo or quorum$/],
    ['driver=quorum,vote-threshold=2,children.0.file.filename=d.raw', /^threshold may not exceed children count$/],
    ['driver=quorum,vote-threshold=1,children.0.file.filename=d.raw,children.1.driver=replication,children.1.file.driver=nbd,children.1.file.path=/s', /^Missing the option mode$/],
    ['driver=quorum,vote-threshold=1,children.0.file.filename=d.raw,children.1.driver=replication,children.1.mode=primary,children.1.file.driver=file,children.1.file.path=/s', /needs file.driver=nbd/],
    ['driver=quorum,vote-threshold=1,children.0.file.filename=d.raw', /cannot attach it later with x-blockdev-change/],
    ['driver=quorum,vote-threshold=1,children.0.file.filename=d.raw,children.1.driver=replication,children.1.mode=primary,children.1.file.driver=nbd,children.1.file.path=/s,readonly=on', /cannot be read-only/],
  ];
  for (const [spec, re] of bad) {
    it(spec, () => assert.throws(() => parseDrive(spec), (e: unknown) => e instanceof Error && re.test(e.message)));
  }

  it('takes QEMU\'s NBD address spellings', () => {
    const base = 'driver=quorum,vote-threshold=1,children.0.file.filename=d.raw,children.0.driver=raw,children.1.driver=replication,children.1.mode=primary,children.1.file.driver=nbd,';
    const nbd = (tail: string) => {
      const r = parseDrive(base + tail).replication;
      assert.ok(r !== undefined && r.mode === 'primary');
      return { address: r.nbd, exportName: r.exportName };
    };
    assert.deepEqual(nbd('children.1.file.host=10.0.0.2,children.1.file.port=9999,children.1.file.export=colo1'), { address: { kind: 'inet', host: '10.0.0.2', port: 9999 }, exportName: 'colo1' });
    assert.deepEqual(nbd('children.1.file.server.type=unix,children.1.file.server.path=/s,children.1.file.export=e'), { address: { kind: 'unix', path: '/s' }, exportName: 'e' });
    assert.deepEqual(nbd('children.1.file.filename=nbd://h:1/x'), { address: { kind: 'inet', host: 'h', port: 1 }, exportName: 'x' });
    assert.deepEqual(parseDrive('if=none,driver=raw,file.filename=s.raw,id=colo1'), { file: 's.raw', format: 'raw', interface: 'none', id: 'colo1' });
  });
});
