import assert from 'node:assert/strict';
import { PassThrough, Readable } from 'node:stream';
import { describe, it } from 'node:test';
import { buildVmdesc, writeDeviceSections } from '../../src/migration/sections/device-sections.js';
import { RamLoader } from '../../src/migration/ram/loader.js';
import { RamSender } from '../../src/migration/ram/sender.js';
import { StreamReader } from '../../src/migration/stream/reader.js';
import { StreamWriter } from '../../src/migration/stream/writer.js';
import { WIRE } from '../../src/migration/wire/constants.js';
import { MigrationStreamError } from '../../src/migration/wire/errors.js';
import type { InspectedSection as ParsedSection } from '../../src/migration/inspect.js';
import {
  putConfiguration,
  putEof,
  putFooter,
  putHeader,
  putSectionPartEnd,
  putSectionStartFull,
  putVmdesc,
} from '../../src/migration/wire/records.js';
import { Collector, fillRandom, fixedDevice, loadStream, makeBlock, markDirty, parseStream, rng } from './mig-helpers.js';

const S = WIRE.SECTION;
const RAM_ID = 3;

function hexOf(b: Uint8Array): string {
  return Buffer.from(b).toString('hex').replace(/(..)/g, '$1 ').trim();
}

/** Source-side driver the state machine will mirror: setup, iterations, completion. */
async function migrate(
  w: StreamWriter,
  sender: RamSender,
  opts: { pagesPerSection: number; between?: (round: number) => void; devices?: ReturnType<typeof fixedDevice>[] },
): Promise<void> {
  putHeader(w);
  putConfiguration(w, 'none');
  putSectionStartFull(w, S.START, RAM_ID, 'ram', 0, 4);
  sender.syncDirtyLog(); // clears the log; the bitmap starts all ones
  sender.sendSetup(w);
  putFooter(w, RAM_ID);
  await w.flush();
  let round = 0;
  for (;;) {
    putSectionPartEnd(w, S.PART, RAM_ID);
    const res = sender.sendPages(w, { maxPages: opts.pagesPerSection });
    sender.sendEos(w);
    putFooter(w, RAM_ID);
    await w.flush();
    if (res.done) {
      opts.between?.(round++);
      if (sender.syncDirtyLog() === 0 && sender.dirtyPages === 0) break;
    }
  }
  putSectionPartEnd(w, S.END, RAM_ID);
  sender.syncDirtyLog();
  while (!sender.sendPages(w, {}).done) {
    /* flush between slices */ await w.flush();
  }
  sender.sendEos(w);
  putFooter(w, RAM_ID);
  const { entries } = writeDeviceSections(w, opts.devices ?? [], 10);
  putEof(w);
  putVmdesc(w, buildVmdesc(entries));
  await w.drain();
}

