import assert from 'node:assert/strict';
import { PassThrough, Readable, Writable } from 'node:stream';
import { describe, it } from 'node:test';
import { StreamReader } from '../../src/migration/stream/reader.js';
import { BufferSink, StreamWriter } from '../../src/migration/stream/writer.js';
import { MigrationStreamError } from '../../src/migration/wire/errors.js';
import { Collector } from './mig-helpers.js';

describe('StreamWriter', () => {
  it('puts big-endian values, counted strings, reserve, and flushes in order', async () => {
    const out = new Collector();
    const w = new StreamWriter(out, { bufferSize: 64 * 1024 });
    w.put8(0xab);
    w.put16(0x1234);
    w.put32(0xdeadbeef);
    w.put64(0x0000_0123_4567_89ab);
    w.putCountedString('ram');
    const at = w.reserve(3);
    w.buf.set([7, 8, 9], at);
    await w.drain();
    assert.equal(out.data.toString('hex'), 'ab1234deadbeef00000123456789ab0372616d070809');
    assert.equal(w.bytesWritten, out.data.length);
    assert.equal(w.bytesFlushed, out.data.length);
  });

  it('spills across staging buffers and keeps byte order (small buffer, many pages)', async () => {
    for (const reuse of [true, false]) {
      const out = new Collector();
      const w = new StreamWriter(out, { bufferSize: 64 * 1024, reuseBuffers: reuse });
      const page = Buffer.alloc(4096);
      const expect: Buffer[] = [];
      for (let i = 0; i < 100; i++) {
        page.fill(i);
        w.put32(i);
        const at = w.reserve(4096);
        w.buf.set(page, at);
        expect.push(Buffer.from([0, 0, 0, i]), Buffer.from(page));
        if (i % 7 === 0) await w.flush();
      }
      w.putBytes(Buffer.alloc(200_000, 0xee)); // larger than a staging buffer
      expect.push(Buffer.alloc(200_000, 0xee));
      await w.drain();
      assert.ok(out.data.equals(Buffer.concat(expect)), `reuse=${reuse}`);
    }
  });

  it('respects backpressure of a slow writable', async () => {
    let inflight = 0;
    let maxInflight = 0;
    const got: Buffer[] = [];
    const slow = new Writable({
      highWaterMark: 1024,
      write(chunk: Buffer, _e, cb) {
        inflight++;
        maxInflight = Math.max(maxInflight, inflight);
        setTimeout(() => {
          inflight--;
          got.push(Buffer.from(chunk));
          cb();
        }, 2);
      },
    });
    const w = new StreamWriter(slow, { bufferSize: 64 * 1024 });
    for (let i = 0; i < 20; i++) {
      w.putBytes(Buffer.alloc(50_000, i));
      await w.flush();
    }
    await w.drain();
    assert.equal(Buffer.concat(got).length, 20 * 50_000);
    assert.ok(maxInflight <= 1);
  });

  it('sticky first error: later puts are no-ops, flush rejects with the first error', async () => {
    const bad = new Writable({
      write(_c, _e, cb) {
        cb(new Error('EPIPE first'));
      },
    });
    const w = new StreamWriter(bad);
    w.put32(1);
    await w.flush();
    await assert.rejects(w.drain(), /Migration stream write failed: EPIPE first/);
    const n = w.bytesWritten;
    w.put32(2);
    w.putBytes(Buffer.alloc(10));
    w.setError(new Error('second'));
    assert.equal(w.bytesWritten, n);
    assert.match(w.error!.message, /EPIPE first/);
    await assert.rejects(w.flush(), /EPIPE first/);
    assert.equal(w.rateLimitExceeded(), true);
  });

  it('a destroyed writable surfaces as an error, not a hang', async () => {
    const p = new PassThrough();
    p.destroy();
    const w = new StreamWriter(p);
    w.put32(1);
    await w.flush();
    await assert.rejects(w.drain(), MigrationStreamError);
  });

  it('rate limiter: budget = bandwidth/10 per 100 ms window, live changes, 0 = unlimited', async () => {
    let now = 1000;
    const w = new StreamWriter(null, { maxBandwidth: 1_000_000, now: () => now });
    assert.equal(w.rateLimitExceeded(), false);
    w.putBytes(Buffer.alloc(99_999));
    assert.equal(w.rateLimitExceeded(), false);
    w.put8(0);
    assert.equal(w.rateLimitExceeded(), true); // 100 000 bytes in the window
    now += 99;
    assert.equal(w.rateLimitExceeded(), true);
    now += 1;
    assert.equal(w.rateLimitExceeded(), false); // new window
    w.putBytes(Buffer.alloc(150_000)); // overshoot of 50 000 carries into the next window
    now += 100;
    assert.equal(w.rateLimitExceeded(), false);
    assert.equal(w.windowBytes, 50_000);
    w.setMaxBandwidth(400_000); // 40 000 per window
    assert.equal(w.rateLimitExceeded(), true);
    w.setMaxBandwidth(0);
    assert.equal(w.rateLimitExceeded(), false);
  });

  it('rate limiter accuracy with a real clock: bytes per window', async () => {
    const w = new StreamWriter(null, { maxBandwidth: 10_000_000 });
    const rec = 4104;
    const t0 = performance.now();
    let windows = 0;
    while (performance.now() - t0 < 500) {
      while (!w.rateLimitExceeded()) w.putBytes(Buffer.alloc(rec));
      await w.flush();
      await w.waitForWindow();
      windows++;
    }
    const elapsed = (performance.now() - t0) / 1000;
    const rate = w.bytesWritten / elapsed;
    // within 15% of the configured 10 MB/s
    assert.ok(rate > 8.5e6 && rate < 11.5e6, `rate ${rate} over ${windows} windows`);
  });
});

