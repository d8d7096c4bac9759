/**
 * src/block: the qcow2 write order is crash safe. Every write and sync the
 * driver makes to the image file is recorded; then, for every barrier, the
 * file is rebuilt as a host crash could leave it: everything before the
 * previous barrier on disk, and of the writes since, all, none, any single
 * one, or all but any one (the disk may reorder writes between barriers).
 * qemu-img check must find no corruption in any of them (leaked clusters
 * are allowed), and each guest cluster written shows either its old or its
 * new content.
 */
import assert from 'node:assert/strict';
import { open, type FileHandle } from 'node:fs/promises';
import { readFileSync, readlinkSync, realpathSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { openImage, type BlockImage } from '../../src/block/index.js';
import { KiB, MiB, prng, qemuImg, randomBytes, run, tmpDir } from './block-helpers.js';

type Op = { kind: 'write'; pos: number; data: Buffer } | { kind: 'sync' };

interface Patched {
  write: FileHandle['write'];
  writev: FileHandle['writev'];
  datasync: FileHandle['datasync'];
  sync: FileHandle['sync'];
}

/** Run `fn`, recording the writes and syncs made on any FileHandle open on `path`. */
async function traced(path: string, fn: () => Promise<void>): Promise<Op[]> {
  const probe = await open(path, 'r');
  const proto = Object.getPrototypeOf(probe) as Patched;
  await probe.close();
  const real = realpathSync(path);
  const ours = (fh: FileHandle) => {
    try {
      return readlinkSync(`/proc/self/fd/${fh.fd}`) === real;
    } catch {
      return false;
    }
  };
  const ops: Op[] = [];
  const orig: Patched = { write: proto.write, writev: proto.writev, datasync: proto.datasync, sync: proto.sync };
  proto.write = function (this: FileHandle, buf: Uint8Array, offset: number, length: number, position: number) {
    if (ours(this)) ops.push({ kind: 'write', pos: position, data: Buffer.from(buf.subarray(offset, offset + length)) });
    return (orig.write as (this: FileHandle, ...a: unknown[]) => Promise<unknown>).call(this, buf, offset, length, position);
  } as FileHandle['write'];
  proto.writev = function (this: FileHandle, bufs: Uint8Array[], position: number) {
    if (ours(this)) ops.push({ kind: 'write', pos: position, data: Buffer.concat(bufs) });
    return orig.writev.call(this, bufs, position);
  } as FileHandle['writev'];
  proto.datasync = function (this: FileHandle) {
    if (ours(this)) ops.push({ kind: 'sync' });
    return orig.datasync.call(this);
  };
  proto.sync = function (this: FileHandle) {
    if (ours(this)) ops.push({ kind: 'sync' });
    return orig.sync.call(this);
  };
  try {
    await fn();
  } finally {
    Object.assign(proto, orig);
  }
  return ops;
}

function apply(base: Buffer, writes: Array<{ pos: number; data: Buffer }>): Buffer {
  let end = base.length;
  for (const w of writes) end = Math.max(end, w.pos + w.data.length);
  const f = Buffer.alloc(end);
  base.copy(f);
  for (const w of writes) w.data.copy(f, w.pos);
  return f;
}

/**
 * Every crash state of `ops` over `base` passes qemu-img check without
 * corruption; `content(state)` checks the guest view of each. Returns the
 * number of states and barriers.
 */
async function crashStates(dir: string, base: Buffer, ops: Op[], content: (path: string) => Promise<void>): Promise<{ states: number; barriers: number }> {
  const epochs: Array<Array<{ pos: number; data: Buffer }>> = [[]];
  for (const op of ops) {
    if (op.kind === 'sync') epochs.push([]);
    else epochs[epochs.length - 1]!.push(op);
  }
  let done: Array<{ pos: number; data: Buffer }> = [];
  let states = 0;
  const path = join(dir, 'crash.qcow2');
  for (const epoch of epochs) {
    const subsets: Array<Array<{ pos: number; data: Buffer }>> = [[], epoch];
    if (epoch.length > 1) {
      for (let i = 0; i < epoch.length; i++) {
        subsets.push([epoch[i]!]);
        if (epoch.length > 2) subsets.push(epoch.filter((_, j) => j !== i));
      }
    }
    for (const s of subsets) {
      writeFileSync(path, apply(base, [...done, ...s]));
      const r = run('qemu-img', ['check', '--output=json', path]);
      assert.ok(r.status === 0 || r.status === 3, `crash state ${states}: qemu-img check exit ${r.status}\n${r.stdout}${r.stderr}`);
      const j = JSON.parse(r.stdout) as { corruptions?: number };
      assert.equal(j.corruptions ?? 0, 0);
      await content(path);
      states++;
    }
    done = [...done, ...epoch];
  }
  return { states, barriers: epochs.length - 1 };
}

/** Each cluster of [off, off + len) reads as in `before` or as in `after`. */
async function oldOrNew(path: string, cs: number, before: Buffer, after: Buffer, off: number, len: number): Promise<void> {
  const img: BlockImage = await openImage(path, { readOnly: true });
  const b = Buffer.alloc(before.length);
  await img.read(0, b);
  await img.close();
  for (let c = Math.floor(off / cs) * cs; c < off + len; c += cs) {
    const got = b.subarray(c, c + cs);
    assert.ok(got.equals(before.subarray(c, c + cs)) || got.equals(after.subarray(c, c + cs)), `cluster at ${c} is neither old nor new`);
  }
}

interface Scenario {
  name: string;
  /** Makes the image; returns its path and the guest content before. */
  setup(dir: string): Promise<{ path: string; content: Buffer }>;
  /** The traced operation; applies itself to the model, returns the range it wrote. */
  op(img: BlockImage, model: Buffer): Promise<[number, number]>;
  minBarriers: number;
}

async function contentOf(path: string): Promise<Buffer> {
  const img = await openImage(path, { readOnly: true });
  const b = Buffer.alloc(img.virtualSize);
  await img.read(0, b);
  await img.close();
  return b;
}

const scenarios: Scenario[] = [
  {
    name: 'a partial write over a backing file: refcounts, COW data, a new L2 table, the L1 entry',
    async setup(dir) {
      writeFileSync(join(dir, 'base.raw'), randomBytes(prng(1), 1 * MiB));
      const path = join(dir, 'top.qcow2');
      qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'base.raw', '-F', 'raw', path], dir);
      return { path, content: await contentOf(path) };
    },
    async op(img, model) {
      const data = Buffer.alloc(10000, 0xaa);
      await img.write(300000 + 7, data);
      data.copy(model, 300007);
      return [300007, 10000];
    },
    minBarriers: 1,
  },
  {
    name: 'new data clusters in an existing L2 table, and a write in place',
    async setup(dir) {
      const path = join(dir, 'a.qcow2');
      qemuImg(['create', '-f', 'qcow2', path, '4M']);
      const img = await openImage(path);
      await img.write(0, Buffer.alloc(64 * KiB, 1));
      await img.close();
      return { path, content: await contentOf(path) };
    },
    async op(img, model) {
      const data = randomBytes(prng(2), 300 * KiB);
      await img.write(32 * KiB, data);
      data.copy(model, 32 * KiB);
      return [32 * KiB, 300 * KiB];
    },
    minBarriers: 1,
  },
  {
    name: 'writes and zero writes over compressed clusters: frees after the pointers',
    async setup(dir) {
      const src = join(dir, 'src.raw');
      writeFileSync(src, Buffer.alloc(1 * MiB, 'compressible data '));
      const path = join(dir, 'c.qcow2');
      qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', src, path]);
      return { path, content: await contentOf(path) };
    },
    async op(img, model) {
      const data = Buffer.alloc(5000, 0x55);
      await img.write(8192 + 100, data);
      data.copy(model, 8292);
      await img.writeZeroes(64 * KiB, 64 * KiB);
      model.fill(0, 64 * KiB, 128 * KiB);
      return [8192, 128 * KiB - 8192];
    },
    minBarriers: 3,
  },
  {
    name: 'zero clusters over a backing file where there is no L2 table yet',
    async setup(dir) {
      writeFileSync(join(dir, 'base.raw'), randomBytes(prng(4), 6 * MiB));
      const path = join(dir, 'z.qcow2');
      qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'base.raw', '-F', 'raw', path], dir);
      return { path, content: await contentOf(path) };
    },
    async op(img, model) {
      await img.writeZeroes(4 * MiB - 100, 64 * KiB);
      model.fill(0, 4 * MiB - 100, 4 * MiB - 100 + 64 * KiB);
      return [4 * MiB - 100, 64 * KiB];
    },
    minBarriers: 2,
  },
  {
    name: 'a new refcount block, then the refcount table moved (512 B clusters)',
    async setup(dir) {
      const path = join(dir, 'g.qcow2');
      qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=512', path, '16M']);
      // the table (64 entries of 256 clusters) reaches 8 MiB of the file: fill it almost
      const img = await openImage(path, { barriers: false });
      await img.write(0, Buffer.alloc(8 * MiB - 300 * KiB, 2));
      await img.close();
      return { path, content: await contentOf(path) };
    },
    async op(img, model) {
      const data = randomBytes(prng(3), 400 * KiB);
      await img.write(9 * MiB - 1000, data);
      data.copy(model, 9 * MiB - 1000);
      return [9 * MiB - 1000, 400 * KiB];
    },
    minBarriers: 4,
  },
];