describe('RamSender', () => {
  it('encodes the documented records exactly', async () => {
    const block = makeBlock('m', 4 * 4096);
    block.bytes[2 * 4096 + 5] = 0xab;
    const out = new Collector();
    const w = new StreamWriter(out);
    const s = new RamSender([block]);
    s.sendSetup(w);
    const r = s.sendPages(w, { maxPages: 2 });
    assert.deepEqual(r, { pages: 2, done: false });
    s.sendEos(w);
    // next section: CONTINUE survives
    const r2 = s.sendPages(w);
    assert.deepEqual(r2, { pages: 2, done: true });
    s.sendEos(w);
    await w.drain();
    const b = out.data;
    assert.equal(hexOf(b.subarray(0, 8)), '00 00 00 00 00 00 40 04'); // MEM_SIZE total 0x4000
    assert.equal(hexOf(b.subarray(8, 18)), '01 6d 00 00 00 00 00 00 40 00');
    assert.equal(hexOf(b.subarray(18, 26)), '00 00 00 00 00 00 00 10');
    assert.equal(hexOf(b.subarray(26, 37)), '00 00 00 00 00 00 00 02 01 6d 00'); // ZERO @0 "m"
    assert.equal(hexOf(b.subarray(37, 46)), '00 00 00 00 00 00 10 22 00'); // ZERO|CONTINUE @0x1000
    assert.equal(hexOf(b.subarray(46, 54)), '00 00 00 00 00 00 00 10');
    assert.equal(hexOf(b.subarray(54, 62)), '00 00 00 00 00 00 20 28'); // PAGE|CONTINUE @0x2000
    assert.equal(b[62 + 5], 0xab);
    assert.equal(hexOf(b.subarray(62 + 4096, 62 + 4096 + 9)), '00 00 00 00 00 00 30 22 00');
    assert.equal(s.counters.duplicate, 3);
    assert.equal(s.counters.normal, 1);
    assert.equal(s.counters.normalBytes, 4096);
    assert.equal(s.counters.transferred, b.length);
    assert.equal(s.dirtyPages, 0);
    assert.equal(s.bulkStage, true);
  });

  it('syncDirtyLog takes and clears the log and counts new pages', () => {
    const block = makeBlock('m', 100 * 4096);
    const s = new RamSender([block]);
    assert.equal(s.dirtyPages, 100);
    markDirty(block, 3);
    assert.equal(s.syncDirtyLog(), 0); // already set in the first-pass bitmap
    assert.equal(block.dirty[0], 0);
    const w = new StreamWriter(null);
    s.sendPages(w, { maxMillis: 1e9 });
    assert.equal(s.dirtyPages, 0);
    markDirty(block, 3);
    markDirty(block, 99);
    markDirty(block, 40);
    assert.equal(s.syncDirtyLog(), 3);
    assert.equal(s.dirtyPages, 3);
    assert.equal(s.dirtySyncCount, 2);
    assert.equal(s.sendPages(w, { maxMillis: 1e9 }).pages, 3);
    assert.equal(s.bulkStage, false);
  });

  it('round trip through a PassThrough: zero and random pages, CONTINUE across sections, dirtying between rounds', async () => {
    const next = rng(42);
    const src = [makeBlock('pc.ram', 2 * 1024 * 1024), makeBlock('/rom@etc/acpi/tables', 128 * 1024), makeBlock('m', 4096 * 3)];
    for (const b of src) {
      for (let p = 0; p < b.pages; p++) if (next() % 3 === 0) fillRandom(b.bytes.subarray(p * 4096, (p + 1) * 4096), next);
    }
    const dst = src.map((b) => makeBlock(b.name, b.size));
    dst[0]!.bytes.fill(0x55); // destination garbage must be overwritten (zero pages too)
    const pipe = new PassThrough();
    const tap: Buffer[] = [];
    pipe.on('data', (c: Buffer) => tap.push(c));
    const reader = new StreamReader(pipe);
    // every page of every block must arrive at least once
    const received = dst.map((b) => new Uint8Array(b.pages));
    const loader = new RamLoader(dst, { observer: { page: (_k, _f, b, offset) => void (received[b]![offset / 4096] = 1) } });
    const gs = fixedDevice('globalstate', 1, Buffer.alloc(104, 7));
    const gsDst = fixedDevice('globalstate', 1, Buffer.alloc(104));
    const loading = loadStream(reader, loader, [gsDst]);
    const w = new StreamWriter(pipe, { bufferSize: 64 * 1024 });
    const sender = new RamSender(src);
    await migrate(w, sender, {
      pagesPerSection: 37,
      devices: [gs],
      between: (round) => {
        if (round >= 3) return;
        for (let i = 0; i < 50; i++) {
          const b = src[next() % src.length]!;
          const p = next() % b.pages;
          if (i & 1) b.bytes.fill(0, p * 4096, (p + 1) * 4096);
          else fillRandom(b.bytes.subarray(p * 4096, p * 4096 + 64), next);
          markDirty(b, p);
        }
      },
    });
    pipe.end();
    const { vmdesc } = await loading;
    for (let i = 0; i < src.length; i++) assert.ok(Buffer.from(src[i]!.bytes).equals(Buffer.from(dst[i]!.bytes)), `block ${src[i]!.name}`);
    assert.deepEqual(gsDst.loaded, Buffer.alloc(104, 7));
    assert.ok(vmdesc && JSON.parse(vmdesc).devices.length === 1);
    assert.ok(received.every((pages) => pages.every((v) => v === 1)), 'every page was received');
    assert.equal(loader.counters.pages, sender.counters.duplicate + sender.counters.normal);
    // PART sections begin with CONTINUE records
    const recs = await parseStream(Buffer.concat(tap));
    const parts = recs.filter((r): r is ParsedSection => r.type === 'section' && r.kind === 'part' && r.ram!.length > 1);
    assert.ok(parts.filter((p) => p.ram![0]!.flags & WIRE.RAM.CONTINUE).length > 10);
    assert.equal(w.bytesWritten, Buffer.concat(tap).length);
  });
});

