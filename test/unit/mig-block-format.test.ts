/**
 * QEMU's `block` section (docs/spec/stream-format.md §13) against the stream
 * QEMU 7.2 wrote (test/golden/streams/block-none-3M.bin.gz): Ferry's loader
 * applies it, Ferry's encoder writes the same records byte for byte, and the
 * loader rejects what QEMU's rejects, with QEMU's texts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { gunzipSync } from 'node:zlib';
import { BlockLoader } from '../../src/migration/block/loader.js';
import { BlockSender } from '../../src/migration/block/sender.js';
import { BLOCK, putBlockEos, putChunkHeader } from '../../src/migration/block/format.js';
import { inspectStream, type BlockRecord, type InspectedSection } from '../../src/migration/inspect.js';
import { StreamReader } from '../../src/migration/stream/reader.js';
import { BufferSink, StreamWriter } from '../../src/migration/stream/writer.js';
import { MigrationFailure } from '../../src/migration/errors.js';
import { MemDrive } from '../helpers/mem-drive.js';
import { VECTORS_DIR } from '../helpers/qemu.js';

const MiB = 1 << 20;
const VECTOR = gunzipSync(readFileSync(join(VECTORS_DIR, 'block-none-3M.bin.gz')));

/** The 3 MiB image QEMU migrated (see the vectors' README). */
function qemuImage(): Buffer {
  const b = Buffer.alloc(3 * MiB);
  for (let i = 0; i < 65536; i++) b[i] = (i * 7) & 255;
  b.write('hello block migration'.repeat(100), 2 * MiB + 4096, 'latin1');
  return b;
}

function blockSections(records: Awaited<ReturnType<typeof inspectStream>>['records']): InspectedSection[] {
  return records.filter((r): r is InspectedSection => r.type === 'section' && r.idstr === 'block');
}

const brief = (recs: BlockRecord[]) =>
  recs.map((x) => (x.kind === 'chunk' ? `${x.zero ? 'zero' : 'chunk'} ${x.device} ${x.offset}` : x.kind === 'progress' ? `progress ${x.percent}` : 'eos'));

test('QEMU 7.2\'s block section: the records, and the loader puts the image on a drive', async () => {
  const { records } = await inspectStream(VECTOR, { keepRecords: false });
  const secs = blockSections(records);
  assert.deepEqual(secs.map((s) => [s.kind, s.sectionId, s.versionId]), [['start', 1, 1], ['part', 1, 1], ['part', 1, 1], ['end', 1, 1]]);
  assert.deepEqual(secs.map((s) => brief(s.block!)), [
    ['eos'],
    ['progress 0', 'progress 33', 'progress 66', 'eos'],
    ['chunk d0 0', `zero d0 ${MiB}`, `chunk d0 ${2 * MiB}`, 'eos'],
    ['progress 100', 'eos'],
  ]);

  for (const format of ['raw', 'qcow2'] as const) {
    const d = new MemDrive('d0', 3 * MiB, { format });
    d.bytes.fill(0xaa); // whatever was there before is overwritten, zeros included
    const loader = new BlockLoader([d]);
    await inspectStream(VECTOR, { keepRecords: false, liveLoaders: { block: { load: (r, k) => loader.loadSection(r, k === 'end') } } });
    assert.ok(d.bytes.equals(qemuImage()), `${format}: the drive holds QEMU's image`);
    assert.equal(loader.progress, 100);
    const ops = d.log.filter((x) => x.op !== 'read').map((x) => (x.op === 'flush' ? 'flush' : `${x.op} ${x.offset / 65536} ${x.length / 65536}`));
    if (format === 'raw') {
      // 1 MiB pieces, written from the received buffers: data as data, the ZERO_BLOCK chunk as zeroes
      assert.deepEqual(ops, ['writev 0 16', 'zero 16 16', 'writev 32 16']);
    } else {
      // cluster pieces (64 KiB): all-zero clusters become zeroes, as QEMU's block_load does
      assert.deepEqual(ops, ['write 0 1', 'zero 1 15', 'zero 16 16', 'write 32 1', 'zero 33 15']);
    }
  }
});

