/**
 * src/block: images made by the real qemu-img / qemu-io (QEMU 7.2) open in
 * Ferry with the right size, format and backing chain, and read back what
 * QEMU wrote: data, zero clusters, compressed clusters, backing chains.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { openImage, type BlockImage } from '../../src/block/index.js';
import { KiB, MiB, prng, qemuImg, qemuIo, qemuMap, randomBytes, tmpDir } from './block-helpers.js';

async function readAll(img: BlockImage): Promise<Buffer> {
  const b = Buffer.alloc(img.virtualSize);
  await img.read(0, b);
  return b;
}

/** The guest content as QEMU sees it: qemu-img convert to raw. */
function qemuContent(dir: string, path: string, format = 'qcow2'): Buffer {
  const out = join(dir, `content-${Math.random().toString(36).slice(2)}.raw`);
  qemuImg(['convert', '-f', format, '-O', 'raw', path, out]);
  return readFileSync(out);
}

/** Turn the backing format extension into an unknown one (ignored by readers): an image with no backing_fmt, which QEMU 7.2 no longer writes. */
function dropBackingFormat(path: string): void {
  const f = readFileSync(path);
  const at = f.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]), 72);
  assert.ok(at > 0 && at < 4096);
  f.writeUInt32BE(0x0badf00d, at);
  writeFileSync(path, f);
}

