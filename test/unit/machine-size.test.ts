import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseSize, formatSize } from '../../src/base/size.js';
import { parseFill, parseWorkload } from '../../src/machine/config.js';

test('parseSize: suffixes and plain bytes', () => {
  assert.equal(parseSize('0'), 0);
  assert.equal(parseSize('4096'), 4096);
  assert.equal(parseSize('512B'), 512);
  assert.equal(parseSize('4k'), 4096);
  assert.equal(parseSize('16M'), 16 << 20);
  assert.equal(parseSize('512MB'), 512 << 20);
  assert.equal(parseSize('1G'), 2 ** 30);
  assert.equal(parseSize('8G'), 8 * 2 ** 30);
  assert.equal(parseSize('1.5G'), 1.5 * 2 ** 30);
  assert.equal(parseSize('2T'), 2 * 2 ** 40);
});

test('parseSize: clear errors', () => {
  assert.throws(() => parseSize(''), /empty/);
  assert.throws(() => parseSize('abc'), /expected a number/);
  assert.throws(() => parseSize('12Q'), /expected a number/);
  assert.throws(() => parseSize('-1M'), /expected a number/);
  assert.throws(() => parseSize('1.5'), /whole number of bytes/);
  assert.throws(() => parseSize('99999999E'), /too large/);
  assert.throws(() => parseSize('1x', 'memory size'), /Invalid memory size '1x'/);
});

test('formatSize', () => {
  assert.equal(formatSize(16 << 20), '16M');
  assert.equal(formatSize(1536), '1.5K');
  assert.equal(formatSize(1000), '1000');
});

test('parseWorkload / parseFill', () => {
  assert.deepEqual(parseWorkload('idle'), { kind: 'idle' });
  assert.deepEqual(parseWorkload('sweep,start=2M,end=8M'), { kind: 'sweep', start: 2 << 20, end: 8 << 20 });
  assert.deepEqual(parseWorkload('stress,rate=10M,wss=64M,write=16,seed=7,steps=100'), {
    kind: 'stress',
    rate: 10 << 20,
    wss: 64 << 20,
    write: 16,
    seed: 7,
    steps: 100,
  });
  assert.throws(() => parseWorkload('bogus'), /Unknown workload 'bogus'/);
  assert.throws(() => parseWorkload('stress,foo=1'), /Unknown workload stress option 'foo'/);
  assert.throws(() => parseWorkload('stress,seed=x'), /Invalid seed/);
  assert.deepEqual(parseFill('random,seed=3'), { kind: 'random', seed: 3 });
  assert.deepEqual(parseFill('zero'), { kind: 'zero' });
  assert.throws(() => parseFill('ones'), /Unknown fill 'ones'/);
});
