import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { describe, it } from 'node:test';
import { gunzipSync } from 'node:zlib';
import { buildVmdesc, writeDeviceSections } from '../../src/migration/sections/device-sections.js';
import { RamLoader } from '../../src/migration/ram/loader.js';
import { StreamReader } from '../../src/migration/stream/reader.js';
import { BufferSink } from '../../src/migration/stream/writer.js';
import { MigrationStreamError } from '../../src/migration/wire/errors.js';
import type { InspectedSection as ParsedSection } from '../../src/migration/inspect.js';
import { fixedDevice, loadStream, makeBlock, parseStream, rng, vectorsDir } from './mig-helpers.js';

const MiB = 1024 * 1024;
const vec = (name: string) => readFileSync(path.join(vectorsDir, name));

describe('stream vectors', () => {
  it('parses none-16M.bin fully', async () => {
    const buf = vec('none-16M.bin');
    const recs = await parseStream(buf);
    assert.equal(recs[0]!.type, 'header');
    const cfg = recs[1]!;
    assert.equal(cfg.type, 'config');
    assert.equal(cfg.type === 'config' && cfg.machine, 'none');
    const sections = recs.filter((r): r is ParsedSection => r.type === 'section');
    const ram = sections.filter((s) => s.idstr === 'ram');
    assert.equal(ram[0]!.kind, 'start');
    assert.equal(ram[0]!.sectionId, 2);
    assert.equal(ram[0]!.versionId, 4);
    const memSize = ram[0]!.ram![0]!;
    assert.equal(memSize.kind, 'mem_size');
    assert.deepEqual(memSize.kind === 'mem_size' && memSize.blocks, [{ name: 'm', length: 16 * MiB }]);
    const all = ram.flatMap((s) => s.ram!);
    const zero = all.filter((x) => x.kind === 'zero');
    assert.equal(zero.length, 4096);
    assert.equal(all.filter((x) => x.kind === 'page' || x.kind === 'xbzrle' || x.kind === 'compress').length, 0);
    assert.ok(zero.every((z) => z.kind === 'zero' && z.fill === 0 && z.block === 'm'));
    const offs = new Set(zero.map((z) => (z.kind === 'zero' ? z.offset : -1)));
    assert.equal(offs.size, 4096);
    const timer = sections.find((s) => s.idstr === 'timer')!;
    assert.equal(timer.kind, 'full');
    assert.equal(timer.versionId, 2);
    assert.equal(timer.payload!.length, 24);
    const gs = sections.find((s) => s.idstr === 'globalstate')!;
    assert.equal(gs.payload!.length, 104);
    assert.equal(gs.payload!.readUInt32BE(0), 10);
    assert.equal(gs.payload!.toString('latin1', 4, 13), 'prelaunch');
    assert.equal(recs.at(-2)!.type, 'eof');
    const vd = recs.at(-1)!;
    assert.equal(vd.type, 'vmdesc');
    if (vd.type === 'vmdesc') {
      const v = vd.value as { page_size: number; devices: Array<{ name: string }> };
      assert.equal(v.page_size, 4096);
      assert.deepEqual(v.devices.map((d) => d.name), ['timer', 'globalstate']);
      // our vmdesc writer reproduces QEMU's trailer byte for byte
      const sink = new BufferSink();
      const { entries } = writeDeviceSections(
        sink,
        [fixedDevice('timer', 2, timer.payload!), fixedDevice('globalstate', 1, gs.payload!)],
        0,
      );
      assert.equal(buildVmdesc(entries), vd.json);
    }
  });

  it('our device sections for timer/globalstate equal QEMU bytes', async () => {
    const buf = vec('none-16M.bin');
    const recs = await parseStream(buf);
    const sections = recs.filter((r): r is ParsedSection => r.type === 'section');
    const timer = sections.find((s) => s.idstr === 'timer')!;
    const gs = sections.find((s) => s.idstr === 'globalstate')!;
    const sink = new BufferSink();
    writeDeviceSections(sink, [fixedDevice('timer', 2, timer.payload!)], 0);
    writeDeviceSections(sink, [fixedDevice('globalstate', 1, gs.payload!)], 4);
    const ours = sink.toBuffer();
    const eof = recs.find((r) => r.type === 'eof')!.at;
    assert.deepEqual(ours, buf.subarray(timer.at, eof));
  });

  for (const [file, compress] of [
    ['ramonly-plain.bin', false],
    ['ramonly-xbzrle-gs.bin', false],
    ['ramonly-compress.bin', true],
  ] as const) {
    it(`loads ${file} into a 16 MiB block "m" identical to the expected image`, async () => {
      const block = makeBlock('m', 16 * MiB);
      const loader = new RamLoader([block], { compress });
      const gs = fixedDevice('globalstate', 1, new Uint8Array(104));
      const r = StreamReader.fromBuffer(vec(file));
      await loadStream(r, loader, [gs]);
      const expect = gunzipSync(vec(file + '.expect.gz'));
      assert.equal(expect.length, 16 * MiB);
      assert.ok(Buffer.from(block.bytes.buffer).equals(expect), 'RAM differs from the expected image');
      assert.ok(loader.counters.pages > 0);
      if (file.includes('xbzrle')) {
        assert.ok(loader.counters.xbzrle > 0);
        assert.ok(gs.loaded);
      }
      if (compress) assert.ok(loader.counters.compressed > 0);
    });
  }

  it('refuses a compressed page without the compress capability', async () => {
    const loader = new RamLoader([makeBlock('m', 16 * MiB)]);
    const r = StreamReader.fromBuffer(vec('ramonly-compress.bin'));
    await assert.rejects(loadStream(r, loader, []), { message: 'Received an unexpected compressed page' });
  });

  it('same result for every chunking of the reader (1-byte and random chunks)', async () => {
    const data = vec('ramonly-plain.bin');
    const expect = gunzipSync(vec('ramonly-plain.bin.expect.gz'));
    const next = rng(7);
    const chunkings: Array<(i: number) => number> = [() => 1, () => 1 + (next() % 7), () => 1 + (next() % 5000), () => 4093];
    for (const size of chunkings) {
      const chunks: Buffer[] = [];
      for (let i = 0; i < data.length; ) {
        const n = Math.min(size(i), data.length - i);
        chunks.push(data.subarray(i, i + n));
        i += n;
      }
      const block = makeBlock('m', 16 * MiB);
      const loader = new RamLoader([block]);
      const r = new StreamReader(Readable.from(chunks, { objectMode: false }));
      await loadStream(r, loader, []);
      assert.ok(Buffer.from(block.bytes.buffer).equals(expect));
      assert.equal(r.bytesRead, data.length);
    }
  });

  it('header bit flips give clean errors', async () => {
    const data = vec('none-16M.bin').subarray(0, 0x200);
    for (let byte = 0; byte < 0x46; byte++) {
      for (let bit = 0; bit < 8; bit++) {
        const b = Buffer.from(data);
        b[byte]! ^= 1 << bit;
        try {
          await parseStream(b);
          assert.fail('truncated stream parsed');
        } catch (e) {
          assert.ok(e instanceof MigrationStreamError, `byte ${byte} bit ${bit}: ${String(e)}`);
        }
      }
    }
  });
});