describe('block: crash safety of the qcow2 write order', () => {
  for (const sc of scenarios) {
    it(sc.name, async () => {
      const d = tmpDir();
      const { path, content } = await sc.setup(d);
      const base = readFileSync(path);
      const model = Buffer.from(content);
      let range: [number, number] = [0, 0];
      const img = await openImage(path);
      const ops = await traced(path, async () => {
        range = await sc.op(img, model);
      });
      await img.close();
      assert.ok((await contentOf(path)).equals(model), 'the content after the operation');
      const { barriers } = await crashStates(d, base, ops, (p) => oldOrNew(p, img.clusterSize, content, model, range[0], range[1]));
      assert.ok(barriers >= sc.minBarriers, `${barriers} barriers`);
    });
  }

  it('barriers: false keeps the order but syncs nothing; a write in place syncs nothing either', async () => {
    const d = tmpDir();
    const path = join(d, 'n.qcow2');
    qemuImg(['create', '-f', 'qcow2', path, '4M']);
    let img = await openImage(path, { barriers: false });
    let ops = await traced(path, () => img.write(0, Buffer.alloc(100 * KiB, 1)));
    assert.ok(ops.length >= 3 && ops.every((o) => o.kind === 'write'));
    await img.close();
    img = await openImage(path);
    ops = await traced(path, () => img.write(1000, Buffer.alloc(50 * KiB, 2)));
    assert.deepEqual(ops.map((o) => o.kind), ['write']);
    ops = await traced(path, () => img.flush());
    assert.deepEqual(ops.map((o) => o.kind), ['sync']);
    await img.close();
  });
});
