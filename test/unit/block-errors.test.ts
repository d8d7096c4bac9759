/**
 * src/block: broken and unsupported images are refused with a clear
 * error, at open where the header or tables say so, at the read that meets
 * a broken L2 entry otherwise; never a crash or a silent misread. Each
 * case starts from a real qemu-img 7.2 image, edited with a Buffer where
 * QEMU cannot make the fault.
 */
import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { BlockError, openImage, type OpenOptions } from '../../src/block/index.js';
import { KiB, qemuImg, qemuIo, run, tmpDir } from './block-helpers.js';

/** A fresh qcow2 made by qemu-img (1 GiB, 64 KiB clusters unless told): L1 at 0x30000, refcount table at 0x10000. */
function image(dir: string, name: string, opts: string[] = [], size = '1G'): string {
  const p = join(dir, name);
  qemuImg(['create', '-f', 'qcow2', ...opts, p, size]);
  return p;
}

function edit(path: string, fn: (b: Buffer) => void): void {
  const b = readFileSync(path);
  fn(b);
  writeFileSync(path, b);
}

function put64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 2 ** 32), at);
  b.writeUInt32BE(v >>> 0, at + 4);
}

/** An L1 or L2 entry: `offset` with the COPIED flag (bit 63). */
function putCopied(b: Buffer, at: number, offset: number): void {
  put64(b, at, offset);
  b.writeUInt32BE((b.readUInt32BE(at) | 0x80000000) >>> 0, at);
}

async function refused(path: string, reason: string, opts: OpenOptions = {}): Promise<void> {
  await assert.rejects(openImage(path, opts), (e: unknown) => {
    assert.ok(e instanceof BlockError, `not a BlockError: ${String(e)}`);
    assert.equal(e.message, `Could not open '${path}': ${reason}`);
    return true;
  });
}

function openFds(): number {
  return readdirSync('/proc/self/fd').length;
}