describe('RamLoader errors', () => {
  async function load(bytes: number[] | Buffer, opts = {}): Promise<RamLoader> {
    const loader = new RamLoader([makeBlock('m', 16 * 4096)], opts);
    await loader.loadSection(StreamReader.fromBuffer(Buffer.from(bytes)), 4);
    return loader;
  }
  const memSize = (name: string, len: number) => {
    const b = Buffer.alloc(8 + 1 + name.length + 8);
    b.writeUInt32BE(len | 0x04, 4);
    b[8] = name.length;
    b.write(name, 9, 'latin1');
    b.writeUInt32BE(len, 9 + name.length + 4);
    return [...b];
  };
  const EOS = [0, 0, 0, 0, 0, 0, 0, 0x10];

  it('accepts a matching block list', async () => {
    const l = await load([...memSize('m', 0x10000), ...EOS]);
    assert.ok(l.announced.has('m'));
  });
  it('Unknown ramblock', async () => {
    await assert.rejects(load([...memSize('x', 0x10000), ...EOS]), { message: 'Unknown ramblock "x", cannot accept migration' });
  });
  it('Size mismatch', async () => {
    const b = Buffer.from([0, 0, 0, 0, 0, 0, 0x20, 0x04, 1, 0x6d, 0, 0, 0, 0, 0, 0, 0x20, 0, ...EOS]);
    await assert.rejects(load(b), { message: 'Size mismatch: m: 0x2000 != 0x10000: Invalid argument' });
  });
  it('Ack, bad migration stream! (CONTINUE without a block)', async () => {
    await assert.rejects(load([0, 0, 0, 0, 0, 0, 0, 0x22, 0, ...EOS]), { message: 'Ack, bad migration stream!' });
  });
  it('Illegal RAM offset', async () => {
    await assert.rejects(load([0, 0, 0, 0, 0, 1, 0, 0x02, 1, 0x6d, 0, ...EOS]), { message: 'Illegal RAM offset 10000' });
  });
  it("Can't find block", async () => {
    await assert.rejects(load([0, 0, 0, 0, 0, 0, 0, 0x02, 1, 0x78, 0, ...EOS]), { message: "Can't find block x" });
  });
  it('Unknown combination of migration flags', async () => {
    await assert.rejects(load([0, 0, 0, 0, 0, 0, 0, 0x01, ...EOS]), { message: 'Unknown combination of migration flags: 0x1' });
    await assert.rejects(load([0, 0, 0, 0, 0, 0, 0, 0x0a, 1, 0x6d, 0, ...EOS]), { message: 'Unknown combination of migration flags: 0xa' });
    await assert.rejects(load([0, 0, 0, 0, 0, 0, 0x02, 0x00, ...EOS]), { message: 'Unknown combination of migration flags: 0x200' });
  });
  it('postcopy mode refuses XBZRLE', async () => {
    const loader = new RamLoader([makeBlock('m', 16 * 4096)]);
    loader.postcopy = true;
    const r = StreamReader.fromBuffer(Buffer.from([0, 0, 0, 0, 0, 0, 0, 0x40, 1, 0x6d, 1, 0, 1, 0, 1, 9, ...EOS]));
    await assert.rejects(loader.loadSection(r, 4), { message: 'Unknown combination of migration flags: 0x40 (postcopy mode)' });
  });
  it('compressed pages', async () => {
    const rec = [0, 0, 0, 0, 0, 0, 0x01, 0x00, 1, 0x6d, 0, 0, 0x10, 0x0f, ...EOS];
    await assert.rejects(load(rec), { message: 'Received an unexpected compressed page' });
    await assert.rejects(load(rec, { compress: true }), { message: 'Invalid compressed data length: 4111' });
    await assert.rejects(load([0, 0, 0, 0, 0, 0, 0x01, 0x00, 1, 0x6d, 0, 0, 0, 2, 1, 2, ...EOS], { compress: true }), {
      message: 'decompress data failed',
    });
  });
  it('XBZRLE checks and in-place decode', async () => {
    await assert.rejects(load([0, 0, 0, 0, 0, 0, 0, 0x40, 1, 0x6d, 2, 0, 1, 0, ...EOS]), {
      message: 'Failed to load XBZRLE page - wrong compression!',
    });
    await assert.rejects(load([0, 0, 0, 0, 0, 0, 0, 0x40, 1, 0x6d, 1, 0x10, 0x01, ...EOS]), {
      message: 'Failed to load XBZRLE page - len overflow!',
    });
    await assert.rejects(load([0, 0, 0, 0, 0, 0, 0x10, 0x40, 1, 0x6d, 1, 0, 2, 0, 0, ...EOS]), /Failed to load XBZRLE page - decode error!.*at 1000/);
    const l = await load([0, 0, 0, 0, 0, 0, 0x10, 0x40, 1, 0x6d, 1, 0, 4, 0xff, 0x1f, 1, 1, ...EOS]);
    assert.equal(l.blocks[0]!.bytes[0x1000 + 4095], 1);
    assert.equal(l.counters.xbzrle, 1);
  });
  it('ZERO with a fill byte fills the page', async () => {
    const l = await load([0, 0, 0, 0, 0, 0, 0x30, 0x02, 1, 0x6d, 0x5a, ...EOS]);
    assert.equal(l.blocks[0]!.bytes[0x3000], 0x5a);
    assert.equal(l.blocks[0]!.bytes[0x3fff], 0x5a);
    assert.equal(l.blocks[0]!.bytes[0x4000], 0);
  });
  it('current block survives across sections', async () => {
    const loader = new RamLoader([makeBlock('m', 16 * 4096)]);
    await loader.loadSection(StreamReader.fromBuffer(Buffer.from([0, 0, 0, 0, 0, 0, 0, 0x02, 1, 0x6d, 0, ...EOS])), 4);
    await loader.loadSection(StreamReader.fromBuffer(Buffer.from([0, 0, 0, 0, 0, 0, 0x10, 0x22, 9, ...EOS])), 4);
    assert.equal(loader.blocks[0]!.bytes[0x1000], 9);
  });
  it('refuses ram version 3', async () => {
    const loader = new RamLoader([makeBlock('m', 4096)]);
    await assert.rejects(loader.loadSection(StreamReader.fromBuffer(Buffer.from(EOS)), 3), { message: "savevm: unsupported version 3 for 'ram' v4" });
  });
});

