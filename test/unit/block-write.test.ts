/**
 * src/block: images written by Ferry stay valid for QEMU 7.2 (qemu-img
 * check: no corruptions, no leaks) and hold what was written (qemu-img
 * compare against a raw file with the expected content, qemu-io read -P):
 * random unaligned writes and zero writes, over backing files and over
 * compressed clusters, refcount block and refcount table growth, every
 * refcount width; images made by createImage; requests queued concurrently.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { BlockError, createImage, openImage, type BlockImage } from '../../src/block/index.js';
import { assertCheck, assertCompare, KiB, MiB, prng, qemuImg, qemuIo, qemuMap, randomBytes, run, tmpDir } from './block-helpers.js';

interface WorkloadOptions {
  ops: number;
  /** Longest request. */
  maxLen: number;
  /** Share of zero writes (0..1). */
  zeroes?: number;
}

/**
 * Random writes and zero writes (offsets and lengths unaligned, cluster
 * aligned or whole clusters, some 1 MiB) applied to the image and to the
 * model, with reads checked against the model along the way.
 */
async function workload(img: BlockImage, model: Buffer, seed: number, o: WorkloadOptions): Promise<void> {
  const rand = prng(seed);
  const cs = img.clusterSize;
  const size = img.virtualSize;
  for (let n = 0; n < o.ops; n++) {
    const shape = rand();
    let off: number;
    let len: number;
    if (shape < 0.3) {
      off = Math.floor(rand() * size);
      len = 1 + Math.floor(rand() * Math.min(o.maxLen, 3 * cs));
    } else if (shape < 0.6) {
      off = Math.floor((rand() * size) / cs) * cs;
      len = cs * (1 + Math.floor(rand() * Math.max(1, Math.floor(o.maxLen / cs))));
    } else if (shape < 0.9) {
      off = Math.floor((rand() * size) / 512) * 512;
      len = 512 * (1 + Math.floor((rand() * o.maxLen) / 512));
    } else {
      off = Math.floor(rand() * size);
      len = Math.min(o.maxLen, MiB);
    }
    len = Math.max(1, Math.min(len, size - off));
    if (off >= size) continue;
    if (rand() < (o.zeroes ?? 0.15)) {
      await img.writeZeroes(off, len);
      model.fill(0, off, off + len);
    } else {
      const data = randomBytes(rand, len);
      await img.write(off, data);
      data.copy(model, off);
    }
    if (n % 7 === 0) {
      const roff = Math.floor(rand() * size);
      const rlen = Math.min(size - roff, 1 + Math.floor(rand() * 4 * cs));
      const b = Buffer.alloc(rlen);
      await img.read(roff, b);
      assert.ok(b.equals(model.subarray(roff, roff + rlen)), `read ${roff}+${rlen} after op ${n}`);
    }
  }
}

/** Close, then: qemu-img check is clean, qemu-img compare matches the model, and Ferry reads the model back. */
async function verify(img: BlockImage, model: Buffer, dir: string): Promise<void> {
  const path = img.filename;
  const format = img.format;
  await img.close();
  if (format === 'qcow2') assertCheck(path);
  const raw = join(dir, `expect-${Math.random().toString(36).slice(2)}.raw`);
  writeFileSync(raw, model);
  assertCompare(path, raw, format);
  const again = await openImage(path, { readOnly: true });
  const b = Buffer.alloc(again.virtualSize);
  await again.read(0, b);
  assert.ok(b.equals(model), 'read back after reopening');
  await again.close();
}

function fileModel(path: string, size: number): Buffer {
  const m = Buffer.alloc(size);
  const f = readFileSync(path);
  f.copy(m, 0, 0, Math.min(size, f.length));
  return m;
}