describe('block: broken and unsupported images', () => {
  const fdsBefore = openFds();

  it('the header: bad magic, truncated, bad version, cluster size, header length', async () => {
    const d = tmpDir();
    let p = image(d, 'magic.qcow2');
    edit(p, (b) => b.writeUInt32BE(0x514649fa, 0));
    await refused(p, 'Image is not in qcow2 format', { format: 'qcow2' });
    const probed = await openImage(p); // without the magic it is a raw image
    assert.equal(probed.format, 'raw');
    await probed.close();
    writeFileSync(join(d, 'tiny'), 'QF');
    await refused(join(d, 'tiny'), 'Image is not in qcow2 format', { format: 'qcow2' });

    p = image(d, 'trunc.qcow2');
    truncateSync(p, 50);
    await refused(p, 'Could not read qcow2 header: the file has 50 bytes, the header needs 72');
    p = image(d, 'trunc3.qcow2');
    truncateSync(p, 90);
    await refused(p, 'Could not read qcow2 header: the file has 90 bytes, the header needs 104');
    p = image(d, 'trunc3b.qcow2');
    truncateSync(p, 108);
    await refused(p, 'Could not read qcow2 header: the file has 108 bytes, the header needs 112');

    for (const v of [1, 4]) {
      p = image(d, `v${v}.qcow2`);
      edit(p, (b) => b.writeUInt32BE(v, 4));
      await refused(p, `Unsupported qcow2 version ${v}`);
    }
    for (const bits of [8, 22]) {
      p = image(d, `cb${bits}.qcow2`);
      edit(p, (b) => b.writeUInt32BE(bits, 20));
      await refused(p, `Unsupported cluster size: 2^${bits}`);
    }
    for (const [len, reason] of [
      [96, 'qcow2 header too short'],
      [0x20000, 'qcow2 header exceeds cluster size'],
      [108, 'qcow2 header length 108 is not a multiple of 8'],
    ] as const) {
      p = image(d, `hl${len}.qcow2`);
      edit(p, (b) => b.writeUInt32BE(len, 100));
      await refused(p, reason);
    }
    p = image(d, 'ext.qcow2');
    edit(p, (b) => b.writeUInt32BE(0x10000, 116)); // the feature name table's length
    await refused(p, 'Invalid qcow2 header extension 0x6803f857 at offset 112: its 65536 bytes run past offset 65536');
    p = image(d, 'ct.qcow2');
    edit(p, (b) => (b[104] = 1));
    await refused(p, 'Invalid compression type 1: the compression type feature bit is not set');
    p = image(d, 'rco.qcow2');
    edit(p, (b) => b.writeUInt32BE(7, 96));
    await refused(p, 'Reference count entry width too large; may not exceed 64 bits');
  });

  it('tables: L1 and refcount table past the end of the file or misplaced, an L1 entry pointing past it', async () => {
    const d = tmpDir();
    let p = image(d, 'l1.qcow2');
    const size = readFileSync(p).length;
    edit(p, (b) => put64(b, 40, 0x100000));
    await refused(p, `Invalid L1 table offset 0x100000: the table's 16 bytes run past the end of the file (${size} bytes)`);
    p = image(d, 'l1u.qcow2');
    edit(p, (b) => put64(b, 40, 0x30200));
    await refused(p, 'Invalid L1 table offset');
    p = image(d, 'l1s.qcow2');
    edit(p, (b) => b.writeUInt32BE(1, 36));
    await refused(p, 'L1 table is too small');
    p = image(d, 'l1b.qcow2');
    edit(p, (b) => b.writeUInt32BE(0x400001, 36));
    await refused(p, 'Active L1 table too large');

    p = image(d, 'rt.qcow2');
    edit(p, (b) => put64(b, 48, 0x100000));
    await refused(p, `Invalid reference count table offset 0x100000: the table's 65536 bytes run past the end of the file (${size} bytes)`);
    p = image(d, 'rtu.qcow2');
    edit(p, (b) => put64(b, 48, 0x10008));
    await refused(p, 'Invalid reference count table offset');
    p = image(d, 'rt0.qcow2');
    edit(p, (b) => b.writeUInt32BE(0, 56));
    await refused(p, 'Image does not contain a reference count table');
    p = image(d, 'rtb.qcow2');
    edit(p, (b) => b.writeUInt32BE(129, 56));
    await refused(p, 'Reference count table too large');

    // L1 entry 0 → an L2 table past the end of the file (or unaligned): found at open
    p = image(d, 'l2.qcow2');
    qemuIo(p, ['write -P 1 0 64k']); // L2 table at 0x40000, data at 0x50000
    const size2 = readFileSync(p).length;
    edit(p, (b) => putCopied(b, 0x30000, 0x100000));
    await refused(p, `qcow2 image is corrupt: L2 table offset 0x100000 (L1 index: 0x0) lies past the end of the file (${size2} bytes)`);
    edit(p, (b) => putCopied(b, 0x30000, 0x40200));
    await refused(p, 'qcow2 image is corrupt: L2 table offset 0x40200 unaligned (L1 index: 0x0)');

    // a refcount block past the end of the file: read-write opens check the refcount table
    p = image(d, 'rb.qcow2');
    edit(p, (b) => put64(b, 0x10000, 0x100000));
    await refused(p, `qcow2 image is corrupt: refcount block offset 0x100000 (reftable index: 0x0) lies past the end of the file (${size} bytes)`);
    const ro = await openImage(p, { readOnly: true });
    await ro.close();
  });

  it('an L2 entry pointing past the end of the file or unaligned fails the read that meets it, not the others', async () => {
    const d = tmpDir();
    const p = image(d, 'l2e.qcow2');
    qemuIo(p, ['write -P 1 0 64k', 'write -P 2 64k 64k']); // L2 at 0x40000: entries 0 and 1
    const size = readFileSync(p).length;
    edit(p, (b) => putCopied(b, 0x40008, 0x1000000));
    const img = await openImage(p);
    const b = Buffer.alloc(64 * KiB);
    await img.read(0, b);
    assert.ok(b.every((x) => x === 1));
    const past = `qcow2 image '${p}' is corrupt: data cluster offset 0x1000000 (L1 index: 0x0, L2 index: 0x1) lies past the end of the file (${size} bytes)`;
    await assert.rejects(img.read(64 * KiB + 10, Buffer.alloc(10)), new BlockError(past));
    await assert.rejects(img.read(0, Buffer.alloc(128 * KiB)), new BlockError(past));
    await assert.rejects(img.write(70 * KiB, Buffer.alloc(10)), new BlockError(past));
    await img.read(128 * KiB, b); // the rest of the table is fine
    await img.close();
    edit(p, (b) => putCopied(b, 0x40008, 0x50200));
    const img2 = await openImage(p);
    await assert.rejects(
      img2.read(64 * KiB, Buffer.alloc(1)),
      new BlockError(`qcow2 image '${p}' is corrupt: cluster allocation offset 0x50200 unaligned (L1 index: 0x0, L2 index: 0x1)`),
    );
    await img2.close();
  });

  it('compressed clusters past the end of the file, or that do not inflate', async () => {
    const d = tmpDir();
    const src = join(d, 'src.raw');
    writeFileSync(src, Buffer.alloc(256 * KiB, 'compress me '));
    const p = join(d, 'c.qcow2');
    qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', src, p]);
    const f = readFileSync(p);
    const l2 = f.readUInt32BE(0x30004); // L1[0], low half (the table is below 4 GiB)
    const hi = f.readUInt32BE(l2);
    const lo = f.readUInt32BE(l2 + 4);
    assert.ok(hi & 0x40000000, 'entry 0 is compressed');
    // 64 KiB clusters: offset in bits 0-53, sectors above
    const coff = (hi & 0x3fffff) * 2 ** 32 + lo;
    edit(p, (b) => b.writeUInt32BE(((hi & ~0x3fffff) | 0x10) >>> 0, l2)); // offset + 0x10 << 32
    let img = await openImage(p, { readOnly: true });
    await assert.rejects(
      img.read(0, Buffer.alloc(512)),
      new BlockError(`qcow2 image '${p}' is corrupt: compressed cluster offset ${'0x' + (0x10 * 2 ** 32 + lo).toString(16)} (L1 index: 0x0, L2 index: 0x0) lies past the end of the file (${f.length} bytes)`),
    );
    await img.close();
    edit(p, (b) => {
      b.writeUInt32BE(hi, l2);
      b.fill(0, coff, coff + 16); // a stored block whose lengths do not match
    });
    img = await openImage(p, { readOnly: true });
    await assert.rejects(
      img.read(0, Buffer.alloc(512)),
      new BlockError(`qcow2 image '${p}' is corrupt: compressed cluster at 0x${coff.toString(16)} does not decompress (invalid stored block lengths)`),
    );
    const b = Buffer.alloc(64 * KiB);
    await img.read(64 * KiB, b); // the next cluster is fine
    assert.ok(b.equals(Buffer.alloc(256 * KiB, 'compress me ').subarray(64 * KiB, 128 * KiB)));
    await img.close();
  });

  it('feature bits: unknown, external data file, extended L2, zstd; corrupt and dirty images open read-only only', async () => {
    const d = tmpDir();
    let p = image(d, 'unk.qcow2');
    edit(p, (b) => put64(b, 72, 1 << 5));
    await refused(p, 'Unsupported qcow2 feature(s): Unknown incompatible feature: 20');
    await refused(p, 'Unsupported qcow2 feature(s): Unknown incompatible feature: 20', { readOnly: true });
    edit(p, (b) => put64(b, 72, (1 << 5) | (1 << 2) | 1));
    await refused(p, 'Unsupported qcow2 feature(s): external data file, Unknown incompatible feature: 20', { readOnly: true });
    await refused(image(d, 'x.qcow2', ['-o', `data_file=${join(d, 'x.data')}`], '1M'), 'Unsupported qcow2 feature(s): external data file');
    await refused(image(d, 'l2x.qcow2', ['-o', 'extended_l2=on'], '1M'), 'Unsupported qcow2 feature(s): extended L2 entries');
    await refused(image(d, 'zstd.qcow2', ['-o', 'compression_type=zstd'], '1M'), 'Unsupported qcow2 feature(s): compression type');
    // a name from the image's own feature table wins
    p = image(d, 'named.qcow2');
    edit(p, (b) => {
      put64(b, 72, 1 << 4);
      b.write('sub-clusters\0', 0x70 + 8 + 4 * 48 + 2, 'latin1');
    });
    await refused(p, 'Unsupported qcow2 feature(s): sub-clusters');

    p = image(d, 'corrupt.qcow2', [], '1M');
    qemuIo(p, ['write -P 7 0 4k']);
    edit(p, (b) => put64(b, 72, 2));
    await refused(p, 'qcow2: Image is corrupt; cannot be opened read/write');
    let img = await openImage(p, { readOnly: true });
    const b = Buffer.alloc(4096);
    await img.read(0, b);
    assert.ok(b.every((x) => x === 7));
    await img.close();

    p = image(d, 'dirty.qcow2', ['-o', 'lazy_refcounts=on'], '1M');
    qemuIo(p, ['write -P 8 0 4k']);
    edit(p, (b) => put64(b, 72, 1));
    await refused(
      p,
      "qcow2: Image is dirty (its refcounts may be stale) and Ferry does not repair it; run 'qemu-img check -r all' on it first, or open it read-only",
    );
    img = await openImage(p, { readOnly: true });
    await img.read(0, b);
    assert.ok(b.every((x) => x === 8));
    await img.close();
  });

  it('encryption, internal snapshots (read-only only), a backing file name too long', async () => {
    const d = tmpDir();
    const luks = join(d, 'luks.qcow2');
    // qemu-img times PBKDF2 by thread CPU time and gives up when a busy host measures 0 ms: try again then
    for (let attempt = 1; ; attempt++) {
      const r = run('qemu-img', ['create', '-f', 'qcow2', '--object', 'secret,id=sec0,data=abc', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0', luks, '1M']);
      if (r.status === 0) break;
      assert.ok(attempt < 5 && r.stderr.includes('Unable to get accurate CPU usage'), r.stderr);
    }
    await refused(luks, 'Encrypted images are not supported (qcow2 crypt_method 2)', { readOnly: true });
    const aes = image(d, 'aes.qcow2', [], '1M');
    edit(aes, (b) => b.writeUInt32BE(1, 32));
    await refused(aes, 'Encrypted images are not supported (qcow2 crypt_method 1)');

    const snap = image(d, 'snap.qcow2', [], '1M');
    qemuIo(snap, ['write -P 3 0 64k']);
    qemuImg(['snapshot', '-c', 's1', snap]);
    qemuIo(snap, ['write -P 4 0 4k']);
    await refused(snap, 'qcow2 images with internal snapshots can only be opened read-only (this one has 1)');
    const img = await openImage(snap, { readOnly: true });
    const b = Buffer.alloc(8192);
    await img.read(0, b);
    assert.ok(b.subarray(0, 4096).every((x) => x === 4) && b.subarray(4096).every((x) => x === 3), 'the active state');
    await img.close();

    const long = image(d, 'long.qcow2', ['-b', 'base', '-F', 'raw', '-u'], '1M');
    edit(long, (b) => b.writeUInt32BE(1024, 16));
    await refused(long, 'Backing file name too long');
  });

  it('backing chains: a missing file (at any depth), a loop, an unsupported or broken backing image', async () => {
    const d = tmpDir();
    writeFileSync(join(d, 'base.raw'), Buffer.alloc(1 << 20));
    qemuImg(['create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'mid.qcow2'], d);
    qemuImg(['create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], d);
    const top = join(d, 'top.qcow2');
    writeFileSync(join(d, 'base.raw'), ''); // fine: an empty raw image
    await (await openImage(top)).close();
    qemuImg(['rebase', '-u', '-b', 'gone.raw', '-F', 'raw', join(d, 'mid.qcow2')]);
    await refused(
      top,
      `Could not open backing file: Could not open '${d}/mid.qcow2': Could not open backing file: Could not open '${d}/gone.raw': No such file or directory`,
    );
    await refused(join(d, 'nothing.qcow2'), 'No such file or directory');
    mkdirSync(join(d, 'dir'));
    await refused(join(d, 'dir'), 'Is a directory');

    // a → b → a, and an image that is its own backing file
    qemuImg(['rebase', '-u', '-b', 'top.qcow2', '-F', 'qcow2', join(d, 'mid.qcow2')]);
    await refused(
      top,
      `Could not open backing file: Could not open '${d}/mid.qcow2': Could not open backing file: Could not open '${d}/top.qcow2': this image is already in the backing chain (a loop)`,
    );
    const self = image(d, 'self.qcow2', [], '1M');
    qemuImg(['rebase', '-u', '-b', 'self.qcow2', '-F', 'qcow2', self]);
    await refused(self, `Could not open backing file: Could not open '${d}/self.qcow2': this image is already in the backing chain (a loop)`);

    const vmdk = image(d, 'vmdk.qcow2', [], '1M');
    qemuImg(['rebase', '-u', '-b', 'x.vmdk', '-F', 'vmdk', vmdk]);
    await refused(vmdk, "Could not open backing file: Unsupported backing file format 'vmdk' (Ferry opens raw and qcow2)");

    const badBase = image(d, 'bad-base.qcow2', [], '1M');
    edit(badBase, (b) => b.writeUInt32BE(4, 4));
    const over = join(d, 'over.qcow2');
    qemuImg(['create', '-f', 'qcow2', '-u', '-b', 'bad-base.qcow2', '-F', 'qcow2', over, '1M']);
    await refused(over, `Could not open backing file: Could not open '${d}/bad-base.qcow2': Unsupported qcow2 version 4`);

    await assert.rejects(openImage(top, { format: 'vmdk' as 'raw' }), new BlockError("Unsupported image format 'vmdk' (Ferry opens raw and qcow2)"));
  });

  it('no file stays open after a refused open', () => {
    assert.equal(openFds(), fdsBefore);
  });
});
