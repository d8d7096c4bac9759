import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { xbzrleDecode, xbzrleEncode } from '../../src/migration/codec/xbzrle-codec.js';
import { RamSender } from '../../src/migration/ram/sender.js';
import { XbzrleEncoder } from '../../src/migration/ram/xbzrle-encoder.js';
import { fillRandom, makeBlock, rng } from './mig-helpers.js';

const P = 4096;
const hex = (b: Uint8Array) => Buffer.from(b).toString('hex').replace(/(..)/g, '$1 ').trim();

function enc(oldP: Uint8Array, newP: Uint8Array, max = P): Uint8Array | -1 {
  const out = new Uint8Array(P + 64);
  const n = xbzrleEncode(oldP, newP, out, 0, max);
  return n < 0 ? -1 : out.subarray(0, n);
}

describe('xbzrle encoder (docs/spec/xbzrle.md §2.1 examples)', () => {
  it('byte 4095 set to 01', () => {
    const n = new Uint8Array(P);
    n[4095] = 1;
    assert.equal(hex(enc(new Uint8Array(P), n) as Uint8Array), 'ff 1f 01 01');
  });
  it('bytes 0-1 set to 09 09', () => {
    const n = new Uint8Array(P);
    n[0] = n[1] = 9;
    assert.equal(hex(enc(new Uint8Array(P), n) as Uint8Array), '00 02 09 09');
  });
  it('bytes 200-202 "abc", byte 1000 = 05', () => {
    const n = new Uint8Array(P);
    n.set(Buffer.from('abc'), 200);
    n[1000] = 5;
    assert.equal(hex(enc(new Uint8Array(P), n) as Uint8Array), 'c8 01 03 61 62 63 9d 06 01 05');
  });
  it('counter dword rewritten every 512 bytes (39 bytes, as in the 7.2 stream)', () => {
    const o = new Uint8Array(P);
    const n = new Uint8Array(P);
    for (let i = 0; i < P; i += 512) {
      n[i] = 0x63;
      n[i + 1] = 0x24;
    }
    const e = enc(o, n) as Uint8Array;
    assert.equal(e.length, 39);
    assert.equal(hex(e.subarray(0, 12)), '00 02 63 24 fe 03 02 63 24 fe 03 02');
  });
  it('unchanged page encodes to nothing', () => {
    const a = new Uint8Array(P).fill(3);
    assert.equal((enc(a, a.slice()) as Uint8Array).length, 0);
  });
  it('all bytes differ: overflow', () => {
    assert.equal(enc(new Uint8Array(P), new Uint8Array(P).fill(1)), -1);
  });
  it('overflow boundary: exactly 4096 is allowed, one more byte is not', () => {
    const o = new Uint8Array(P);
    const tail = (equal: number) => {
      const n = new Uint8Array(P);
      n.fill(7, equal);
      return enc(o, n);
    };
    // 3 equal bytes, then 4093 changed to the end: 1 + 2 + 4093 = 4096
    assert.equal((tail(3) as Uint8Array).length, 4096);
    // 2 equal, 4094 changed: 4097 -> overflow
    assert.equal(tail(2), -1);
    const head = (changed: number) => {
      const n = new Uint8Array(P);
      n.fill(7, 0, changed);
      return enc(o, n);
    };
    // the check before a trailing equal run is conservative (2 bytes of room)
    assert.equal((head(4091) as Uint8Array).length, 4094);
    assert.equal(head(4092), -1);
    assert.equal(head(4093), -1);
  });
  it('respects maxLen smaller than a page', () => {
    const n = new Uint8Array(P);
    n.fill(1, 0, 10);
    assert.equal(enc(new Uint8Array(P), n, 13), -1);
    assert.equal((enc(new Uint8Array(P), n, 14) as Uint8Array).length, 12);
  });
});

describe('xbzrle decoder', () => {
  it('round trips random sparse changes', () => {
    const next = rng(9);
    for (let t = 0; t < 300; t++) {
      const o = new Uint8Array(P);
      fillRandom(o, next);
      const n = o.slice();
      const changes = next() % 200;
      for (let k = 0; k < changes; k++) n[next() % P] = next() & 0xff;
      const e = enc(o, n);
      if (e === -1) continue;
      const page = o.slice();
      const d = xbzrleDecode(e, 0, e.length, page);
      assert.ok(d >= 0);
      assert.deepEqual(page, n);
    }
  });
  const dec = (bytes: number[]) => xbzrleDecode(Uint8Array.from(bytes), 0, bytes.length, new Uint8Array(P));
  it('accepts the documented forms', () => {
    assert.equal(dec([0xff, 0x1f, 0x01, 0x01]), 4096);
    assert.equal(dec([0x00, 0x02, 9, 9]), 2);
    assert.equal(dec([0x80, 0x00, 0x01, 9]), 1); // a 2-byte zero first zrun is allowed
    assert.equal(dec([]), 0);
  });
  it('rejects malformed input', () => {
    assert.equal(dec([0x05]), -1); // pair needs 2 bytes
    assert.equal(dec([0x00, 0x01, 9, 0x00, 0x01, 9]), -1); // zrun 0 after the first pair
    assert.equal(dec([0x00, 0x00, 9]), -1); // nzrun 0
    assert.equal(dec([0x80, 0x80, 0x01, 0x01, 9]), -1); // three-byte uleb
    assert.equal(dec([0x81, 0x20, 0x01, 9]), -1); // zrun 4097 > page
    assert.equal(dec([0xff, 0x1f, 0x02, 1, 1]), -1); // run past the page
    assert.equal(dec([0x00, 0x05, 1, 2]), -1); // nzrun longer than the input
    assert.equal(dec([0x00, 0x01]), -1); // nzrun header without data
  });
});

describe('XbzrleEncoder statistics', () => {
  it('cache-size is the running cache\'s size: a resize shows at once, and stays after release', () => {
    const enc = new XbzrleEncoder(new RamSender([makeBlock('m', 1 << 20)]), 1 << 20, 0);
    assert.equal(enc.stats()['cache-size'], 1 << 20);
    enc.resize((256 << 10) + 1);
    assert.equal(enc.stats()['cache-size'], 256 << 10, 'rounded down to a power of two, in the cache itself');
    enc.release();
    assert.equal(enc.stats()['cache-size'], 256 << 10);
  });
});