describe('truncation and corruption of a small stream', () => {
  async function smallStream(): Promise<Buffer> {
    const src = [makeBlock('m', 8 * 4096)];
    fillRandom(src[0]!.bytes.subarray(4096, 3 * 4096), rng(3));
    const out = new Collector();
    const w = new StreamWriter(out);
    await migrate(w, new RamSender(src), { pagesPerSection: 3, devices: [fixedDevice('globalstate', 1, Buffer.alloc(104, 1))] });
    return out.data;
  }

  it('every truncation point gives a clean error (buffer and Readable sources)', async () => {
    const full = await smallStream();
    const eofAt = (await parseStream(full)).find((r) => r.type === 'eof')!.at;
    for (let cut = 0; cut < full.length; cut++) {
      const part = full.subarray(0, cut);
      // a stream cut right after EOF is fine (no vmdesc); every other cut fails cleanly
      try {
        await parseStream(part);
        assert.equal(cut, eofAt + 1, `cut ${cut} parsed`);
      } catch (e) {
        assert.ok(e instanceof MigrationStreamError, `cut ${cut}: ${String(e)}`);
      }
      if (cut === eofAt + 1) continue;
      if (cut % 97 === 0 || cut < 64) {
        const loader = new RamLoader([makeBlock('m', 8 * 4096)]);
        const r = new StreamReader(Readable.from([part.subarray(0, cut >> 1), part.subarray(cut >> 1)].filter((c) => c.length)));
        const gs = fixedDevice('globalstate', 1, Buffer.alloc(104));
        await assert.rejects(loadStream(r, loader, [gs]), (e) => e instanceof MigrationStreamError);
      }
    }
  });

  it('bit flips in section headers and footers give clean errors', async () => {
    const full = await smallStream();
    for (let byte = 0; byte < full.length; byte += full.length > 4000 && byte > 80 ? 13 : 1) {
      for (let bit = 0; bit < 8; bit++) {
        const b = Buffer.from(full);
        b[byte]! ^= 1 << bit;
        try {
          await parseStream(b);
        } catch (e) {
          assert.ok(e instanceof MigrationStreamError, `byte ${byte} bit ${bit}: ${String(e)}`);
        }
        const loader = new RamLoader([makeBlock('m', 8 * 4096)]);
        const gs = fixedDevice('globalstate', 1, Buffer.alloc(104));
        try {
          await loadStream(StreamReader.fromBuffer(b), loader, [gs]);
        } catch (e) {
          assert.ok(e instanceof MigrationStreamError, `load byte ${byte} bit ${bit}: ${String(e)}`);
        }
      }
    }
  });

  it('specific header errors', async () => {
    const full = await smallStream();
    const flip = (at: number, v: number) => {
      const b = Buffer.from(full);
      b[at] = v;
      return b;
    };
    await assert.rejects(parseStream(flip(0, 0x52)), { message: 'Not a migration stream' });
    await assert.rejects(parseStream(flip(7, 2)), { message: "SaveVM v2 format is obsolete and don't work anymore" });
    await assert.rejects(parseStream(flip(7, 4)), { message: 'Unsupported migration stream version' });
    await assert.rejects(parseStream(flip(8, 1)), { message: 'Configuration section missing' });
    await assert.rejects(parseStream(flip(17, 0x09)), { message: 'Unknown savevm section type 9' });
    const loader = new RamLoader([makeBlock('m', 8 * 4096)]);
    await assert.rejects(loadStream(StreamReader.fromBuffer(full), loader, [], 'pc'), {
      message: "Machine type received is 'none' and local is 'pc'",
    });
    // prefix comparison: "none" accepted by "none-extra"
    await loadStream(StreamReader.fromBuffer(full), new RamLoader([makeBlock('m', 8 * 4096)]), [fixedDevice('globalstate', 1, Buffer.alloc(104))], 'none-extra');
    await assert.rejects(loadStream(StreamReader.fromBuffer(full), new RamLoader([makeBlock('m', 8 * 4096)]), []), {
      message: "Unknown savevm section or instance 'globalstate' 0",
    });
    // footer of the START section (id 3) at a known place: header 8 + config 9 + start hdr 17 + list 8+10+8 = 60
    assert.equal(full[60], 0x7e);
    await assert.rejects(parseStream(flip(60, 0x7d)), { message: 'Missing section footer for ram' });
    await assert.rejects(parseStream(flip(64, 4)), { message: 'Mismatched section id in footer for ram - read 0x4 expected 0x3' });
  });
});