describe('block: Ferry writes, QEMU checks', () => {
  for (const [cluster, compat] of [[512, '1.1'], [4096, '0.10'], [65536, '1.1'], [65536, '0.10'], [2 * MiB, '1.1']] as const) {
    it(`random writes and zero writes: qemu-img image, cluster_size=${cluster}, compat=${compat}`, async () => {
      const d = tmpDir();
      const p = join(d, 'disk.qcow2');
      const size = cluster === 2 * MiB ? 24 * MiB : 6 * MiB + 1536; // not a multiple of the cluster size
      qemuImg(['create', '-f', 'qcow2', '-o', `cluster_size=${cluster},compat=${compat}`, p, String(size)]);
      const img = await openImage(p);
      const model = Buffer.alloc(size);
      await workload(img, model, cluster + compat.length, { ops: 300, maxLen: 256 * KiB });
      await verify(img, model, d);
    });
  }

  for (const [fmt, compat] of [['raw', '1.1'], ['qcow2', '1.1'], ['raw', '0.10'], ['qcow2', '0.10']] as const) {
    it(`over a ${fmt} backing file (compat=${compat}): copy-on-write of partial clusters, zero writes`, async () => {
      const d = tmpDir();
      const baseRaw = join(d, 'base.raw');
      writeFileSync(baseRaw, randomBytes(prng(7), 3 * MiB + 4096));
      let base = baseRaw;
      if (fmt === 'qcow2') {
        base = join(d, 'base.qcow2');
        qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', baseRaw, base]);
      }
      const p = join(d, 'top.qcow2');
      // bigger than the backing file: zeros past its end
      qemuImg(['create', '-f', 'qcow2', '-o', `compat=${compat},cluster_size=16384`, '-b', base, '-F', fmt, p, '5M']);
      const img = await openImage(p);
      const model = fileModel(baseRaw, 5 * MiB);
      await workload(img, model, 11, { ops: 250, maxLen: 200 * KiB, zeroes: 0.25 });
      await verify(img, model, d);
      assert.ok(readFileSync(base).length > 0, 'the backing file is left alone');
      assertCompare(base, baseRaw, fmt);
    });
  }

  it('a 3-deep chain: writes to the top only', async () => {
    const d = tmpDir();
    const base = join(d, 'base.raw');
    writeFileSync(base, randomBytes(prng(8), 2 * MiB));
    qemuImg(['create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'mid.qcow2'], d);
    qemuIo(join(d, 'mid.qcow2'), ['write -P 0x61 100k 700k', 'write -z 1M 128k']);
    qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', '3M'], d);
    const model = Buffer.alloc(3 * MiB);
    const mid = join(d, 'mid-content.raw');
    qemuImg(['convert', '-O', 'raw', join(d, 'mid.qcow2'), mid]);
    readFileSync(mid).copy(model);
    const img = await openImage(join(d, 'top.qcow2'));
    await workload(img, model, 12, { ops: 200, maxLen: 100 * KiB });
    await verify(img, model, d);
    assertCheck(join(d, 'mid.qcow2'));
  });

  it('writes over compressed clusters release them (no leaks), at 512 B and 64 KiB clusters', async () => {
    for (const cluster of [512, 65536]) {
      const d = tmpDir();
      const src = join(d, 'src.raw');
      const content = Buffer.alloc(4 * MiB);
      for (let off = 0; off < content.length; off += 4096) content.write(`sector ${off} of the compressible source; `.repeat(60), off, 'latin1');
      writeFileSync(src, content);
      const p = join(d, 'c.qcow2');
      qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cluster}`, src, p]);
      const img = await openImage(p);
      const model = Buffer.from(content);
      await workload(img, model, cluster, { ops: 200, maxLen: 64 * KiB, zeroes: 0.3 });
      await verify(img, model, d);
    }
  });

  it('refcount growth: a 512 B cluster image written whole (new refcount blocks, the refcount table moved several times)', async () => {
    const d = tmpDir();
    const p = join(d, 'g.qcow2');
    const size = 24 * MiB;
    qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=512', p, String(size)]);
    const tableBefore = readFileSync(p).readUInt32BE(56);
    const img = await openImage(p);
    const model = Buffer.alloc(size);
    const rand = prng(5);
    // backwards in 1 MiB chunks, so that guest and host order differ
    for (let off = size - MiB; off >= 0; off -= MiB) {
      const chunk = randomBytes(rand, MiB);
      await img.write(off, chunk);
      chunk.copy(model, off);
    }
    await workload(img, model, 6, { ops: 100, maxLen: 64 * KiB });
    await img.flush();
    const tableAfter = readFileSync(p).readUInt32BE(56);
    assert.ok(tableAfter >= 4 * tableBefore, `refcount table clusters ${tableBefore} → ${tableAfter}`);
    await verify(img, model, d);
    // and QEMU can go on from there
    qemuIo(p, ['write -P 0x99 0 2M', 'read -P 0x99 0 2M']);
    assertCheck(p);
  });

  it('every refcount width (1 to 64 bits) under allocation and frees, and an image QEMU grew', async () => {
    for (const bits of [1, 2, 4, 8, 32, 64]) {
      const d = tmpDir();
      const p = join(d, `r${bits}.qcow2`);
      qemuImg(['create', '-f', 'qcow2', '-o', `refcount_bits=${bits},cluster_size=512`, p, '3M']);
      const img = await openImage(p);
      const model = Buffer.alloc(3 * MiB);
      await workload(img, model, bits, { ops: 150, maxLen: 96 * KiB });
      await verify(img, model, d);
    }
    const d = tmpDir();
    const p = join(d, 'grown.qcow2');
    qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=512', p, '12M']);
    qemuIo(p, ['write -P 0x3c 0 8M']);
    const img = await openImage(p);
    const model = Buffer.alloc(12 * MiB, 0x3c).fill(0, 8 * MiB);
    await workload(img, model, 99, { ops: 150, maxLen: 512 * KiB });
    await verify(img, model, d);
  });

  it('zero writes: v3 makes zero clusters, v2 writes zeros, and with no backing file unallocated clusters stay so', async () => {
    const d = tmpDir();
    const base = join(d, 'base.raw');
    writeFileSync(base, Buffer.alloc(2 * MiB, 0xee));
    for (const compat of ['1.1', '0.10']) {
      const p = join(d, `z${compat}.qcow2`);
      qemuImg(['create', '-f', 'qcow2', '-o', `compat=${compat}`, '-b', 'base.raw', '-F', 'raw', p], d);
      const img = await openImage(p);
      await img.write(0, Buffer.alloc(256 * KiB, 1));
      await img.writeZeroes(64 * KiB, 128 * KiB); // over data
      await img.writeZeroes(1 * MiB + 1000, 200 * KiB); // over the backing file, unaligned ends
      await img.close();
      const model = Buffer.alloc(2 * MiB, 0xee);
      model.fill(1, 0, 256 * KiB).fill(0, 64 * KiB, 192 * KiB).fill(0, MiB + 1000, MiB + 1000 + 200 * KiB);
      assertCheck(p);
      const raw = join(d, 'expect.raw');
      writeFileSync(raw, model);
      assertCompare(p, raw);
      const map = qemuMap(p).filter((e) => e.depth === 0 && e.zero && !e.data);
      const zeroBytes = map.reduce((n, e) => n + e.length, 0);
      if (compat === '1.1') {
        // [64k, 192k) and the whole clusters of [1M+1000, 1M+1000+200k): [1M+64k, 1M+192k)
        assert.deepEqual(map.map((e) => [e.start, e.length]), [[64 * KiB, 128 * KiB], [MiB + 64 * KiB, 128 * KiB]]);
      } else {
        assert.equal(zeroBytes, 0, 'no zero clusters in v2');
      }
    }
    // a zero write that reaches the end of the image takes its last, partial cluster as whole
    const t = join(d, 'tail.qcow2');
    qemuImg(['create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', t, '200k'], d);
    const ti = await openImage(t);
    await ti.writeZeroes(150 * KiB, 50 * KiB);
    await ti.close();
    assertCheck(t);
    assert.deepEqual(qemuMap(t).filter((e) => e.depth === 0).map((e) => [e.start, e.length, e.zero, e.data]), [
      [128 * KiB, 64 * KiB, false, true], // the head cluster, zeros written from 150k
      [192 * KiB, 8 * KiB, true, false], // the last cluster, a zero cluster
    ]);
    qemuIo(t, ['read -P 0xee 0 150k', 'read -P 0 150k 50k']);

    // no backing file: zeroing unallocated space allocates nothing
    const p = join(d, 'plain.qcow2');
    qemuImg(['create', '-f', 'qcow2', p, '64M']);
    const img = await openImage(p);
    await img.writeZeroes(0, 64 * MiB);
    assert.deepEqual(await img.blockStatus(0, 64 * MiB), { allocated: false, zero: false, length: 64 * MiB });
    await img.write(MiB, Buffer.alloc(MiB, 3));
    await img.writeZeroes(0, 64 * MiB);
    assert.deepEqual(await img.blockStatus(MiB, MiB), { allocated: true, zero: true, length: MiB });
    // a zero cluster that kept its host cluster, written in part: the rest reads zeros, and no cluster is added
    await img.flush();
    const zeroAlloc = qemuMap(p).find((e) => e.start === MiB)!;
    assert.ok(zeroAlloc.zero && !zeroAlloc.data && zeroAlloc.offset !== undefined, `a zero cluster that kept its host cluster: ${JSON.stringify(zeroAlloc)}`);
    await img.write(MiB + 100, Buffer.from('hello'));
    await img.flush();
    assert.equal(qemuMap(p).find((e) => e.start === MiB)!.offset, zeroAlloc.offset, 'written in place');
    const b = Buffer.alloc(64 * KiB);
    await img.read(MiB, b);
    assert.equal(b.toString('latin1', 100, 105), 'hello');
    assert.ok(b.subarray(0, 100).every((x) => x === 0) && b.subarray(105).every((x) => x === 0));
    await img.close();
    assertCheck(p);
    qemuIo(p, ['read -P 0 1M 100', 'read -P 0 1048681 65431', 'read -P 0 2M 62M']);
  });

  it('createImage: qcow2 v2/v3 at several cluster sizes, with a backing file; QEMU reads and checks them', async () => {
    const d = tmpDir();
    const base = join(d, 'base.raw');
    await createImage(base, { format: 'raw', size: 3 * MiB });
    assert.equal(readFileSync(base).length, 3 * MiB);
    writeFileSync(base, randomBytes(prng(4), 3 * MiB));
    for (const [cluster, version] of [[512, 3], [4096, 2], [65536, 3], [2 * MiB, 3]] as const) {
      const p = join(d, `new-${cluster}-${version}.qcow2`);
      await createImage(p, { format: 'qcow2', size: 10 * MiB + 100, clusterSize: cluster, version });
      assertCheck(p);
      const info = JSON.parse(qemuImg(['info', '--output=json', p])) as Record<string, unknown>;
      assert.equal(info['virtual-size'], 10 * MiB + 512);
      assert.equal(info['cluster-size'], cluster);
      assert.equal((info['format-specific'] as { data: { compat: string } }).data.compat, version === 3 ? '1.1' : '0.10');
      const img = await openImage(p);
      assert.equal(img.virtualSize, 10 * MiB + 512);
      const model = Buffer.alloc(img.virtualSize);
      await workload(img, model, cluster, { ops: 100, maxLen: 128 * KiB });
      await verify(img, model, d);
    }
    // with a backing file (size taken from it), QEMU sees the chain and Ferry's writes
    const top = join(d, 'top.qcow2');
    await createImage(top, { format: 'qcow2', backingFile: 'base.raw', backingFormat: 'raw' });
    const info = JSON.parse(qemuImg(['info', '--output=json', top])) as Record<string, unknown>;
    assert.equal(info['backing-filename'], 'base.raw');
    assert.equal(info['backing-filename-format'], 'raw');
    assert.equal(info['virtual-size'], 3 * MiB);
    const img = await openImage(top);
    await img.write(4096 + 10, Buffer.alloc(5000, 0x7e));
    await img.close();
    assertCheck(top);
    qemuIo(top, ['read -P 0x7e 4106 5000']);
    const model = readFileSync(base);
    model.fill(0x7e, 4106, 9106);
    const raw = join(d, 'expect.raw');
    writeFileSync(raw, model);
    assertCompare(top, raw);
    // 512-byte clusters with a backing file: the feature name table does not
    // fit beside the backing name, so it is left out, as qemu-img leaves it
    const small = join(d, 'small.qcow2');
    await createImage(small, { format: 'qcow2', clusterSize: 512, backingFile: 'top.qcow2', backingFormat: 'qcow2' });
    const s = await openImage(small);
    await s.write(100, Buffer.alloc(700, 0x11));
    await s.close();
    assertCheck(small);
    qemuIo(small, ['read -P 0x7e 4106 5000', 'read -P 0x11 100 700']);
  });

  it('a persistent bitmap: a read-write open clears the autoclear bits first (qcow2.txt); QEMU then drops the bitmap, leaking its clusters', async () => {
    const d = tmpDir();
    const p = join(d, 'bm.qcow2');
    qemuImg(['create', '-f', 'qcow2', p, '4M']);
    qemuImg(['bitmap', '--add', p, 'b0']);
    assert.equal(readFileSync(p).readUInt32BE(92), 1, 'autoclear bit 0 (bitmaps)');
    const ro = await openImage(p, { readOnly: true });
    await ro.close();
    assert.equal(readFileSync(p).readUInt32BE(92), 1, 'a read-only open leaves it');
    const img = await openImage(p);
    assert.equal(readFileSync(p).readUInt32BE(92), 0, 'cleared at open, before any write');
    await img.write(0, Buffer.alloc(4096, 1));
    await img.close();
    const r = run('qemu-img', ['check', '--output=json', p]);
    assert.equal(r.status, 3, r.stdout + r.stderr); // leaks only
    const j = JSON.parse(r.stdout) as { corruptions?: number; leaks?: number };
    assert.equal(j.corruptions ?? 0, 0);
    assert.equal(j.leaks, 2); // the bitmap directory and the bitmap table
    qemuIo(p, ['read -P 1 0 4k']);
  });

  it('raw images: random writes and zero writes', async () => {
    const d = tmpDir();
    const p = join(d, 'disk.raw');
    qemuImg(['create', '-f', 'raw', p, '4M']);
    const img = await openImage(p);
    const model = Buffer.alloc(4 * MiB);
    await workload(img, model, 3, { ops: 200, maxLen: 300 * KiB });
    await verify(img, model, d);
  });

  it('requests issued together run one at a time, in order', async () => {
    const d = tmpDir();
    const p = join(d, 'c.qcow2');
    qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=4096', p, '2M']);
    const img = await openImage(p);
    const model = Buffer.alloc(2 * MiB);
    const rand = prng(21);
    const pending: Promise<void>[] = [];
    const reads: Array<[Buffer, Buffer]> = [];
    for (let n = 0; n < 300; n++) {
      const off = Math.floor(rand() * 2 * MiB);
      const len = Math.min(2 * MiB - off, 1 + Math.floor(rand() * 20000));
      if (n % 5 === 4) {
        const b = Buffer.alloc(len);
        pending.push(img.read(off, b));
        reads.push([b, Buffer.from(model.subarray(off, off + len))]); // what it must see: the writes queued before it
      } else if (n % 5 === 3) {
        pending.push(img.writeZeroes(off, len));
        model.fill(0, off, off + len);
      } else {
        const data = randomBytes(rand, len);
        pending.push(img.write(off, data));
        data.copy(model, off);
      }
    }
    await Promise.all(pending);
    for (const [got, want] of reads) assert.ok(got.equals(want));
    await verify(img, model, d);
  });

  it('buffers may be views of a SharedArrayBuffer (guest RAM), at any byte offset', async () => {
    const d = tmpDir();
    for (const format of ['qcow2', 'raw'] as const) {
      const p = join(d, `sab.${format}`);
      await createImage(p, { format, size: 4 * MiB });
      const img = await openImage(p);
      const ram = new Uint8Array(new SharedArrayBuffer(3 * MiB));
      ram.fill(7, 5, MiB + 5);
      await img.write(100, ram.subarray(5, MiB + 5));
      const back = new Uint8Array(new SharedArrayBuffer(2 * MiB));
      await img.read(0, back.subarray(1, MiB + 201));
      const model = Buffer.alloc(MiB + 200);
      model.fill(7, 100, MiB + 100);
      assert.ok(Buffer.from(back.buffer, 1, MiB + 200).equals(model));
      await verify(img, Buffer.concat([model, Buffer.alloc(4 * MiB - model.length)]), d);
    }
  });

  it('refuses writes to a read-only image, requests out of range, and requests after close', async () => {
    const d = tmpDir();
    const p = join(d, 'x.qcow2');
    qemuImg(['create', '-f', 'qcow2', p, '1M']);
    const ro = await openImage(p, { readOnly: true });
    await assert.rejects(ro.write(0, Buffer.alloc(1)), new BlockError(`Cannot write to '${p}': the image is open read-only`));
    await assert.rejects(ro.writeZeroes(0, 1), BlockError);
    await ro.close();
    const img = await openImage(p);
    await assert.rejects(img.read(MiB - 1, Buffer.alloc(2)), new BlockError(`Request out of range on '${p}': offset ${MiB - 1} + length 2 is beyond the image's ${MiB} bytes`));
    await assert.rejects(img.write(-1, Buffer.alloc(2)), new BlockError(`Invalid request on '${p}': offset -1, length 2`));
    await img.read(MiB, Buffer.alloc(0));
    await img.close();
    await img.close();
    await assert.rejects(img.read(0, Buffer.alloc(1)), new BlockError(`Image '${p}' is closed`));
  });

  it('a 1 GiB image written whole by the guest stays valid (FERRY_BLOCK_BIG=1; 1 GiB of disk)', { skip: process.env.FERRY_BLOCK_BIG !== '1' }, async () => {
    for (const cluster of [65536, 512]) {
      const d = tmpDir();
      const p = join(d, 'big.qcow2');
      await createImage(p, { format: 'qcow2', size: 1024 * MiB, clusterSize: cluster });
      const img = await openImage(p);
      const chunk = Buffer.alloc(MiB);
      for (let off = 0; off < 1024 * MiB; off += MiB) {
        chunk.fill(off / MiB);
        await img.write(off, chunk);
      }
      await img.close();
      assertCheck(p);
      qemuIo(p, ['read -P 0 0 1M', 'read -P 200 200M 1M', 'read -P 255 1023M 1M']);
    }
  });
});
