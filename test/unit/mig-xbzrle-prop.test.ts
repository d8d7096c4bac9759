/**
 * XBZRLE: properties of the delta codec (fast-check), the page cache
 * (docs/spec/xbzrle.md §4) and the source page hook with RamSender → RamLoader
 * (docs/spec/xbzrle.md §3, §5).
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { xbzrleDecode, xbzrleEncode } from '../../src/migration/codec/xbzrle-codec.js';
import { CACHED_PAGE_LIFETIME, XbzrleCache, pow2floor } from '../../src/migration/codec/xbzrle-cache.js';
import { RamLoader } from '../../src/migration/ram/loader.js';
import { RamSender } from '../../src/migration/ram/sender.js';
import { XbzrleEncoder } from '../../src/migration/ram/xbzrle-encoder.js';
import { StreamReader } from '../../src/migration/stream/reader.js';
import { StreamWriter } from '../../src/migration/stream/writer.js';
import { Collector, makeBlock, markDirty } from './mig-helpers.js';

const P = 4096;

/**
 * The encoder of docs/spec/xbzrle.md §2.1 written out step by step, as the model the
 * real encoder must match byte for byte (including where it overflows).
 */
function modelEncode(oldP: Uint8Array, newP: Uint8Array, D = P): number[] | -1 {
  const out: number[] = [];
  const uleb = (v: number) => (v < 0x80 ? out.push(v) : out.push((v & 0x7f) | 0x80, v >> 7));
  let i = 0;
  while (i < P) {
    if (out.length + 2 > D) return -1; // 1
    let z = 0;
    while (i + z < P && oldP[i + z] === newP[i + z]) z++; // 2
    if (i + z === P) break; // 3, 4
    uleb(z); // 5
    i += z;
    if (out.length + 2 > D) return -1; // 6
    let nz = 0;
    while (i + nz < P && oldP[i + nz] !== newP[i + nz]) nz++; // 7
    uleb(nz); // 8
    if (out.length + nz > D) return -1;
    for (let k = 0; k < nz; k++) out.push(newP[i + k]!); // 9
    i += nz;
  }
  return out;
}

function encode(oldP: Uint8Array, newP: Uint8Array): Uint8Array | -1 {
  const out = new Uint8Array(P + 16);
  const n = xbzrleEncode(oldP, newP, out, 0, P);
  return n < 0 ? -1 : out.subarray(0, n);
}

/** A random page and a copy with edits: [offset, bytes] runs (sparse or dense). */
const pageArb = fc.uint8Array({ minLength: P, maxLength: P });
const edit = (maxLen: number) =>
  fc.record({ at: fc.integer({ min: 0, max: P - 1 }), bytes: fc.uint8Array({ minLength: 1, maxLength: maxLen }) });
const editsArb = (maxEdits: number, maxLen: number) => fc.array(edit(maxLen), { maxLength: maxEdits });

function applyEdits(base: Uint8Array, edits: { at: number; bytes: Uint8Array }[]): Uint8Array {
  const n = base.slice();
  for (const e of edits) n.set(e.bytes.subarray(0, P - e.at), e.at);
  return n;
}