describe('block: opening images made by qemu-img', () => {
  it('raw: size, format, no backing; probed and named', async () => {
    const d = tmpDir();
    const p = join(d, 'disk.raw');
    qemuImg(['create', '-f', 'raw', p, '3M']);
    qemuIo(p, ['write -P 0x5a 4096 8192'], 'raw');
    for (const format of [undefined, 'raw'] as const) {
      const img = await openImage(p, format === undefined ? {} : { format });
      assert.equal(img.format, 'raw');
      assert.equal(img.virtualSize, 3 * MiB);
      assert.equal(img.backing, null);
      assert.equal(img.filename, p);
      assert.equal(img.readOnly, false);
      const b = Buffer.alloc(3 * 4096);
      await img.read(0, b);
      assert.ok(b.subarray(0, 4096).every((x) => x === 0));
      assert.ok(b.subarray(4096).every((x) => x === 0x5a));
      await img.close();
    }
  });

  for (const [compat, version] of [['0.10', 2], ['1.1', 3]] as const) {
    it(`qcow2 compat=${compat} (v${version}): size, format, and QEMU's writes read back`, async () => {
      const d = tmpDir();
      const p = join(d, 'disk.qcow2');
      qemuImg(['create', '-f', 'qcow2', '-o', `compat=${compat}`, p, '5M']);
      qemuIo(p, [
        'write -P 0xab 0 64k',
        'write -P 0xcd 100000 3000', // unaligned, inside one cluster
        'write -P 0xef 196600 70000', // across a cluster boundary
        'write -P 0x11 5177344 65536', // the last cluster
        ...(version === 3 ? ['write -P 0x77 1M 192k', 'write -z 1088k 64k'] : []), // a zero cluster (v3)
      ]);
      const img = await openImage(p, { readOnly: true });
      assert.equal(img.format, 'qcow2');
      assert.equal(img.virtualSize, 5 * MiB);
      assert.equal(img.backing, null);
      assert.equal(img.readOnly, true);
      assert.equal(img.clusterSize, 64 * KiB);
      assert.ok((await readAll(img)).equals(qemuContent(d, p)));
      // a few unaligned reads
      const expect = qemuContent(d, p);
      const rand = prng(version);
      for (let n = 0; n < 200; n++) {
        const off = Math.floor(rand() * 5 * MiB);
        const len = Math.min(5 * MiB - off, 1 + Math.floor(rand() * 300 * KiB));
        const b = Buffer.alloc(len);
        await img.read(off, b);
        assert.ok(b.equals(expect.subarray(off, off + len)), `read ${off}+${len}`);
      }
      await img.close();
    });
  }

  it('backing files: -F raw, -F qcow2, and no backing_fmt (probed); COW content through them', async () => {
    const d = tmpDir();
    const baseRaw = join(d, 'base.raw');
    writeFileSync(baseRaw, randomBytes(prng(1), 2 * MiB));
    const baseQ = join(d, 'base.qcow2');
    qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', baseRaw, baseQ]);
    for (const [base, fmt] of [['base.raw', 'raw'], ['base.qcow2', 'qcow2'], ['base.raw', null]] as const) {
      const top = join(d, `top-${fmt}.qcow2`);
      // a relative backing name, resolved against the image's directory
      qemuImg(['create', '-f', 'qcow2', '-b', base, '-F', fmt ?? 'raw', top, '3M'], d);
      if (fmt === null) dropBackingFormat(top);
      qemuIo(top, ['write -P 0x42 1000 5000', 'write -P 0x43 2000000 200000']);
      const img = await openImage(top);
      assert.equal(img.virtualSize, 3 * MiB);
      assert.ok(img.backing !== null);
      assert.equal(img.backing.format, base.endsWith('.raw') ? 'raw' : 'qcow2');
      assert.equal(img.backing.filename, join(d, base));
      assert.equal(img.backing.readOnly, true);
      assert.equal(img.backing.virtualSize, 2 * MiB);
      // beyond the 2 MiB backing file the top reads zeros
      assert.ok((await readAll(img)).equals(qemuContent(d, top)), `content with backing ${base} (${fmt})`);
      await img.close();
    }
  });

  it('a 3-deep chain, relative names through subdirectories, as QEMU resolves them', async () => {
    const d = tmpDir();
    mkdirSync(join(d, 'a', 'b'), { recursive: true });
    const base = join(d, 'base.raw');
    writeFileSync(base, randomBytes(prng(2), 4 * MiB));
    qemuImg(['create', '-f', 'qcow2', '-o', 'compat=0.10', '-b', '../base.raw', '-F', 'raw', join(d, 'a', 'mid.qcow2')]);
    qemuImg(['create', '-f', 'qcow2', '-b', '../mid.qcow2', '-F', 'qcow2', join(d, 'a', 'b', 'top.qcow2'), '6M']);
    qemuIo(join(d, 'a', 'mid.qcow2'), ['write -P 0x01 0 1M', 'write -P 0x02 3M 100k']);
    qemuIo(join(d, 'a', 'b', 'top.qcow2'), ['write -P 0x03 512k 1M', 'write -z 3M 64k', 'write -P 0x04 5M 4k']);
    const top = join(d, 'a', 'b', 'top.qcow2');
    const img = await openImage(top);
    const mid = img.backing!;
    const b = mid.backing!;
    assert.equal(img.format, 'qcow2');
    assert.equal(img.virtualSize, 6 * MiB);
    assert.equal(mid.format, 'qcow2');
    assert.equal(mid.virtualSize, 4 * MiB); // size taken from the base at creation
    assert.equal(mid.filename, join(d, 'a', 'b') + '/../mid.qcow2');
    assert.equal(b.format, 'raw');
    assert.equal(b.filename, join(d, 'a', 'b') + '/../../base.raw');
    assert.equal(b.backing, null);
    assert.ok((await readAll(img)).equals(qemuContent(d, top)));
    assert.ok((await readAll(mid)).equals(qemuContent(d, join(d, 'a', 'mid.qcow2'))));
    await img.close();
  });

  for (const [cluster, compat] of [[512, '1.1'], [4096, '1.1'], [65536, '1.1'], [65536, '0.10'], [2 * MiB, '1.1']] as const) {
    it(`compressed clusters (qemu-img convert -c, cluster_size=${cluster}, compat=${compat}) read back`, async () => {
      const d = tmpDir();
      const src = join(d, 'src.raw');
      const rand = prng(cluster);
      const size = Math.max(2 * MiB, 6 * cluster);
      const content = Buffer.alloc(size);
      // text (compresses), random (stays uncompressed), zeros (left out)
      for (let off = 0; off < size; ) {
        const len = Math.min(size - off, Math.floor(cluster / 3 + rand() * cluster * 2));
        const kind = Math.floor(rand() * 3);
        if (kind === 0) content.write('the quick brown fox jumps over the lazy dog '.repeat(Math.ceil(len / 44)).slice(0, len), off, 'latin1');
        else if (kind === 1) randomBytes(rand, len).copy(content, off);
        off += len;
      }
      writeFileSync(src, content);
      const p = join(d, 'c.qcow2');
      qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cluster},compat=${compat}`, src, p]);
      assert.match(qemuImg(['check', p]), /[1-9][0-9.]*% compressed clusters/);
      const img = await openImage(p, { readOnly: true });
      assert.ok((await readAll(img)).equals(content));
      for (let n = 0; n < 100; n++) {
        const off = Math.floor(rand() * size);
        const len = Math.min(size - off, 1 + Math.floor(rand() * 3 * cluster));
        const b = Buffer.alloc(len);
        await img.read(off, b);
        assert.ok(b.equals(content.subarray(off, off + len)), `read ${off}+${len}`);
      }
      await img.close();
    });
  }

  it('blockStatus agrees with qemu-img map: data, zero, compressed, unallocated over a backing file', async () => {
    const d = tmpDir();
    const base = join(d, 'base.raw');
    writeFileSync(base, randomBytes(prng(3), 4 * MiB));
    const p = join(d, 'top.qcow2');
    const compressedSrc = join(d, 'c.raw');
    const src = Buffer.alloc(4 * MiB);
    src.fill('compressible ', 1 * MiB, 2 * MiB);
    src.fill('compressible ', 3.5 * MiB, 4 * MiB);
    writeFileSync(compressedSrc, src); // the zero parts stay unallocated
    qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', compressedSrc, p]);
    qemuImg(['rebase', '-u', '-b', 'base.raw', '-F', 'raw', p], d);
    qemuIo(p, ['write -P 1 64k 64k', 'write -z 256k 128k', 'write -z 2M 64k', 'write -P 2 3200k 4k']);
    const img = await openImage(p, { readOnly: true });
    const cs = img.clusterSize;
    const map = qemuMap(p);
    for (const e of map) {
      for (let off = e.start; off < e.start + e.length; off += cs) {
        const st = await img.blockStatus(off, cs);
        assert.equal(st.length, cs);
        assert.equal(st.allocated, e.depth === 0 && e.present, `allocated at ${off}`);
        assert.equal(st.zero, e.depth === 0 && e.present && e.zero && !e.data, `zero at ${off}`);
      }
    }
    // runs merge, up to a change of status
    assert.deepEqual(await img.blockStatus(0, 4 * MiB), { allocated: false, zero: false, length: 64 * KiB });
    assert.deepEqual(await img.blockStatus(128 * KiB, 4 * MiB - 128 * KiB), { allocated: false, zero: false, length: 128 * KiB });
    assert.deepEqual(await img.blockStatus(256 * KiB + 100, 4 * MiB - 256 * KiB - 100), { allocated: true, zero: true, length: 128 * KiB - 100 });
    assert.deepEqual(await img.blockStatus(1 * MiB, 1 * MiB), { allocated: true, zero: false, length: 1 * MiB });
    assert.deepEqual(await img.blockStatus(3 * MiB, 10), { allocated: false, zero: false, length: 10 });
    await img.close();
  });

  it('refcount widths other than 16 bits, and an image whose refcount table QEMU moved, open and read', async () => {
    const d = tmpDir();
    for (const bits of [1, 8, 64]) {
      const p = join(d, `r${bits}.qcow2`);
      qemuImg(['create', '-f', 'qcow2', '-o', `refcount_bits=${bits}`, p, '1M']);
      qemuIo(p, ['write -P 9 4k 100k']);
      const img = await openImage(p);
      assert.ok((await readAll(img)).equals(qemuContent(d, p)));
      await img.close();
    }
    const p = join(d, 'grown.qcow2');
    qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=512', p, '12M']);
    qemuIo(p, ['write -P 0x3c 0 12M']);
    assert.notEqual(readFileSync(p).readUInt32BE(52), 512, 'QEMU moved the refcount table');
    const img = await openImage(p, { readOnly: true });
    assert.ok((await readAll(img)).every((x) => x === 0x3c));
    await img.close();
  });

  it('format: a qcow2 opened as raw is its file; a file without the magic probes as raw', async () => {
    const d = tmpDir();
    const p = join(d, 'x.qcow2');
    qemuImg(['create', '-f', 'qcow2', p, '1G']);
    const raw = await openImage(p, { format: 'raw', readOnly: true });
    assert.equal(raw.format, 'raw');
    assert.equal(raw.virtualSize, readFileSync(p).length);
    await raw.close();
    const q = join(d, 'y.img');
    writeFileSync(q, Buffer.from('QFI\xfa'.repeat(256), 'latin1'));
    const img = await openImage(q);
    assert.equal(img.format, 'raw');
    await img.close();
  });
});
