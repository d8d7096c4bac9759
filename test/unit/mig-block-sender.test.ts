/**
 * The source's walk over the drives (src/migration/block/sender.ts): the
 * bulk walk, chunks written behind it sent again (also while their read was
 * in flight), `inc` skipping what the top image does not hold, read-only
 * drives left out, the figures of query-migrate's `disk`, read failures.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { BLOCK } from '../../src/migration/block/format.js';
import { BlockSender } from '../../src/migration/block/sender.js';
import { MigrationFailure } from '../../src/migration/errors.js';
import { StreamWriter } from '../../src/migration/stream/writer.js';
import { MemDrive } from '../helpers/mem-drive.js';

const MiB = 1 << 20;

interface Rec {
  kind: 'chunk' | 'zero' | 'progress' | 'eos';
  device?: string;
  offset?: number;
  data?: Buffer;
  percent?: number;
}

/** Parse block payload bytes (no EOS between, as sendAll/send write them). */
function parse(b: Buffer): Rec[] {
  const out: Rec[] = [];
  let p = 0;
  while (p < b.length) {
    const word = b.readUInt32BE(p) * 2 ** 32 + b.readUInt32BE(p + 4);
    const flags = word % 512;
    p += 8;
    if (flags & BLOCK.FLAG.DEVICE_BLOCK) {
      const n = b[p]!;
      const device = b.toString('latin1', p + 1, p + 1 + n);
      p += 1 + n;
      if (flags & BLOCK.FLAG.ZERO_BLOCK) out.push({ kind: 'zero', device, offset: word - flags });
      else {
        out.push({ kind: 'chunk', device, offset: word - flags, data: b.subarray(p, p + MiB) });
        p += MiB;
      }
    } else if (flags & BLOCK.FLAG.PROGRESS) out.push({ kind: 'progress', percent: (word - flags) / 512 });
    else out.push({ kind: 'eos' });
  }
  return out;
}

class Capture {
  readonly out = new PassThrough();
  readonly parts: Buffer[] = [];
  readonly w = new StreamWriter(this.out, { reuseBuffers: false });
  constructor() {
    this.out.on('data', (b: Buffer) => this.parts.push(b));
  }
  async records(): Promise<Rec[]> {
    await this.w.drain();
    return parse(Buffer.concat(this.parts.splice(0)));
  }
}

const chunks = (recs: Rec[]) => recs.filter((r) => r.kind === 'chunk' || r.kind === 'zero').map((r) => `${r.device}@${r.offset! / MiB}`);

test('chunks written behind the bulk walk, or while their read ran, go again with the new bytes; the ones ahead go once', async () => {
  const d = new MemDrive('d0', 6 * MiB);
  d.bytes.fill(1);
  const s = new BlockSender([d], { incremental: false, zeroBlocks: false, readAhead: 2 });
  s.start();
  const c = new Capture();
  // one chunk a call; the walk reads two ahead
  assert.equal(await s.send(c.w, { maxMillis: 1e9, maxBytes: 1 }, () => 0), true);
  let recs = await c.records();
  assert.deepEqual(chunks(recs), ['d0@0']);
  assert.deepEqual(recs.filter((r) => r.kind === 'progress').map((r) => r.percent), [0, 16, 33]); // issued: chunks 0, 1, 2
  // the guest writes chunk 0 (sent), chunk 1 (read in flight) and chunk 4 (not reached)
  await d.write(0, Buffer.alloc(4096, 2));
  await d.write(MiB, Buffer.alloc(4096, 3));
  await d.write(4 * MiB, Buffer.alloc(4096, 4));
  s.sync();
  // pending: the walk's rest (3, 4, 5), the reads queued (1, 2), chunks 0 and 1 again
  assert.equal(s.pendingBytes(), 7 * (MiB + 16));
  await s.sendAll(c.w);
  recs = await c.records();
  assert.deepEqual(chunks(recs), ['d0@1', 'd0@2', 'd0@3', 'd0@4', 'd0@5', 'd0@0', 'd0@1']);
  const last = new Map(recs.filter((r) => r.kind === 'chunk').map((r) => [r.offset!, r.data!]));
  assert.ok(last.get(0)!.subarray(0, 4096).every((x) => x === 2));
  assert.ok(last.get(MiB)!.subarray(0, 4096).every((x) => x === 3));
  assert.ok(last.get(4 * MiB)!.subarray(0, 4096).every((x) => x === 4));
  assert.deepEqual(recs.at(-1), { kind: 'progress', percent: 100 });
  assert.equal(s.pendingBytes(), 0);
  assert.deepEqual(s.progress(), { transferred: 6 * MiB, remaining: 0, total: 6 * MiB });
  s.stop();
  assert.equal(d.dirty.tracking, false);
});

test('inc: the bulk walk sends only chunks the top image holds; dirty chunks still go', async () => {
  const d = new MemDrive('d0', 5 * MiB, { format: 'qcow2', backingDepth: 1, allocated: [[4096, 4096], [3 * MiB + 10, 100]] });
  d.bytes.fill(9);
  const s = new BlockSender([d], { incremental: true, zeroBlocks: false });
  s.start();
  const c = new Capture();
  await s.send(c.w, { maxMillis: 1e9, maxBytes: 1 }, () => 0);
  await c.records();
  // the first chunk went; the walk skipped to chunk 3 (2 MiB it does not send count as covered)
  assert.deepEqual(s.progress(), { transferred: 3 * MiB, remaining: 2 * MiB, total: 5 * MiB });
  await d.write(4 * MiB + 100, Buffer.alloc(10, 1)); // a guest write in an unallocated chunk
  s.sync();
  await s.sendAll(c.w);
  const recs = await c.records();
  assert.deepEqual(chunks(recs), ['d0@3', 'd0@4']);
  assert.deepEqual(s.progress(), { transferred: 5 * MiB, remaining: 0, total: 5 * MiB });
});

test('read-only drives are left out; zero-blocks sends all-zero chunks as a flag', async () => {
  const ro = new MemDrive('cd', 3 * MiB, { readOnly: true });
  const d = new MemDrive('virtio0', 3 * MiB);
  d.bytes.fill(5, MiB, 2 * MiB);
  const s = new BlockSender([ro, d], { incremental: false, zeroBlocks: true });
  assert.deepEqual(s.driveList.map((x) => x.name), ['virtio0']);
  assert.equal(s.total, 3 * MiB);
  s.start();
  assert.equal(ro.dirty.tracking, false);
  const c = new Capture();
  await s.sendAll(c.w);
  const recs = await c.records();
  assert.deepEqual(recs.filter((r) => r.kind !== 'progress').map((r) => `${r.kind} ${r.offset! / MiB}`), ['zero 0', 'chunk 1', 'zero 2']);
  assert.deepEqual(s.counters.chunks, 1);
  assert.deepEqual(s.counters.zeroChunks, 2);
  assert.equal(ro.log.length, 0);
});

test('a failed read fails the migration with the drive, the offset and the reason (kind io)', async () => {
  const d = new MemDrive('ide0-hd0', 2 * MiB);
  d.failReads = Object.assign(new Error('EIO: i/o error, read'), { code: 'EIO' });
  const s = new BlockSender([d], { incremental: false, zeroBlocks: false });
  s.start();
  const c = new Capture();
  await assert.rejects(s.send(c.w, { maxMillis: 1e9 }, () => 0), (e: unknown) => {
    assert.ok(e instanceof MigrationFailure);
    assert.equal(e.kind, 'io');
    assert.equal(e.message, "Block device 'ide0-hd0': read at byte 0 failed: Input/output error");
    return true;
  });
  s.stop();
});