describe('xbzrle codec properties (fast-check)', () => {
  it('sparse random edits: encode → decode over the old page gives the new page', () => {
    fc.assert(
      fc.property(pageArb, editsArb(40, 16), (oldP, edits) => {
        const newP = applyEdits(oldP, edits);
        const e = encode(oldP, newP);
        if (e === -1) return; // cannot happen for 40 × 16 bytes, but the model test covers it
        const page = oldP.slice();
        assert.ok(xbzrleDecode(e, 0, e.length, page) >= 0);
        assert.deepEqual(page, newP);
        assert.equal(e.length === 0, Buffer.compare(Buffer.from(oldP), Buffer.from(newP)) === 0);
      }),
      { numRuns: 300 },
    );
  });

  it('byte-exact with the §2.1 model; length ≤ 4096 or overflow exactly where the model overflows', () => {
    // dense edits reach the overflow boundary; zero-filled bases give long equal runs
    const baseArb = fc.oneof(pageArb, fc.constant(new Uint8Array(P)));
    fc.assert(
      fc.property(baseArb, fc.oneof(editsArb(60, 8), editsArb(400, 64), editsArb(8, 4096)), (oldP, edits) => {
        const newP = applyEdits(oldP, edits);
        const model = modelEncode(oldP, newP);
        const e = encode(oldP, newP);
        if (model === -1) {
          assert.equal(e, -1);
        } else {
          assert.notEqual(e, -1);
          assert.ok(model.length <= P);
          assert.deepEqual(Array.from(e as Uint8Array), model);
          const page = oldP.slice();
          assert.ok(xbzrleDecode(e as Uint8Array, 0, (e as Uint8Array).length, page) >= 0);
          assert.deepEqual(page, newP);
        }
      }),
      { numRuns: 400 },
    );
  });

  it('pages at any byte offset (word-aligned or not) encode exactly as the model', () => {
    fc.assert(
      fc.property(pageArb, fc.oneof(editsArb(20, 8), editsArb(300, 32)), fc.integer({ min: 0, max: 7 }), fc.integer({ min: 0, max: 7 }), (oldP, edits, oa, na) => {
        const newP = applyEdits(oldP, edits);
        const ob = new Uint8Array(P + 8);
        ob.set(oldP, oa);
        const nb = new Uint8Array(new SharedArrayBuffer(P + 8));
        nb.set(newP, na);
        const out = new Uint8Array(P + 16);
        const n = xbzrleEncode(ob.subarray(oa, oa + P), nb.subarray(na, na + P), out, 3, P);
        const model = modelEncode(oldP, newP);
        if (model === -1) assert.equal(n, -1);
        else assert.deepEqual(Array.from(out.subarray(3, 3 + n)), model);
      }),
      { numRuns: 300 },
    );
  });

  it('overflow boundary sweep: a changed tail of every length (model vs encoder)', () => {
    const o = new Uint8Array(P);
    let lastOk = -1;
    for (let equal = 0; equal < 16; equal++) {
      const n = new Uint8Array(P);
      n.fill(7, equal);
      const m = modelEncode(o, n);
      const e = encode(o, n);
      assert.equal(e === -1, m === -1, `tail from ${equal}`);
      if (m !== -1) lastOk = equal;
    }
    // 3 equal bytes + 4093 changed = 1 + 2 + 4093 = 4096 bytes: the first that fits
    assert.equal(lastOk >= 3, true);
    assert.equal(encode(o, new Uint8Array(P).fill(7, 2)), -1);
    assert.equal((encode(o, new Uint8Array(P).fill(7, 3)) as Uint8Array).length, 4096);
    // a page whose bytes all differ: 1 + 2 + 4096 -> overflow
    assert.equal(encode(o, new Uint8Array(P).fill(1)), -1);
    // alternating changed/equal bytes: 2 bytes of lengths + 1 data byte per changed byte
    const alt = new Uint8Array(P);
    for (let i = 0; i < P; i += 2) alt[i] = 1;
    assert.equal(encode(o, alt), -1);
    assert.equal(modelEncode(o, alt), -1);
  });

  it('hand-worked vectors of docs/spec/xbzrle.md §2.1', () => {
    const hex = (b: Uint8Array | -1) => (b === -1 ? 'overflow' : Buffer.from(b).toString('hex'));
    const z = new Uint8Array(P);
    const a = new Uint8Array(P);
    a[4095] = 1;
    assert.equal(hex(encode(z, a)), 'ff1f0101');
    const b = new Uint8Array(P);
    b[0] = b[1] = 9;
    assert.equal(hex(encode(z, b)), '00020909');
    const c = new Uint8Array(P);
    c.set([0x61, 0x62, 0x63], 200);
    c[1000] = 5;
    assert.equal(hex(encode(z, c)), 'c80103616263' + '9d060105');
    // the lengths of §2: 200 -> c8 01, 510 -> fe 03, 4095 -> ff 1f
    const d = new Uint8Array(P);
    for (let i = 0; i < P; i += 512) d.set([0x63, 0x24], i);
    const e = encode(z, d) as Uint8Array;
    assert.equal(e.length, 39);
    assert.equal(hex(e.subarray(0, 12)), '00026324fe03026324fe0302');
  });
});

