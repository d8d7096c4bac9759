/**
 * The RAM pieces of postcopy: the discard list (docs/spec/stream-format.md §10.2),
 * requested pages (§11), placement on the destination (§9.5) and
 * release-ram's bookkeeping (docs/spec/qmp.md E.5).
 */
import fc from 'fast-check';
import { newBitmap, setBit, setRuns } from '../../src/base/bitmap.js';
import { discardRanges } from '../../src/migration/postcopy/discard.js';
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { RamLoader } from '../../src/migration/ram/loader.js';
import { RamReleaser } from '../../src/migration/ram/release.js';
import { RamSender } from '../../src/migration/ram/sender.js';
import { StreamReader } from '../../src/migration/stream/reader.js';
import { StreamWriter } from '../../src/migration/stream/writer.js';
import { Collector, makeBlock, markDirty } from './mig-helpers.js';

const EOS = [0, 0, 0, 0, 0, 0, 0, 0x10];

/** Take the first n pages of the walk off the bitmap (as sent). */
function sendFirst(s: RamSender, n: number): Buffer {
  const c = new Collector();
  const w = new StreamWriter(c);
  s.sendPages(w, { maxPages: n });
  return Buffer.from(w.buf.subarray(0, w.bytesWritten));
}

describe('discardRanges of the migration bitmap', () => {
  it('lists never-sent and re-dirtied pages as coalesced byte ranges', () => {
    const b = makeBlock('pc.ram', 200 * 4096);
    const s = new RamSender([b]);
    s.syncDirtyLog();
    assert.deepEqual(discardRanges(s.bitmaps[0]!, s.blocks[0]!.pages), [[0, 200 * 4096]], 'nothing sent: all of it');
    sendFirst(s, 100);
    markDirty(b, 3);
    markDirty(b, 4);
    markDirty(b, 31);
    markDirty(b, 32);
    markDirty(b, 70);
    s.syncDirtyLog();
    assert.deepEqual(discardRanges(s.bitmaps[0]!, s.blocks[0]!.pages), [
      [3 * 4096, 2 * 4096],
      [31 * 4096, 2 * 4096],
      [70 * 4096, 4096],
      [100 * 4096, 100 * 4096],
    ]);
    assert.equal(s.dirtyPages, 105);
  });

  it('is empty when everything was sent, and stops at the block end', () => {
    const b = makeBlock('m', 33 * 4096);
    const s = new RamSender([b]);
    s.syncDirtyLog();
    assert.deepEqual(discardRanges(s.bitmaps[0]!, s.blocks[0]!.pages), [[0, 33 * 4096]]);
    sendFirst(s, 33);
    assert.deepEqual(discardRanges(s.bitmaps[0]!, s.blocks[0]!.pages), []);
  });
});

describe('RamSender.sendRequested', () => {
  it('sends only pages still to send, names the block first, and moves the walk behind them', () => {
    const b = makeBlock('m', 64 * 4096);
    b.bytes.fill(7, 10 * 4096, 11 * 4096);
    const s = new RamSender([b]);
    s.syncDirtyLog();
    s.resetLastBlock();
    const c = new Collector();
    const w = new StreamWriter(c);
    assert.equal(s.sendRequested(w, 0, 10, 2), 2);
    assert.equal(s.sendRequested(w, 0, 10, 1), 0, 'already sent: not again');
    const out = Buffer.from(w.buf.subarray(0, w.bytesWritten));
    // PAGE for page 10 with the block name, then ZERO for page 11 with CONTINUE
    assert.equal(out.readUInt32BE(4), (10 * 4096) | 0x08);
    assert.equal(out[8], 1);
    assert.equal(out.toString('latin1', 9, 10), 'm');
    assert.equal(out[10], 7);
    const z = 10 + 4096;
    assert.equal(out.readUInt32BE(z + 4), (11 * 4096) | 0x02 | 0x20);
    assert.equal(out.length, z + 9);
    assert.equal(s.dirtyPages, 62);
    // the background walk goes on from page 12
    const next = sendFirst(s, 1);
    assert.equal(next.readUInt32BE(4) & ~0xfff, 12 * 4096);
  });
});

describe('RamLoader in postcopy mode', () => {
  it('places missing pages, reports them, and never overwrites a page already present', async () => {
    const b = makeBlock('m', 4 * 4096);
    b.present[0] = 0b1101; // page 1 missing
    b.bytes[1 * 4096] = 0x55; // stale contents of the missing page
    b.bytes[2 * 4096] = 0x66; // the guest wrote page 2 since it arrived
    const placed: number[] = [];
    const loader = new RamLoader([b], { placed: (blk, page) => placed.push(blk * 100 + page) });
    loader.postcopy = true;
    const page1 = Buffer.alloc(4096, 0x11);
    const page2 = Buffer.alloc(4096, 0x22);
    const rec = Buffer.concat([
      Buffer.from([0, 0, 0, 0, 0, 0, 0x10, 0x08, 1, 0x6d]), page1, // PAGE 1 "m"
      Buffer.from([0, 0, 0, 0, 0, 0, 0x20, 0x28]), page2, // PAGE 2 CONTINUE: present, skipped
      Buffer.from(EOS),
    ]);
    await loader.loadSection(StreamReader.fromBuffer(rec), 4);
    assert.deepEqual(placed, [1]);
    assert.equal(b.bytes[1 * 4096], 0x11);
    assert.equal(b.bytes[2 * 4096], 0x66, 'the guest write survives a second copy');
  });

  it('a ZERO record for a missing page clears stale contents', async () => {
    const b = makeBlock('m', 2 * 4096);
    b.present[0] = 0b01;
    b.bytes.fill(0x99, 4096, 8192);
    const placed: number[] = [];
    const loader = new RamLoader([b], { placed: (_b, p) => placed.push(p) });
    loader.postcopy = true;
    await loader.loadSection(StreamReader.fromBuffer(Buffer.from([0, 0, 0, 0, 0, 0, 0x10, 0x02, 1, 0x6d, 0, ...EOS])), 4);
    assert.deepEqual(placed, [1]);
    assert.ok(b.bytes.subarray(4096).every((v) => v === 0));
  });
});

describe('RamReleaser', () => {
  it('releases whole sent words once, and keeps `touched` honest', (t) => {
    const b = makeBlock('m', 96 * 4096);
    const s = new RamSender([b]);
    s.syncDirtyLog();
    sendFirst(s, 40);
    const r = new RamReleaser([b], s.bitmaps);
    r.releaseSent();
    if (r.releasedBytes === 0) return t.skip('native/hugepage addon not built: nothing can be released');
    // words 0 (pages 0-31) are all sent; word 1 only partly
    assert.equal(r.releasedBytes, 32 * 4096);
    assert.equal(b.touched[0], 0);
    assert.equal(b.touched[1], 0xffffffff);
    const once = r.releasedBytes;
    r.releaseSent();
    assert.equal(r.releasedBytes, once, 'nothing twice');
    sendFirst(s, 56);
    r.releaseSent();
    assert.equal(r.releasedBytes, 96 * 4096);
  });
});

describe('discardRanges against the plain run list', () => {
  it('equals setRuns in bytes for random bitmaps of any length', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 200 }).chain((n) => fc.tuple(fc.constant(n), fc.array(fc.nat(n - 1)), fc.boolean())), ([n, bits, full]) => {
        const bm = newBitmap(n, full);
        for (const b of bits) setBit(bm, b);
        const want = setRuns(bm, n).map(([p, k]) => [p * 4096, k * 4096]);
        assert.deepEqual(discardRanges(bm, n), want);
      }),
    );
  });
});
