/**
 * The `compress` capability's byte layer: the compress/decompress worker
 * pools, the compressed send path of RamSender and the batched decompress
 * path of RamLoader (docs/spec/xbzrle.md §6, docs/spec/stream-format.md §9).
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { deflateSync, gunzipSync } from 'node:zlib';
import { fillRandom as fillRandomChunk, fillText, makeTextPool } from '../../src/machine/workload.js';
import { COMPRESS_BOUND, CompressPool, DecompressPool, PAGE_SIZE, maxWorkers } from '../../src/migration/codec/compress-pool.js';
import { PageDeflater, PageInflater } from '../../src/migration/codec/zlib-page.js';
import { RamLoader } from '../../src/migration/ram/loader.js';
import { RamSender, putRamRecordHeader } from '../../src/migration/ram/sender.js';
import { StreamReader } from '../../src/migration/stream/reader.js';
import { BufferSink, StreamWriter } from '../../src/migration/stream/writer.js';
import { WIRE } from '../../src/migration/wire/constants.js';
import type { InspectedSection as ParsedSection, RamRecord } from '../../src/migration/inspect.js';
import {
  putConfiguration,
  putEof,
  putFooter,
  putHeader,
  putSectionPartEnd,
  putSectionStartFull,
  putVmdesc,
} from '../../src/migration/wire/records.js';
import { Collector, fixedDevice, loadStream, makeBlock, markDirty, parseStream, rng, vectorsDir } from './mig-helpers.js';

const S = WIRE.SECTION;
const F = WIRE.RAM;
const RAM_ID = 2;
const MiB = 1024 * 1024;
const textPool = makeTextPool(5);

const pools: { close(): Promise<void> }[] = [];
function track<T extends { close(): Promise<void> }>(p: T): T {
  pools.push(p);
  return p;
}
after(async () => {
  await Promise.all(pools.map((p) => p.close()));
});

/** n pages: text, random, zero and one-byte patterns mixed. */
function samplePages(n: number, seed: number, kinds: readonly ('text' | 'random' | 'pattern')[] = ['text', 'random', 'pattern']): Buffer[] {
  const next = rng(seed);
  const out: Buffer[] = [];
  for (let i = 0; i < n; i++) {
    const b = Buffer.alloc(PAGE_SIZE);
    const k = kinds[i % kinds.length]!;
    if (k === 'text') fillText(b, 0, PAGE_SIZE, textPool, seed, i);
    else if (k === 'random') fillRandomChunk(b, 0, PAGE_SIZE, seed, i);
    else b.fill(next() & 0xff, 0, next() % PAGE_SIZE);
    out.push(b);
  }
  return out;
}

describe('one-page zlib codec', () => {
  it('produces exactly what zlib.deflateSync produces (QEMU compress2 format: 78 01 at level 1)', () => {
    for (const level of [0, 1, 6, 9]) {
      const d = new PageDeflater(level);
      const out = Buffer.alloc(COMPRESS_BOUND);
      for (const page of samplePages(12, level + 1)) {
        const n = d.deflate(page, 0, out, 0);
        assert.deepEqual(out.subarray(0, n), deflateSync(page, { level }));
        if (level <= 1) assert.deepEqual([...out.subarray(0, 2)], [0x78, 0x01]);
        assert.ok(n <= COMPRESS_BOUND);
      }
    }
  });

  it('inflates strictly: corrupt, truncated, over-long, short and trailing-garbage streams fail', () => {
    const inf = new PageInflater();
    const page = samplePages(1, 3, ['text'])[0]!;
    const z = deflateSync(page, { level: 1 });
    const out = Buffer.alloc(PAGE_SIZE + 1);
    assert.equal(inf.inflate(z, 0, z.length, out, 0), true);
    assert.deepEqual(out.subarray(0, PAGE_SIZE), page);
    const bad = Buffer.from(z);
    bad[z.length >> 1]! ^= 0x5a;
    const trailer = Buffer.from(z);
    trailer[z.length - 1]! ^= 1; // Adler-32
    const cases: [string, Buffer][] = [
      ['corrupt', bad],
      ['bad checksum', trailer],
      ['truncated', z.subarray(0, z.length - 5)],
      ['empty', Buffer.alloc(0)],
      ['short page', deflateSync(Buffer.alloc(100, 1))],
      ['long page', deflateSync(Buffer.alloc(PAGE_SIZE + 1, 1))],
      ['not zlib', Buffer.from('hello world, not a zlib stream')],
    ];
    for (const [what, data] of cases) {
      assert.equal(inf.inflate(data, 0, data.length, out, 0), false, what);
    }
    // the codec stays usable after errors
    assert.equal(inf.inflate(z, 0, z.length, out, 0), true);
    assert.deepEqual(out.subarray(0, PAGE_SIZE), page);
  });
});