describe('XBZRLE page cache (docs/spec/xbzrle.md §4)', () => {
  const page = (v: number) => new Uint8Array(P).fill(v);

  it('size rounds down to a power of two; slots = size / page', () => {
    assert.equal(pow2floor(5 << 20), 4 << 20);
    assert.equal(pow2floor(4097), 4096);
    const c = new XbzrleCache((5 << 20) + 123);
    assert.equal(c.size, 4 << 20);
    assert.equal(c.numSlots, 1024);
    assert.equal(new XbzrleCache(3 * P).numSlots, 2);
    assert.throws(() => new XbzrleCache(P - 1));
  });

  it('miss, insert, hit; the copy is kept; slot = page & (slots - 1)', () => {
    const c = new XbzrleCache(4 * P);
    assert.equal(c.lookup(5, 1), false);
    assert.ok(c.insert(5, page(5), 0, 1) >= 0);
    assert.equal(c.lookup(5, 1), true);
    assert.deepEqual(c.get(5), page(5));
    assert.equal(c.offsetOf(5), 1 * P); // 5 & 3
    assert.equal(c.slotOf(13), 1);
    assert.equal(c.lookup(13, 1), false); // same slot, other page
    assert.equal(c.items, 1);
  });

  it('replacement: a fresh page (age + 2 > sync count) is kept, an old one replaced', () => {
    const c = new XbzrleCache(4 * P);
    c.insert(1, page(1), 0, 10);
    assert.equal(c.insert(5, page(5), 0, 10), -1); // same slot, page 1 is fresh
    assert.equal(c.insert(5, page(5), 0, 10 + CACHED_PAGE_LIFETIME - 1), -1);
    assert.equal(c.has(1), true);
    // a hit refreshes the age
    assert.equal(c.lookup(1, 11), true);
    assert.equal(c.insert(5, page(5), 0, 12), -1);
    assert.ok(c.insert(5, page(5), 0, 13) >= 0); // 11 + 2 <= 13: replaced
    assert.equal(c.has(1), false);
    assert.equal(c.has(5), true);
    assert.deepEqual(c.get(5), page(5));
    // the same page is always overwritten
    assert.ok(c.insert(5, page(6), 0, 13) >= 0);
    assert.deepEqual(c.get(5), page(6));
    // zero insert follows the same rules
    assert.equal(c.insertZero(9, 13), -1); // slot 1 holds page 5, fresh
    assert.ok(c.insertZero(5, 13) >= 0);
    assert.deepEqual(c.get(5), new Uint8Array(P));
  });

  it('resize: another size empties the cache, the same size keeps it', () => {
    const c = new XbzrleCache(8 * P);
    c.insert(3, page(3), 0, 1);
    assert.equal(c.resize(8 * P + 100), 8 * P);
    assert.equal(c.has(3), true);
    assert.equal(c.resize(16 * P), 16 * P);
    assert.equal(c.numSlots, 16);
    assert.equal(c.has(3), false);
    assert.equal(c.items, 0);
    assert.ok(c.insert(3, page(3), 0, 1) >= 0);
    assert.equal(c.resize(2 * P), 2 * P);
    assert.equal(c.has(3), false);
  });

  it('model check: random operations against a Map-based model', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 4 }),
        fc.array(fc.record({ op: fc.constantFrom('lookup', 'insert', 'sync'), page: fc.integer({ min: 0, max: 63 }) }), { maxLength: 200 }),
        (log2slots, ops) => {
          const slots = 1 << log2slots;
          const c = new XbzrleCache(slots * P);
          const model = new Map<number, { page: number; age: number; v: number }>();
          let age = 0;
          let v = 0;
          for (const o of ops) {
            const s = o.page & (slots - 1);
            const m = model.get(s);
            if (o.op === 'sync') age++;
            else if (o.op === 'lookup') {
              const hit = m !== undefined && m.page === o.page;
              if (hit) m.age = age;
              assert.equal(c.lookup(o.page, age), hit);
              if (hit) assert.equal(c.get(o.page)[0], m.v);
            } else {
              v = (v + 1) & 0xff;
              const refused = m !== undefined && m.page !== o.page && m.age + 2 > age;
              assert.equal(c.insert(o.page, page(v), 0, age) === -1, refused);
              if (!refused) model.set(s, { page: o.page, age, v });
            }
          }
        },
      ),
      { numRuns: 200 },
    );
  });
});