describe('BufferSink', () => {
  it('grows and encodes', () => {
    const s = new BufferSink();
    for (let i = 0; i < 3000; i++) s.put32(i);
    s.putCountedString('x');
    assert.equal(s.length, 12002);
    assert.equal(s.toBuffer().readUInt32BE(4 * 2999), 2999);
  });
});

describe('StreamReader', () => {
  it('reads values across chunk boundaries', async () => {
    const data = Buffer.from('ab1234deadbeef00000123456789ab0372616d070809', 'hex');
    for (let split = 1; split < 6; split++) {
      const chunks: Buffer[] = [];
      for (let i = 0; i < data.length; i += split) chunks.push(data.subarray(i, i + split));
      const r = new StreamReader(Readable.from(chunks));
      await r.ensure(data.length);
      assert.equal(r.get8(), 0xab);
      assert.equal(r.get16(), 0x1234);
      assert.equal(r.get32(), 0xdeadbeef);
      assert.equal(r.get64(), 0x0000_0123_4567_89ab);
      assert.equal(r.getCountedString(), 'ram');
      const dst = new Uint8Array(5);
      r.copyTo(dst, 2, 3);
      assert.deepEqual([...dst], [0, 0, 7, 8, 9]);
      assert.equal(r.bytesRead, data.length);
      await assert.rejects(r.ensure(1), { message: 'Unexpected end of migration stream' });
    }
  });

  it('waits for data, then errors cleanly on end and on source errors', async () => {
    const p = new PassThrough();
    const r = new StreamReader(p);
    const wait = r.ensure(6);
    p.write(Buffer.from([1, 2, 3]));
    setTimeout(() => p.write(Buffer.from([4, 5, 6, 7])), 5);
    await wait;
    assert.equal(r.get32(), 0x01020304);
    const w2 = r.ensure(10);
    p.end();
    await assert.rejects(w2, { message: 'Unexpected end of migration stream' });
    assert.throws(() => r.getBytes(10), MigrationStreamError);

    const q = new PassThrough();
    const r2 = new StreamReader(q);
    const w3 = r2.ensure(4);
    q.destroy(new Error('ECONNRESET'));
    await assert.rejects(w3, { message: 'Migration stream read failed: ECONNRESET' });
  });

  it('caps lengths read from the wire', async () => {
    const r = StreamReader.fromBuffer(Buffer.alloc(4));
    await assert.rejects(r.ensure(1 << 30), /exceeds the limit/);
    assert.throws(() => StreamReader.checkLength(70000, 65536, 'x'), /Length 70000 of x exceeds the limit 65536/);
    const big = StreamReader.fromBuffer(Buffer.from([0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]));
    assert.throws(() => big.get64(), MigrationStreamError);
  });

  it('pauses a fast source and resumes it as data is consumed', async () => {
    const p = new PassThrough();
    const r = new StreamReader(p, { highWater: 64 * 1024 });
    const total = 1024 * 1024;
    const writer = (async () => {
      for (let i = 0; i < total / 4096; i++) {
        if (!p.write(Buffer.alloc(4096, i & 0xff))) await new Promise((res) => p.once('drain', res));
      }
      p.end();
    })();
    let sum = 0;
    for (let i = 0; i < total / 4096; i++) {
      if (!r.has(4096)) await r.ensure(4096);
      assert.ok(r.available <= 64 * 1024 + 65536);
      const b = r.getBytes(4096);
      assert.equal(b[100], i & 0xff);
      sum += b.length;
    }
    await writer;
    assert.equal(sum, total);
  });
});