describe('CompressPool / DecompressPool', () => {
  for (const threads of [1, 2, 3]) {
    for (const level of [0, 1, 9]) {
      it(`round trip: ${threads} thread(s), level ${level}, text and random pages`, async () => {
        const cp = track(new CompressPool({ threads, pagesPerWorker: 64 }));
        const dp = track(new DecompressPool({ threads, pagesPerWorker: 64 }));
        // a full batch, then a short one (slots are reused)
        for (const n of [cp.capacity, 37]) {
          const pages = samplePages(n, threads * 10 + level + n);
          pages.forEach((p, i) => cp.putPage(i, p, 0));
          await cp.compress(n, level);
          for (let i = 0; i < n; i++) {
            const z = cp.result(i);
            assert.deepEqual(Buffer.from(z), deflateSync(pages[i]!, { level }), `page ${i}`);
            dp.putCompressed(i, z, 0, z.length);
          }
          await dp.decompress(n);
          for (let i = 0; i < n; i++) {
            assert.ok(dp.ok(i), `page ${i}`);
            assert.ok(Buffer.from(dp.page(i)).equals(pages[i]!), `page ${i}`);
          }
        }
        assert.ok(cp.spawned <= threads && dp.spawned <= threads);
      });
    }
  }

  it('text compresses well, random does not (level 1)', async () => {
    const cp = track(new CompressPool({ threads: 2, pagesPerWorker: 32 }));
    for (const [kind, lo, hi] of [['text', 0, 0.6], ['random', 1, 1.01]] as const) {
      const pages = samplePages(64, 9, [kind]);
      pages.forEach((p, i) => cp.putPage(i, p, 0));
      await cp.compress(64, 1);
      let total = 0;
      for (let i = 0; i < 64; i++) total += cp.outLen[i]!;
      const ratio = total / (64 * PAGE_SIZE);
      assert.ok(ratio >= lo && ratio <= hi, `${kind}: ratio ${ratio}`);
    }
  });

  it('corrupt slots are reported per page; the others still inflate', async () => {
    const dp = track(new DecompressPool({ threads: 2, pagesPerWorker: 16 }));
    const pages = samplePages(20, 77);
    for (let i = 0; i < 20; i++) {
      const z = deflateSync(pages[i]!, { level: 1 });
      if (i % 7 === 3) z[z.length - 2]! ^= 0xff;
      dp.putCompressed(i, z, 0, z.length);
    }
    await dp.decompress(20);
    for (let i = 0; i < 20; i++) {
      if (i % 7 === 3) assert.equal(dp.ok(i), false, `slot ${i}`);
      else assert.ok(dp.ok(i) && Buffer.from(dp.page(i)).equals(pages[i]!), `slot ${i}`);
    }
  });

  it('255 threads: a bounded number of workers and a bounded batch', async () => {
    const cp = track(new CompressPool({ threads: 255 }));
    assert.equal(cp.threads, 255);
    assert.equal(cp.workers, Math.min(255, maxWorkers()));
    assert.ok(cp.capacity <= 4096 && cp.capacity >= cp.workers * 16, String(cp.capacity));
    const pages = samplePages(cp.capacity, 255, ['text']);
    pages.forEach((p, i) => cp.putPage(i, p, 0));
    await cp.compress(cp.capacity, 1);
    for (const i of [0, cp.capacity >> 1, cp.capacity - 1]) assert.deepEqual(Buffer.from(cp.result(i)), deflateSync(pages[i]!, { level: 1 }));
    assert.ok(cp.spawned <= cp.workers);
  });

  it('refuses bad arguments and runs after close', async () => {
    assert.throws(() => new CompressPool({ threads: 0 }), RangeError);
    assert.throws(() => new DecompressPool({ threads: 256 }), RangeError);
    const cp = new CompressPool({ threads: 1, pagesPerWorker: 4 });
    await assert.rejects(cp.compress(5, 1), RangeError);
    await assert.rejects(cp.compress(1, 10), RangeError);
    await cp.compress(0, 1);
    await cp.close();
    await assert.rejects(cp.compress(1, 1), /closed/);
  });
});

