/**
 * The `sweep` workload's pattern in a RAM image (pmemsave output): from
 * `start` to `end` the first bytes of the pages read v+1 up to the sweep's
 * position and v from there on (mod 256), so at most one step down. Any
 * other change means a page is stale or lost.
 */
import assert from 'node:assert/strict';

export function assertSweepPattern(ram: Uint8Array, start: number, end: number): void {
  const first: number[] = [];
  for (let a = start; a < end; a += 4096) first.push(ram[a]!);
  let drops = 0;
  for (let i = 1; i < first.length; i++) {
    if (first[i] === first[i - 1]) continue;
    assert.equal((first[i]! + 1) & 255, first[i - 1], `page ${i} breaks the sweep pattern`);
    drops++;
  }
  assert.ok(drops <= 1, `at most one step in the pattern, found ${drops}`);
  assert.ok(first.some((v) => v !== 0), 'the sweep ran');
}