/** The stream bytes of each record of block section payloads (to compare encodings), up to `sections` EOS records. */
function recordSpans(payload: Buffer, sections = 1): Buffer[] {
  const out: Buffer[] = [];
  let p = 0;
  for (;;) {
    const flags = payload.readUInt32BE(p + 4) & BLOCK.FLAGS_MASK;
    let end = p + 8;
    if (flags & BLOCK.FLAG.DEVICE_BLOCK) end += 1 + payload[end]! + (flags & BLOCK.FLAG.ZERO_BLOCK ? 0 : MiB);
    out.push(payload.subarray(p, end));
    p = end;
    if (flags & BLOCK.FLAG.EOS && --sections === 0) return out;
  }
}

/** Records compared by content, without printing megabytes when they differ. */
const digestOf = (b: Buffer) => `${b.length}:${createHash('sha256').update(b).digest('hex').slice(0, 16)}`;

async function collect(run: (w: StreamWriter) => Promise<void>): Promise<Buffer> {
  const out = new PassThrough();
  const parts: Buffer[] = [];
  out.on('data', (b: Buffer) => parts.push(b));
  const w = new StreamWriter(out, { reuseBuffers: false });
  await run(w);
  await w.drain();
  return Buffer.concat(parts);
}

test('the encoder writes QEMU 7.2\'s records byte for byte (zero-blocks on)', async () => {
  const d = new MemDrive('d0', 3 * MiB);
  qemuImage().copy(d.bytes);
  const sender = new BlockSender([d], { incremental: false, zeroBlocks: true });
  sender.start();
  const bytes = await collect(async (w) => {
    putBlockEos(w); // START
    await sender.send(w, { maxMillis: 1e9 }, () => 0);
    putBlockEos(w);
    await sender.sendAll(w); // END
    putBlockEos(w);
  });
  sender.stop();
  const ours = recordSpans(bytes, 3);
  // START's EOS; one PART: the progress records as the reads were issued, the chunks, EOS; END
  const names = ours.map((b) => b.readUInt32BE(4) & BLOCK.FLAGS_MASK);
  assert.deepEqual(names, [2, 4, 4, 4, 1, 9, 1, 2, 4, 2]);
  // QEMU's records, section by section (a START header has the idstr and two be32 more)
  const { records } = await inspectStream(VECTOR, { keepRecords: false });
  const theirs = blockSections(records).flatMap((sec) => recordSpans(VECTOR.subarray(sec.at + (sec.kind === 'start' ? 5 + 1 + 5 + 8 : 5))));
  // the same records byte for byte (QEMU has one EOS more: its chunks came in a second PART)
  const notEos = (b: Buffer) => (b.readUInt32BE(4) & BLOCK.FLAGS_MASK) !== BLOCK.FLAG.EOS;
  assert.deepEqual(ours.filter(notEos).map(digestOf).sort(), theirs.filter(notEos).map(digestOf).sort());
  assert.equal(theirs.length - ours.length, 1);
  // START is EOS alone; END is PROGRESS 100 and EOS, as QEMU's
  assert.equal(bytes.subarray(0, 8).toString('hex'), '0000000000000002');
  assert.equal(bytes.subarray(-24).toString('hex'), '0000000000000002' + '000000000000c804' + '0000000000000002');
  // the zero chunk record: sector 2048, DEVICE_BLOCK | ZERO_BLOCK, "d0"
  assert.ok(ours.some((r) => r.toString('hex') === '0000000000100009' + '02' + Buffer.from('d0').toString('hex')));
});

test('without zero-blocks every chunk goes with its data; a short last chunk is padded with zeros to 1 MiB', async () => {
  const d = new MemDrive('virtio0', 2 * MiB + 4096);
  d.bytes.fill(7);
  const sender = new BlockSender([d], { incremental: false, zeroBlocks: false });
  sender.start();
  const bytes = await collect(async (w) => {
    await sender.sendAll(w);
    putBlockEos(w);
  });
  const recs = recordSpans(bytes);
  const chunks = recs.filter((r) => (r.readUInt32BE(4) & 1) === 1);
  assert.equal(chunks.length, 3);
  const last = chunks[2]!;
  const data = last.subarray(8 + 1 + 'virtio0'.length);
  assert.equal(data.length, MiB);
  assert.ok(data.subarray(0, 4096).every((x) => x === 7));
  assert.ok(data.subarray(4096).every((x) => x === 0));
  assert.equal(sender.counters.zeroChunks, 0);
});

/** A block payload from records, for the loader's failure cases. */
function payload(build: (s: BufferSink) => void): StreamReader {
  const s = new BufferSink();
  build(s);
  return StreamReader.fromBuffer(s.toBuffer());
}