/** A whole migration stream from `sender`, compressed, in sections of at most one batch. */
async function migrateCompressed(
  sender: RamSender,
  pool: CompressPool,
  level: number,
  between?: (round: number) => void,
): Promise<Buffer> {
  const out = new Collector();
  const w = new StreamWriter(out);
  putHeader(w);
  putConfiguration(w, 'none');
  putSectionStartFull(w, S.START, RAM_ID, 'ram', 0, 4);
  sender.syncDirtyLog();
  sender.sendSetup(w);
  putFooter(w, RAM_ID);
  let round = 0;
  for (;;) {
    putSectionPartEnd(w, S.PART, RAM_ID);
    const res = await sender.sendPagesCompressed(w, pool, level, { maxMillis: 1000 });
    sender.sendEos(w);
    putFooter(w, RAM_ID);
    await w.flush();
    if (res.done) {
      between?.(round++);
      if (sender.syncDirtyLog() === 0 && sender.dirtyPages === 0) break;
    }
  }
  putSectionPartEnd(w, S.END, RAM_ID);
  sender.syncDirtyLog();
  while (!(await sender.sendPagesCompressed(w, pool, level, {})).done) await w.flush();
  sender.sendEos(w);
  putFooter(w, RAM_ID);
  putEof(w);
  putVmdesc(w, '{}');
  await w.drain();
  return out.data;
}

function ramRecords(recs: Awaited<ReturnType<typeof parseStream>>): RamRecord[] {
  return recs
    .filter((r): r is ParsedSection => r.type === 'section' && r.idstr === 'ram')
    .flatMap((s) => s.ram ?? []);
}

