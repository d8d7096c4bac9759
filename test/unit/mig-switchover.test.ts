/**
 * The switchover budget (core/switchover.ts): QEMU's rule less a reserve
 * measured from past switchovers, at most half of downtime-limit.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { DEFAULT_OVERHEAD_MS, SwitchoverBudget } from '../../src/migration/core/switchover.js';

describe('switchover budget', () => {
  it('before any switchover: the limit less 1.5 × the default overhead', () => {
    const b = new SwitchoverBudget();
    assert.equal(b.reserveMs(300), DEFAULT_OVERHEAD_MS * 1.5);
    // 90% of 1000 bytes/ms over 300 ms less the reserve
    assert.equal(b.thresholdBytes(1000, 300), 900 * (300 - DEFAULT_OVERHEAD_MS * 1.5));
  });

  it('learns the overhead: what the downtime took beyond moving its bytes', () => {
    const b = new SwitchoverBudget();
    // 100 ms of downtime, 90 000 bytes at 1000 bytes/ms = 90 ms: 10 ms overhead
    b.record(100, 90_000, 1000);
    assert.equal(b.measured, 1);
    assert.equal(b.overheadMs, (10 + DEFAULT_OVERHEAD_MS) / 2);
    b.record(100, 90_000, 1000);
    assert.equal(b.overheadMs, (10 + (10 + DEFAULT_OVERHEAD_MS) / 2) / 2);
    // a slow switchover raises it again
    b.record(200, 90_000, 1000);
    assert.ok(b.overheadMs > 50, String(b.overheadMs));
  });

  it('never reserves more than half of the limit, nor less than nothing', () => {
    const b = new SwitchoverBudget();
    b.record(5000, 0, 1000);
    assert.equal(b.reserveMs(300), 150);
    assert.equal(b.thresholdBytes(1000, 300), 135_000);
    assert.equal(b.thresholdBytes(1000, 0), 0);
    const c = new SwitchoverBudget();
    c.record(10, 1_000_000, 1000); // faster than the estimate: overhead 0
    assert.equal(c.overheadMs, DEFAULT_OVERHEAD_MS / 2);
  });

  it('ignores a switchover with no measured bandwidth', () => {
    const b = new SwitchoverBudget();
    b.record(100, 1000, 0);
    assert.equal(b.measured, 0);
    assert.equal(b.overheadMs, DEFAULT_OVERHEAD_MS);
  });
});
