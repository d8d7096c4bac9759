/** src/base/bitmap.ts, u64.ts and bytes.ts against plain reference models. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  clearRange,
  countBits,
  countClear,
  newBitmap,
  nextClearBit,
  nextSetBit,
  popcount32,
  setBit,
  setRange,
  setRuns,
  testBit,
  clearBit,
} from '../../src/base/bitmap.js';
import { hi32, join64, lo32 } from '../../src/base/u64.js';
import { isZeroRange } from '../../src/base/bytes.js';

const model = (bits: number, set: readonly number[]): boolean[] => {
  const m = new Array<boolean>(bits).fill(false);
  for (const i of set) m[i] = true;
  return m;
};

test('set, test, clear and counts agree with a boolean array', () => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 300 }).chain((bits) =>
      fc.tuple(fc.constant(bits), fc.array(fc.nat(bits - 1)), fc.array(fc.nat(bits - 1)))), ([bits, sets, clears]) => {
      const bm = newBitmap(bits);
      const m = model(bits, sets);
      for (const i of sets) setBit(bm, i);
      for (const i of clears) {
        clearBit(bm, i);
        m[i] = false;
      }
      for (let i = 0; i < bits; i++) assert.equal(testBit(bm, i), m[i]);
      assert.equal(countBits(bm), m.filter(Boolean).length);
      assert.equal(countClear(bm, bits), m.filter((x) => !x).length);
      // next set / clear from every position
      for (let i = 0; i <= bits; i++) {
        let s = -1;
        for (let j = i; j < bits; j++) if (m[j]) { s = j; break; }
        assert.equal(nextSetBit(bm, i, bits), s, `nextSetBit from ${i}`);
        let c = bits;
        for (let j = i; j < bits; j++) if (!m[j]) { c = j; break; }
        assert.equal(nextClearBit(bm, i, bits), c, `nextClearBit from ${i}`);
      }
    }),
  );
});

test('ranges and runs', () => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 300 }).chain((bits) =>
      fc.tuple(fc.constant(bits), fc.array(fc.tuple(fc.nat(bits), fc.nat(bits), fc.boolean())))), ([bits, ops]) => {
      const bm = newBitmap(bits);
      const m = new Array<boolean>(bits).fill(false);
      for (const [a, b, set] of ops) {
        const [s, e] = a <= b ? [a, b] : [b, a];
        if (set) setRange(bm, s, e);
        else clearRange(bm, s, e);
        for (let i = s; i < e; i++) m[i] = set;
      }
      const runs: Array<[number, number]> = [];
      for (let i = 0; i < bits; i++) {
        if (!m[i]) continue;
        const st = i;
        while (i < bits && m[i]) i++;
        runs.push([st, i - st]);
      }
      assert.deepEqual(setRuns(bm, bits), runs);
    }),
  );
});

test('a full bitmap has its tail bits clear', () => {
  const bm = newBitmap(37, true);
  assert.equal(bm.length, 2);
  assert.equal(bm[0], 0xffffffff);
  assert.equal(bm[1], 0x1f);
  assert.equal(countBits(bm), 37);
  assert.equal(countClear(bm, 37), 0);
  assert.equal(newBitmap(64, true)[1], 0xffffffff);
});

test('popcount32 of edge words', () => {
  assert.equal(popcount32(0), 0);
  assert.equal(popcount32(0xffffffff), 32);
  assert.equal(popcount32(-1), 32);
  assert.equal(popcount32(0x80000001), 2);
});

test('u64 halves round-trip', () => {
  for (const v of [0, 1, 0xffffffff, 2 ** 32, 2 ** 32 + 5, 2 ** 53 - 1, 0x123456789abc]) {
    assert.equal(join64(hi32(v), lo32(v)), v);
    assert.ok(lo32(v) >= 0 && lo32(v) <= 0xffffffff);
  }
  assert.equal(hi32(2 ** 40), 256);
});

test('isZeroRange finds a single non-zero byte anywhere', () => {
  const b = Buffer.alloc(3 * 4096 + 100);
  assert.equal(isZeroRange(b, 0, b.length), true);
  for (const at of [0, 4095, 4096, 9000, b.length - 1]) {
    b[at] = 1;
    assert.equal(isZeroRange(b, 0, b.length), false, `byte ${at}`);
    assert.equal(isZeroRange(b, at + 1, b.length - at - 1), true);
    b[at] = 0;
  }
});