describe('compressed send path and batched load path', () => {
  function guest(): ReturnType<typeof makeBlock>[] {
    const a = makeBlock('pc.ram', 2 * MiB);
    const b = makeBlock('pc.rom', 256 * 1024);
    const c = makeBlock('m', 1 * MiB);
    const pages = samplePages(a.pages, 1);
    for (let i = 0; i < a.pages; i++) if (i % 5 !== 0) a.bytes.set(pages[i]!, i * PAGE_SIZE);
    b.bytes.set(samplePages(1, 2, ['random'])[0]!, 0);
    c.bytes.fill(0x41, 5 * PAGE_SIZE, 9 * PAGE_SIZE);
    return [a, b, c];
  }

  it('ZERO for zero pages, one plain PAGE per change of block, COMPRESS_PAGE|CONTINUE otherwise; loads back exactly', async () => {
    const src = guest();
    const pool = track(new CompressPool({ threads: 2, pagesPerWorker: 48 }));
    const sender = new RamSender(src);
    const stream = await migrateCompressed(sender, pool, 1, (round) => {
      if (round === 0) {
        // dirty a few pages after the bulk stage, across blocks
        src[0]!.bytes.fill(7, 0, 100);
        markDirty(src[0]!, 0);
        src[2]!.bytes.fill(9, 200 * PAGE_SIZE, 200 * PAGE_SIZE + 10);
        markDirty(src[2]!, 200);
      }
    });
    const recs = ramRecords(await parseStream(stream));
    let last = '';
    let switches = 0;
    for (const r of recs) {
      if (r.kind !== 'zero' && r.kind !== 'page' && r.kind !== 'compress') continue;
      const cont = (r.flags & F.CONTINUE) !== 0;
      if (r.block !== last) {
        switches++;
        assert.equal(cont, false, 'a change of block names the block');
        assert.notEqual(r.kind, 'compress', 'the first page after a change of block is not compressed');
      } else {
        assert.equal(cont, true, 'same block: CONTINUE');
      }
      if (r.kind === 'page') assert.equal(cont, false, 'plain PAGE only after a change of block');
      last = r.block;
    }
    assert.ok(switches >= 4, `switches ${switches}`);
    assert.ok(recs.filter((r) => r.kind === 'compress').length > 400);
    assert.equal(sender.counters.compressed, recs.filter((r) => r.kind === 'compress').length);

    const dst = src.map((b) => makeBlock(b.name, b.size));
    const dp = track(new DecompressPool({ threads: 2, pagesPerWorker: 40 }));
    const loader = new RamLoader(dst, { compress: true, decompressPool: dp });
    await loadStream(StreamReader.fromBuffer(stream), loader, []);
    for (let i = 0; i < src.length; i++) {
      assert.ok(Buffer.from(dst[i]!.bytes.buffer).equals(Buffer.from(src[i]!.bytes.buffer)), src[i]!.name);
    }
    assert.equal(loader.counters.compressed, sender.counters.compressed);

    // deterministic: the same guest gives the same bytes, whatever the thread
    // count (same batch capacity, so the same section boundaries)
    const again = await migrateCompressed(new RamSender(guest()), track(new CompressPool({ threads: 3, pagesPerWorker: 32 })), 1);
    const first = await migrateCompressed(new RamSender(guest()), pool, 1);
    assert.ok(again.equals(first));
  });

  it('level 0 and 9 streams load back; the synchronous path (no pool) agrees', async () => {
    for (const level of [0, 9]) {
      const src = guest();
      const stream = await migrateCompressed(new RamSender(src), track(new CompressPool({ threads: 2 })), level);
      for (const pool of [track(new DecompressPool({ threads: 1, pagesPerWorker: 8 })), undefined]) {
        const dst = src.map((b) => makeBlock(b.name, b.size));
        await loadStream(StreamReader.fromBuffer(stream), new RamLoader(dst, { compress: true, decompressPool: pool }), []);
        for (let i = 0; i < src.length; i++) assert.ok(Buffer.from(dst[i]!.bytes.buffer).equals(Buffer.from(src[i]!.bytes.buffer)));
      }
    }
  });

  /** A hand-made RAM stream: header, config, START with block list, PART with `body`, EOF. */
  function handStream(block: ReturnType<typeof makeBlock>, body: (w: BufferSink) => void): Buffer {
    const w = new BufferSink();
    putHeader(w);
    putConfiguration(w, 'none');
    putSectionStartFull(w, S.START, RAM_ID, 'ram', 0, 4);
    w.put64(block.size | F.MEM_SIZE);
    w.putCountedString(block.name);
    w.put64(block.size);
    w.put64(F.EOS);
    putFooter(w, RAM_ID);
    putSectionPartEnd(w, S.PART, RAM_ID);
    body(w);
    w.put64(F.EOS);
    putFooter(w, RAM_ID);
    putEof(w);
    putVmdesc(w, '{}');
    return w.toBuffer();
  }

  function putCompressed(w: BufferSink, block: ReturnType<typeof makeBlock>, page: number, data: Uint8Array, cont: boolean): void {
    putRamRecordHeader(w, block, page * PAGE_SIZE, F.COMPRESS_PAGE, cont);
    w.put32(data.length);
    w.putBytes(data);
  }

  it('a later record for the same page wins over a pending compressed one (stream order)', async () => {
    const block = makeBlock('m', 64 * PAGE_SIZE);
    const A = Buffer.alloc(PAGE_SIZE, 0xaa);
    const B = Buffer.alloc(PAGE_SIZE, 0xbb);
    const C = Buffer.alloc(PAGE_SIZE, 0xcc);
    const stream = handStream(block, (w) => {
      putCompressed(w, block, 1, deflateSync(A), false);
      putRamRecordHeader(w, block, PAGE_SIZE, F.PAGE, true); // page 1 := B
      w.putBytes(B);
      putCompressed(w, block, 2, deflateSync(A), true);
      putRamRecordHeader(w, block, 2 * PAGE_SIZE, F.ZERO, true); // page 2 := 0
      w.put8(0);
      putCompressed(w, block, 3, deflateSync(A), true);
      putCompressed(w, block, 3, deflateSync(C), true); // same batch: later wins
      putCompressed(w, block, 4, deflateSync(C), true);
      putRamRecordHeader(w, block, 4 * PAGE_SIZE, F.ZERO, true); // fill 0x11
      w.put8(0x11);
      putCompressed(w, block, 5, deflateSync(B), true); // pending at EOS
    });
    const dst = makeBlock('m', 64 * PAGE_SIZE);
    const loader = new RamLoader([dst], { compress: true, decompressPool: track(new DecompressPool({ threads: 2, pagesPerWorker: 4 })) });
    await loadStream(StreamReader.fromBuffer(stream), loader, []);
    const page = (i: number) => Buffer.from(dst.bytes.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE));
    assert.ok(page(1).equals(B));
    assert.ok(page(2).equals(Buffer.alloc(PAGE_SIZE)));
    assert.ok(page(3).equals(C));
    assert.ok(page(4).equals(Buffer.alloc(PAGE_SIZE, 0x11)));
    assert.ok(page(5).equals(B));
    assert.equal(loader.counters.compressed, 6);
    // written pages are marked touched
    assert.equal(dst.touched[0]! & 0b111110, 0b111110);
  });

  it('corrupt compressed data fails the load with QEMU\'s text; too long a length too', async () => {
    const block = makeBlock('m', 64 * PAGE_SIZE);
    const good = deflateSync(Buffer.alloc(PAGE_SIZE, 3));
    const bad = Buffer.from(good);
    bad[4]! ^= 0xff;
    const cases: [Buffer, RegExp][] = [
      [handStream(block, (w) => {
        putCompressed(w, block, 0, good, false);
        putCompressed(w, block, 1, bad, true);
      }), /^decompress data failed$/],
      [handStream(block, (w) => putCompressed(w, block, 0, deflateSync(Buffer.alloc(100)), false)), /^decompress data failed$/],
      [handStream(block, (w) => putCompressed(w, block, 0, Buffer.alloc(COMPRESS_BOUND + 1), false)), /^Invalid compressed data length: 4111$/],
    ];
    for (const [stream, msg] of cases) {
      for (const pool of [track(new DecompressPool({ threads: 2, pagesPerWorker: 8 })), undefined]) {
        const loader = new RamLoader([makeBlock('m', 64 * PAGE_SIZE)], { compress: true, decompressPool: pool });
        await assert.rejects(loadStream(StreamReader.fromBuffer(stream), loader, []), { message: msg });
      }
    }
  });

  it('with a page hook installed, compression stops at the end of the bulk stage (XBZRLE takes over)', async () => {
    const src = guest();
    const sender = new RamSender(src);
    const hooked: number[] = [];
    let bulkSeen = 0;
    sender.setPageHook((_w, _block, _b, page, _cont, _zero, bulk) => {
      if (bulk) bulkSeen++;
      else hooked.push(page);
      return 0;
    });
    const stream = await migrateCompressed(sender, track(new CompressPool({ threads: 2 })), 1, (round) => {
      if (round === 0) {
        src[0]!.bytes.fill(7, 0, 100);
        markDirty(src[0]!, 0);
      }
    });
    assert.equal(bulkSeen, src.reduce((a, b) => a + b.pages, 0), 'the hook saw every bulk-stage page');
    assert.ok(hooked.includes(0), 'the dirty page after the bulk stage went through the hook');
    const recs = ramRecords(await parseStream(stream));
    // the page re-sent after the bulk stage is a plain PAGE, not compressed
    const p0 = recs.filter((r) => r.kind !== 'eos' && r.kind !== 'mem_size' && r.block === 'pc.ram' && r.offset === 0);
    assert.equal(p0.length, 2);
    assert.equal(p0[1]!.kind, 'page');
  });

  it('a hook that skips the first page of a block: the next page goes as a plain PAGE (CONTINUE stays valid)', async () => {
    const src = guest();
    const sender = new RamSender(src);
    sender.setPageHook((_w, block, _b, page, _cont, _zero, bulk) => (bulk && block.name === 'pc.ram' && page === 0 ? 2 : 0));
    const stream = await migrateCompressed(sender, track(new CompressPool({ threads: 2 })), 1);
    const recs = ramRecords(await parseStream(stream)).filter((r) => r.kind !== 'eos' && r.kind !== 'mem_size');
    assert.equal(recs[0]!.block, 'pc.ram');
    assert.equal(recs[0]!.kind === 'page' && recs[0]!.offset, PAGE_SIZE);
    assert.equal(recs[0]!.flags & F.CONTINUE, 0);
    assert.equal(recs[1]!.kind, 'compress');
    const dst = src.map((b) => makeBlock(b.name, b.size));
    await loadStream(StreamReader.fromBuffer(stream), new RamLoader(dst, { compress: true }), []);
    for (let i = 0; i < src.length; i++) assert.ok(Buffer.from(dst[i]!.bytes.buffer).equals(Buffer.from(src[i]!.bytes.buffer)));
  });
});

describe('ramonly-compress.bin vector through the batched decompress path', () => {
  for (const threads of [1, 2, 4]) {
    it(`loads with ${threads} decompress thread(s) and equals the expected image`, async () => {
      const file = path.join(vectorsDir, 'ramonly-compress.bin');
      const block = makeBlock('m', 16 * MiB);
      const pool = track(new DecompressPool({ threads, pagesPerWorker: 32 }));
      const loader = new RamLoader([block], { compress: true, decompressPool: pool });
      const gs = fixedDevice('globalstate', 1, new Uint8Array(104));
      await loadStream(StreamReader.fromBuffer(readFileSync(file)), loader, [gs]);
      const expect = gunzipSync(readFileSync(file + '.expect.gz'));
      assert.ok(Buffer.from(block.bytes.buffer).equals(expect), 'RAM differs from the expected image');
      assert.ok(loader.counters.compressed > 0);
      assert.ok(pool.spawned >= 1);
    });
  }
});