/** Drive RamSender with the XBZRLE hook through several passes into a RamLoader. */
describe('XbzrleEncoder with RamSender and RamLoader', () => {
  /** The RAM records of one section payload: kind and byte size of each. */
  function records(buf: Buffer): { kind: string; size: number }[] {
    const out: { kind: string; size: number }[] = [];
    let i = 0;
    for (;;) {
      const flags = buf.readUInt32BE(i + 4) & 0xfff;
      let j = i + 8;
      if (flags === 0x10) return out;
      if (!(flags & 0x20)) j += 1 + buf[j]!;
      const kind = flags & ~0x20;
      if (kind === 0x02) j += 1;
      else if (kind === 0x08) j += P;
      else if (kind === 0x40) j += 3 + buf.readUInt16BE(j + 1);
      else throw new Error(`flags ${flags}`);
      out.push({ kind: kind === 0x02 ? 'zero' : kind === 0x08 ? 'page' : 'xbzrle', size: j - i });
      i = j;
    }
  }

  async function pass(sender: RamSender, loader: RamLoader): Promise<Buffer> {
    const out = new Collector();
    const w = new StreamWriter(out);
    sender.sendPages(w, { maxMillis: 1e9 });
    sender.sendEos(w);
    await w.flush();
    await w.drain();
    const bytes = out.data;
    await loader.loadSection(StreamReader.fromBuffer(bytes), 4);
    return bytes;
  }

  it('bulk stage plain, then misses, then deltas; zero pages; unchanged pages send nothing; RAM equal', async () => {
    const pages = 64;
    const src = [makeBlock('pc.ram', pages * P), makeBlock('other', 8 * P)];
    const dst = [makeBlock('pc.ram', pages * P), makeBlock('other', 8 * P)];
    for (const b of src) for (let i = 0; i < b.size; i++) b.bytes[i] = (i * 7 + 3) & 0xff;
    const sender = new RamSender(src);
    const xb = new XbzrleEncoder(sender, 1 << 20, 0);
    sender.setPageHook(xb.hook);
    const loader = new RamLoader(dst);
    sender.syncDirtyLog();
    await pass(sender, loader);
    assert.equal(xb.counters.cacheMiss, 0, 'nothing cached in the bulk stage');
    assert.equal(xb.cache.items, 0);
    // pass 2: every page dirty once (misses -> full pages, cached)
    const touch = (b: number, p: number, at: number, v: number) => {
      src[b]!.bytes[p * P + at] = v;
      markDirty(src[b]!, p);
    };
    for (let p = 0; p < pages; p++) touch(0, p, 10, 0xaa);
    touch(1, 2, 100, 1);
    sender.syncDirtyLog();
    await pass(sender, loader);
    assert.equal(sender.bulkStage, false);
    assert.equal(xb.counters.cacheMiss, pages + 1);
    assert.equal(xb.counters.pages, 0);
    // pass 3: small writes -> XBZRLE; one page unchanged; one page fully rewritten (overflow); one zero page
    for (let p = 0; p < 32; p++) touch(0, p, 20, 0xbb);
    markDirty(src[0]!, 40); // dirty but unchanged
    for (let i = 0; i < P; i++) src[0]!.bytes[41 * P + i] ^= 0xff; // every byte differs from the cached copy
    markDirty(src[0]!, 41);
    src[0]!.bytes.fill(0, 42 * P, 43 * P);
    markDirty(src[0]!, 42);
    touch(1, 2, 200, 2);
    const normalBefore = sender.counters.normal;
    sender.syncDirtyLog();
    const bytes = await pass(sender, loader);
    assert.equal(xb.counters.pages, 33);
    assert.equal(xb.counters.unchanged, 1);
    assert.equal(xb.counters.overflow, 1);
    assert.equal(sender.counters.normal - normalBefore, 1);
    const recs = records(bytes);
    const xrecs = recs.filter((r) => r.kind === 'xbzrle');
    assert.equal(xrecs.length, 33);
    assert.equal(xb.counters.bytes, xrecs.reduce((a, r) => a + r.size, 0));
    assert.ok(xb.counters.bytes < 33 * 40, `deltas are small: ${xb.counters.bytes}`);
    assert.equal(recs.filter((r) => r.kind === 'zero').length, 1);
    assert.equal(recs.filter((r) => r.kind === 'page').length, 1);
    // pass 4: a small write on the page that became zero is a delta against zeros
    touch(0, 42, 5, 9);
    sender.syncDirtyLog();
    await pass(sender, loader);
    assert.equal(xb.counters.pages, 34);
    for (let b = 0; b < src.length; b++) assert.deepEqual(dst[b]!.bytes, src[b]!.bytes, `block ${b}`);
    // final stage: the cache is only read
    xb.setLastStage();
    touch(0, 7, 30, 0xcc);
    const copy = xb.cache.get(7).slice();
    sender.syncDirtyLog();
    await pass(sender, loader);
    assert.deepEqual(xb.cache.get(7), copy);
    for (let b = 0; b < src.length; b++) assert.deepEqual(dst[b]!.bytes, src[b]!.bytes, `block ${b}`);
    const st = xb.stats();
    assert.equal(st['cache-size'], 1 << 20);
    assert.equal(st.pages, 35);
  });

  it('cache-miss-rate: misses over pages saved, recomputed at a sync ≥ 1 s later', async () => {
    const src = [makeBlock('m', 16 * P)];
    const dst = [makeBlock('m', 16 * P)];
    src[0]!.bytes.fill(1);
    const sender = new RamSender(src);
    const xb = new XbzrleEncoder(sender, 1 << 20, 0);
    sender.setPageHook(xb.hook);
    const loader = new RamLoader(dst);
    sender.syncDirtyLog();
    await pass(sender, loader); // 16 pages saved, bulk
    for (let p = 0; p < 8; p++) {
      src[0]!.bytes[p * P] = 2;
      markDirty(src[0]!, p);
    }
    sender.syncDirtyLog();
    xb.onSync(500); // < 1 s: not recomputed
    await pass(sender, loader); // 8 misses
    assert.equal(xb.counters.cacheMissRate, 0);
    xb.onSync(1000);
    assert.equal(xb.counters.cacheMissRate, 8 / 24);
    xb.onSync(1500);
    assert.equal(xb.counters.cacheMissRate, 8 / 24); // kept
    // a small cache: 2 slots, pages 0..7 compete
    xb.resize(2 * P);
    assert.equal(xb.cache.numSlots, 2);
    assert.deepEqual(dst[0]!.bytes, src[0]!.bytes);
  });
});
