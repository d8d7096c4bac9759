import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { releaseMemory } from '../../src/base/native.js';

const rss = (): number => Number(/VmRSS:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))![1]) * 1024;
/** dist/test/unit → repo root */
const hp = createRequire(import.meta.url)('../../../native/hugepage/index.cjs') as { available: boolean };
const built = hp.available;

test('releaseMemory gives RAM back to the kernel and the pages read back as zero', { skip: built ? false : 'hugepage addon not built' }, () => {
  const size = 64 << 20;
  const u = new Uint8Array(new SharedArrayBuffer(size));
  u.fill(0xa5);
  const before = rss();
  assert.equal(releaseMemory(u), true);
  const after = rss();
  assert.ok(before - after >= size / 2, `RSS fell by ${((before - after) / 2 ** 20).toFixed(1)} MiB of 64`);
  // whole host pages inside the view are zero; a partial host page at either end may be kept
  assert.equal(u[size >>> 1], 0);
  assert.equal(u[8192], 0);
  // usable again (faulted back in, zeroed)
  u[8192] = 7;
  assert.equal(u[8192], 7);
});

test('releaseMemory of a range smaller than a host page frees nothing and says so', { skip: built ? false : 'hugepage addon not built' }, () => {
  const u = new Uint8Array(new SharedArrayBuffer(1 << 20));
  u.fill(1);
  assert.equal(releaseMemory(u.subarray(100, 200)), false);
  assert.equal(u[150], 1);
});
