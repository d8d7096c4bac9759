/**
 * native/pages: page copies (copyBytes) and the run decoder behind the RAM
 * loader's fast path (loadPageRun). The loader with an observer takes the
 * pure-JS record loop, without one the native runs: both must leave RAM,
 * the touched bitmap and the counters exactly alike, for any stream cut
 * into any chunks.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { copyBytes, loadPageRun, nativePages, savePageRun } from '../../src/base/native.js';
import { RamLoader } from '../../src/migration/ram/loader.js';
import { RamSender } from '../../src/migration/ram/sender.js';
import { StreamReader } from '../../src/migration/stream/reader.js';
import { StreamWriter } from '../../src/migration/stream/writer.js';
import { WIRE } from '../../src/migration/wire/constants.js';
import { Collector, makeBlock } from './mig-helpers.js';

const F = WIRE.RAM;
const PAGES = 48;
const noNative = process.env.FERRY_NO_NATIVE === '1';

describe('native/pages', () => {
  it('is loaded (npm run build builds it; FERRY_NO_NATIVE=1 turns it off)', () => {
    assert.equal(nativePages, !noNative);
  });

  it('copyBytes copies between a SharedArrayBuffer and a Buffer at odd offsets', () => {
    const ram = new Uint8Array(new SharedArrayBuffer(3 * 4096));
    for (let i = 0; i < ram.length; i++) ram[i] = (i * 7 + 3) & 0xff;
    const out = Buffer.alloc(5000);
    copyBytes(out, 13, ram, 4096, 4096);
    assert.deepEqual(out.subarray(13, 13 + 4096), Buffer.from(ram.subarray(4096, 8192)));
    assert.equal(out[12], 0);
    assert.equal(out[13 + 4096], 0);
    copyBytes(ram, 5, out, 13, 4096);
    assert.deepEqual(Buffer.from(ram.subarray(5, 5 + 4096)), out.subarray(13, 13 + 4096));
  });

  it('copyBytes refuses a range outside either array', () => {
    const a = new Uint8Array(16);
    const b = new Uint8Array(new SharedArrayBuffer(16));
    assert.throws(() => copyBytes(a, 0, b, 8, 9), RangeError);
    assert.throws(() => copyBytes(a, 9, b, 0, 8), RangeError);
  });

  it('loadPageRun takes a run of CONTINUE records and stops at anything else', { skip: noNative && 'FERRY_NO_NATIVE=1' }, () => {
    const block = makeBlock('pc.ram', 4 * 4096);
    block.touched.fill(0);
    const page = Buffer.alloc(4096, 0x5a);
    const rec = (offset: number, flags: number): Buffer => {
      const h = Buffer.alloc(8);
      h.writeUInt32BE(0, 0);
      h.writeUInt32BE(offset | flags, 4);
      return h;
    };
    const stream = Buffer.concat([
      rec(4096, F.PAGE | F.CONTINUE), page,
      rec(2 * 4096, F.ZERO | F.CONTINUE), Buffer.of(7),
      rec(0, F.EOS),
    ]);
    const counts = new Float64Array(2);
    const n = loadPageRun(stream, 0, stream.length, block.bytes, block.touched, counts);
    assert.equal(n, 8 + 4096 + 9, 'stops before EOS');
    assert.deepEqual([...counts], [1, 1]);
    assert.ok(block.bytes.subarray(4096, 8192).every((v) => v === 0x5a));
    assert.ok(block.bytes.subarray(8192, 12288).every((v) => v === 7));
    assert.equal(block.touched[0], 0b110);
    // an offset outside the block is left to the record loop, which fails with QEMU's text
    const bad = Buffer.concat([rec(4 * 4096, F.PAGE | F.CONTINUE), page]);
    assert.equal(loadPageRun(bad, 0, bad.length, block.bytes, block.touched, counts), 0);
    // a record cut by the end of the chunk is left too
    assert.equal(loadPageRun(stream, 0, 8 + 4095, block.bytes, block.touched, counts), 0);
  });

  it('the loader applies any stream alike with and without the native runs', async () => {
    const record = fc.oneof(
      fc.record({ kind: fc.constant('page' as const), page: fc.nat(PAGES - 1), seed: fc.nat(255) }),
      fc.record({ kind: fc.constant('zero' as const), page: fc.nat(PAGES - 1), fill: fc.oneof(fc.constant(0), fc.nat(255)) }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(record, { minLength: 1, maxLength: 60 }), fc.array(fc.integer({ min: 1, max: 9000 }), { minLength: 1, maxLength: 30 }), fc.nat(0xffffffff), async (recs, cuts, pre) => {
        const parts: Buffer[] = [];
        recs.forEach((r, i) => {
          const h = Buffer.alloc(8);
          const flags = (r.kind === 'page' ? F.PAGE : F.ZERO) | (i === 0 ? 0 : F.CONTINUE);
          h.writeUInt32BE(((r.page * 4096) | flags) >>> 0, 4);
          parts.push(h);
          if (i === 0) parts.push(Buffer.from([6]), Buffer.from('pc.ram'));
          parts.push(r.kind === 'page' ? Buffer.alloc(4096, r.seed) : Buffer.of(r.fill));
        });
        parts.push(Buffer.from([0, 0, 0, 0, 0, 0, 0, F.EOS]));
        const stream = Buffer.concat(parts);
        const load = async (observe: boolean) => {
          const block = makeBlock('pc.ram', PAGES * 4096);
          // a pre-state with some pages written and some never touched
          for (let p = 0; p < PAGES; p++) {
            if ((pre >>> (p % 32)) & 1) block.bytes.fill(p + 1, p * 4096, p * 4096 + 4096);
            else if (p % 3 === 0) block.touched[p >>> 5]! &= ~(1 << (p & 31));
          }
          const loader = new RamLoader([block], observe ? { observer: { page: () => undefined } } : {});
          const r = new StreamReader(null);
          let at = 0;
          for (const c of cuts) {
            if (at >= stream.length) break;
            r.push(stream.subarray(at, Math.min(stream.length, at + c)));
            at += c;
          }
          if (at < stream.length) r.push(stream.subarray(at));
          await loader.loadSection(r);
          return { bytes: Buffer.from(block.bytes), touched: [...block.touched], counters: loader.counters };
        };
        const js = await load(true);
        const fast = await load(false);
        assert.deepEqual(fast.counters, js.counters);
        assert.deepEqual(fast.touched, js.touched);
        assert.ok(fast.bytes.equals(js.bytes), 'RAM differs');
      }),
      { numRuns: 150 },
    );
  });

  it('a PAGE outside the block fails the load with QEMU\'s text on the native path too', async () => {
    const block = makeBlock('pc.ram', 2 * 4096);
    const h1 = Buffer.alloc(8);
    h1.writeUInt32BE(F.PAGE, 4);
    const h2 = Buffer.alloc(8);
    h2.writeUInt32BE((8 * 4096) | F.PAGE | F.CONTINUE, 4);
    const stream = Buffer.concat([h1, Buffer.from([6]), Buffer.from('pc.ram'), Buffer.alloc(4096, 1), h2, Buffer.alloc(4096, 2)]);
    const loader = new RamLoader([block]);
    await assert.rejects(loader.loadSection(StreamReader.fromBuffer(stream)), /Illegal RAM offset 8000/);
  });

  it('savePageRun encodes CONTINUE ZERO/PAGE records, clears the bits it took, and stops before what does not fit', { skip: noNative && 'FERRY_NO_NATIVE=1' }, () => {
    const block = makeBlock('pc.ram', 40 * 4096);
    block.touched.fill(0);
    block.touched[0] = 0b1110; // pages 1..3 written; page 2 holds zeros
    block.bytes.fill(0x11, 4096, 8192);
    block.bytes.fill(0x33, 3 * 4096, 4 * 4096);
    const bitmap = new Uint32Array(2);
    bitmap[0] = 0b11111; // pages 0..4
    bitmap[1] = 1 << 2; // page 34
    const out = Buffer.alloc(3 * 9 + 2 * 4104 + 100);
    const counts = new Float64Array(3);
    const next = savePageRun(bitmap, block.touched, block.bytes, 0, 40, 1000, out, 5, out.length, counts);
    assert.equal(next, 40);
    assert.deepEqual([...counts], [2, 4, 4 * 9 + 2 * 4104]);
    assert.deepEqual([...bitmap], [0, 0]);
    const expect = Buffer.concat([
      Buffer.from([0, 0, 0, 0, 0, 0, 0, F.ZERO | F.CONTINUE, 0]),
      Buffer.from([0, 0, 0, 0, 0, 0, 0x10, F.PAGE | F.CONTINUE]), Buffer.alloc(4096, 0x11),
      Buffer.from([0, 0, 0, 0, 0, 0, 0x20, F.ZERO | F.CONTINUE, 0]),
      Buffer.from([0, 0, 0, 0, 0, 0, 0x30, F.PAGE | F.CONTINUE]), Buffer.alloc(4096, 0x33),
      Buffer.from([0, 0, 0, 0, 0, 0, 0x40, F.ZERO | F.CONTINUE, 0]),
      Buffer.from([0, 0, 0, 0, 0, 2, 0x20, F.ZERO | F.CONTINUE, 0]),
    ]);
    assert.ok(out.subarray(5, 5 + expect.length).equals(expect));
    // a PAGE that does not fit stays in the bitmap; maxPages and endPage stop the walk
    bitmap[0] = 0b1010;
    counts.fill(0);
    assert.equal(savePageRun(bitmap, block.touched, block.bytes, 0, 40, 1000, out, 0, 4103, counts), 1);
    assert.deepEqual([...counts], [0, 0, 0]);
    assert.equal(savePageRun(bitmap, block.touched, block.bytes, 2, 3, 1000, out, 0, out.length, counts), 3);
    assert.equal(bitmap[0], 0b1010);
    assert.equal(savePageRun(bitmap, block.touched, block.bytes, 0, 40, 1, out, 0, out.length, counts), 2);
    assert.equal(bitmap[0], 0b1000);
    assert.throws(() => savePageRun(bitmap, block.touched, block.bytes, 0, 41, 1, out, 0, out.length, counts), RangeError);
  });

  it('the sender writes the same bytes with and without the native runs, for any RAM, dirty pages and budget', async () => {
    const pagesN = 100;
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.nat(3), { minLength: pagesN, maxLength: pagesN }),
        fc.array(fc.boolean(), { minLength: pagesN, maxLength: pagesN }),
        fc.array(fc.record({ maxPages: fc.integer({ min: 1, max: 120 }), maxBytes: fc.integer({ min: 1, max: 300000 }) }), { minLength: 1, maxLength: 6 }),
        fc.boolean(),
        async (kinds, dirty, budgets, twoBlocks) => {
          const send = async (nativeRuns: boolean) => {
            // per page: 0 never written, 1 written with zeros, 2 and 3 written with data
            const blocks = twoBlocks ? [makeBlock('pc.ram', 60 * 4096), makeBlock('pc.ram.1', 40 * 4096)] : [makeBlock('pc.ram', pagesN * 4096)];
            const where = (p: number) => (twoBlocks && p >= 60 ? { b: blocks[1]!, p: p - 60 } : { b: blocks[0]!, p });
            kinds.forEach((k, i) => {
              const { b, p } = where(i);
              if (k === 0) b.touched[p >>> 5]! &= ~(1 << (p & 31));
              else if (k >= 2) b.bytes.fill(i * 7 + k, p * 4096, p * 4096 + 4096);
            });
            const sender = new RamSender(blocks, { nativeRuns, now: () => 0 });
            // the first pass, then a pass over the dirty pages
            const out = new Collector();
            const w = new StreamWriter(out, { bufferSize: 64 * 1024, reuseBuffers: false });
            const drive = async () => {
              for (let i = 0, guard = 0; guard < 1000; guard++, i++) {
                const r = sender.sendPages(w, budgets[i % budgets.length]);
                await w.flush();
                if (r.done) break;
              }
            };
            await drive();
            dirty.forEach((d, i) => {
              if (!d) return;
              const { b, p } = where(i);
              Atomics.or(b.dirty, p >>> 5, 1 << (p & 31));
            });
            sender.syncDirtyLog();
            await drive();
            await w.drain();
            return { bytes: out.data, counters: sender.counters, bitmaps: sender.bitmaps.map((m) => [...m]), left: sender.dirtyPages };
          };
          const js = await send(false);
          const fast = await send(true);
          assert.deepEqual(fast.counters, js.counters);
          assert.deepEqual(fast.bitmaps, js.bitmaps);
          assert.equal(fast.left, js.left);
          assert.ok(fast.bytes.equals(js.bytes), 'streams differ');
        },
      ),
      { numRuns: 100 },
    );
  });
});