async function loadFails(drives: MemDrive[], build: (s: BufferSink) => void, text: string | RegExp, kind = 'stream'): Promise<void> {
  const loader = new BlockLoader(drives);
  await assert.rejects(loader.loadSection(payload(build), true), (e: unknown) => {
    assert.ok(e instanceof MigrationFailure, String(e));
    if (typeof text === 'string') assert.equal(e.message, text);
    else assert.match(e.message, text);
    assert.equal(e.kind, kind);
    return true;
  });
}

test('the loader refuses what QEMU refuses, with its texts, and writes nothing it should not', async () => {
  const d = () => new MemDrive('d0', 2 * MiB);
  const data = Buffer.alloc(MiB, 1);
  // a name this machine has no drive for
  await loadFails([d()], (s) => {
    putChunkHeader(s, 0, 'ide0-hd0', false);
    s.putBytes(data);
  }, 'Error unknown block device ide0-hd0');
  // flags QEMU does not know: 0x10 alone, and ZERO_BLOCK without DEVICE_BLOCK
  await loadFails([d()], (s) => s.put64(0x10), 'Unknown block migration flags: 0x10');
  await loadFails([d()], (s) => s.put64(0x08), 'Unknown block migration flags: 0x8');
  // a chunk that starts past the destination's end: a smaller image
  const small = d();
  await loadFails([small], (s) => {
    putChunkHeader(s, 2 * MiB, 'd0', true);
    putBlockEos(s);
  }, "Block device 'd0': Source and target image have different sizes (a chunk at byte 2097152 lies beyond the target's 2097152 bytes)");
  assert.equal(small.log.length, 0);
  // a read-only drive
  await loadFails([new MemDrive('d0', 2 * MiB, { readOnly: true })], (s) => {
    putChunkHeader(s, 0, 'd0', true);
    putBlockEos(s);
  }, "Block device 'd0' is read-only: it cannot receive block migration data");
  // the stream ends inside the data
  await loadFails([d()], (s) => {
    putChunkHeader(s, 0, 'd0', false);
    s.putBytes(data.subarray(0, 1000));
  }, 'Unexpected end of migration stream');
  // the disk is full: the write's error fails the load, kind io
  const full = d();
  full.failWrites = Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
  await loadFails([full], (s) => {
    putChunkHeader(s, MiB, 'd0', false);
    s.putBytes(data);
    putBlockEos(s);
  }, "Block device 'd0': write at byte 1048576 failed: No space left on device", 'io');
});

test('END, and loadComplete() at the end of the stream, return only once every write has landed', async () => {
  const chunk = (s: BufferSink, i: number) => {
    putChunkHeader(s, i * MiB, 'd0', false);
    s.putBytes(Buffer.alloc(MiB, i + 1));
  };
  for (const viaEnd of [true, false]) {
    const dr = new MemDrive('d0', 4 * MiB);
    dr.writeDelayMs = 30;
    const loader = new BlockLoader([dr]);
    await loader.loadSection(payload((s) => {
      for (let i = 0; i < 4; i++) chunk(s, i);
      putBlockEos(s);
    }), viaEnd);
    if (!viaEnd) await loader.loadComplete();
    for (let i = 0; i < 4; i++) assert.ok(dr.bytes.subarray(i * MiB, (i + 1) * MiB).every((x) => x === i + 1), `chunk ${i} on the drive`);
  }
});

test('the loader writes a chunk only up to the drive\'s end, and a later copy of a chunk lands last', async () => {
  const dr = new MemDrive('d0', MiB + 512);
  const loader = new BlockLoader([dr]);
  await loader.loadSection(payload((s) => {
    putChunkHeader(s, MiB, 'd0', false);
    s.putBytes(Buffer.alloc(MiB, 5));
    putChunkHeader(s, 0, 'd0', false);
    s.putBytes(Buffer.alloc(MiB, 1));
    putChunkHeader(s, 0, 'd0', false);
    s.putBytes(Buffer.alloc(MiB, 2));
    putBlockEos(s);
  }), true);
  assert.ok(dr.bytes.subarray(0, MiB).every((x) => x === 2));
  assert.ok(dr.bytes.subarray(MiB).every((x) => x === 5));
  assert.deepEqual(dr.log.filter((x) => x.op === 'writev').map((x) => (x.op === 'writev' ? [x.offset, x.length] : [])), [[MiB, 512], [0, MiB], [0, MiB]]);
});
