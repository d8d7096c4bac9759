/**
 * native/malloc-tune: `ferry vm` keeps freed heap (glibc M_TRIM_THRESHOLD,
 * M_TOP_PAD); docs/benchmarks.md "Block migration" has the measurement.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { keepFreedHeap } from '../../src/base/native.js';

const built = existsSync(new URL('../../../native/malloc-tune/build/Release/ferry_malloc_tune.node', import.meta.url));

test('keepFreedHeap sets glibc\'s tunables when the addon is built, and refuses bad values', { skip: built && process.env.FERRY_NO_NATIVE !== '1' ? false : 'native/malloc-tune is not built (or FERRY_NO_NATIVE=1)' }, () => {
  assert.equal(keepFreedHeap(), true);
  assert.equal(keepFreedHeap(-1, 0), false);
  assert.equal(keepFreedHeap(1 << 20, -5), false);
});
