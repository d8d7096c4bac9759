// The observation models on their own: the dirty-rate meter on RAM blocks
// the test writes (page-sampling and dirty-bitmap, QEMU's error texts), the
// dirty curve fit, the precopy loop model of the forecast, and the
// decision log's wording.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TARGET_PAGE_SIZE, type RamBlock } from '../../src/machine/types.js';
import { DirtyRateError, DirtyRateMeter } from '../../src/migration/observe/dirty-rate.js';
import { DecisionLog, MAX_DECISIONS } from '../../src/migration/observe/decisions.js';
import { dirtyBytes, fitCurve, requiredBandwidth, simulate, outcome, type ForecastModel, type SimOptions } from '../../src/migration/observe/forecast.js';

function block(pages: number, fill = 1): RamBlock {
  const size = pages * TARGET_PAGE_SIZE;
  const words = Math.ceil(pages / 32);
  const bytes = new Uint8Array(new SharedArrayBuffer(size)).fill(fill);
  return { name: 'pc.ram', size, pages, bytes, dirty: new Int32Array(new SharedArrayBuffer(words * 4)), touched: new Uint32Array(words), present: new Int32Array(words).fill(-1) };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test('calc-dirty-rate: QEMU\'s refusals, nothing started', () => {
  const m = new DirtyRateMeter(() => [block(64)]);
  const err = (f: () => void, text: string) => assert.throws(f, (e: unknown) => e instanceof DirtyRateError && e.message === text);
  err(() => m.start({ calcTimeMs: 49 }, false), 'Calculation time is out of range [50ms, 60000ms].');
  err(() => m.start({ calcTimeMs: 60001 }, false), 'Calculation time is out of range [50ms, 60000ms].');
  err(() => m.start({ calcTimeMs: 100, samplePages: 127 }, false), 'sample-pages is out of range[128, 16384].');
  err(() => m.start({ calcTimeMs: 100, samplePages: 16385 }, false), 'sample-pages is out of range[128, 16384].');
  err(() => m.start({ calcTimeMs: 100, samplePages: 512, mode: 'dirty-bitmap' }, false), 'sample-pages is used only in page-sampling mode');
  err(() => m.start({ calcTimeMs: 100, mode: 'dirty-ring' }, false), 'mode dirty-ring is not enabled, use other method instead.');
  assert.throws(() => m.start({ calcTimeMs: 100, mode: 'dirty-bitmap' }, true), /while a migration runs/);
  assert.equal(m.info().status, 'unstarted');
  m.start({ calcTimeMs: 100 }, false);
  err(() => m.start({ calcTimeMs: 100 }, false), 'the dirty rate is already being measured.');
  m.close();
});

test('page-sampling: the share of changed samples, times RAM, over the period; zero pages and XBZRLE size too', async () => {
  const b = block(4096, 0); // 16 MiB, all zero
  b.bytes.fill(7, 0, 2048 * TARGET_PAGE_SIZE); // the first half is data
  const m = new DirtyRateMeter(() => [b]);
  m.start({ calcTimeMs: 100, samplePages: 16384 }, false); // 16384/GiB → 256 samples here
  // one byte in each page of the first quarter changes
  for (let p = 0; p < 1024; p++) b.bytes[p * TARGET_PAGE_SIZE + 5] = 9;
  await sleep(200);
  const info = m.info('millisecond');
  assert.equal(info.status, 'measured');
  assert.equal(info.mode, 'page-sampling');
  const last = m.last!;
  assert.equal(last.samples, 256);
  // a quarter of 16 MiB changed in ~0.1 s: 4 MiB per 0.1 s = ~40 MiB/s; sampling error a few MiB/s
  const share = last.readings[last.readings.length - 1]!.bytes / (16 << 20);
  assert.ok(share > 0.15 && share < 0.35, `changed share ${share}`);
  assert.ok(last.zeroShare > 0.35 && last.zeroShare < 0.65, `zero share ${last.zeroShare}`);
  // one byte changed per page: the delta is a few bytes of a 4 KiB page
  assert.ok(last.xbzrleRatio! > 0 && last.xbzrleRatio! < 0.01, `xbzrle ratio ${last.xbzrleRatio}`);
  assert.equal(last.readings.length, 4);
  assert.ok(info['dirty-rate']! > 10, `dirty-rate ${info['dirty-rate']}`);
});

test('dirty-bitmap: counts the dirty log exactly; a migration start ends it at once', async () => {
  const b = block(1024);
  b.dirty[0] = -1; // dirtied before: cleared at the start
  const m = new DirtyRateMeter(() => [b]);
  m.start({ calcTimeMs: 30000, mode: 'dirty-bitmap' }, false);
  assert.equal(b.dirty[0], 0);
  b.dirty[3] = 0xff; // 8 pages
  b.dirty[4] = 0x1; // 1 page
  await sleep(50);
  m.migrationStarting();
  const info = m.info('millisecond');
  assert.equal(info.status, 'measured');
  assert.ok(info['calc-time'] < 1000);
  assert.equal(m.last!.readings[m.last!.readings.length - 1]!.bytes, 9 * TARGET_PAGE_SIZE);
  // the log is left for the migration
  assert.equal(b.dirty[3], 0xff);
});

test('the dirty curve fit finds the working set and the rate', () => {
  const truth = { rate: 20_000, workingSet: 32 << 20 }; // 20 MB/s into 32 MiB
  const readings = [125, 250, 500, 1000, 4000].map((ms) => ({ ms, bytes: dirtyBytes(truth, ms) }));
  const c = fitCurve(readings, 256 << 20);
  assert.ok(Math.abs(c.workingSet / truth.workingSet - 1) < 0.06, `working set ${c.workingSet}`);
  assert.ok(Math.abs(c.rate / truth.rate - 1) < 0.06, `rate ${c.rate}`);
  const lin = fitCurve([{ ms: 100, bytes: 1e6 }, { ms: 200, bytes: 2e6 }, { ms: 400, bytes: 4e6 }], 1e9);
  assert.equal(lin.workingSet, Infinity);
  assert.ok(Math.abs(lin.rate - 1e4) < 1e-3, `rate ${lin.rate}`);
});

const base: SimOptions = {
  ramBytes: 64 << 20,
  zeroShare: 0,
  curve: { rate: 0, workingSet: Infinity },
  bandwidth: 40_000, // 40 MB/s
  stopBandwidth: 40_000,
  limitMs: 300,
  reserveMs: 30,
  plannedShare: 0.9,
  overheadMs: 20,
  setupMs: 10,
};

test('the loop model: an idle guest takes one pass; zero pages are cheap', () => {
  const r = simulate(base);
  assert.ok(r.converges);
  const wire = (64 << 20) * (4104 / 4096);
  assert.ok(Math.abs(r.totalMs - (10 + wire / 40_000 + 20)) < 10, `total ${r.totalMs}`);
  const z = simulate({ ...base, zeroShare: 0.9 });
  assert.ok(z.totalMs < r.totalMs / 5);
});

test('the loop model: converges when the link outruns the dirtying, not when the dirtying outruns the link', () => {
  const slow = simulate({ ...base, curve: { rate: 10_000, workingSet: Infinity } });
  assert.ok(slow.converges);
  assert.ok(slow.passes > 2);
  assert.ok(slow.downtimeMs <= 300 + 20);
  const fast = simulate({ ...base, curve: { rate: 60_000, workingSet: Infinity } });
  assert.equal(fast.converges, false);
  // auto-converge throttles it down until it does
  const ac = simulate({ ...base, curve: { rate: 60_000, workingSet: Infinity }, autoConverge: { initial: 20, increment: 10 } });
  assert.ok(ac.converges);
  assert.ok(ac.throttle >= 40, `throttle ${ac.throttle}`);
  // postcopy always ends: bulk, then the dirty set once
  const pc = simulate({ ...base, curve: { rate: 60_000, workingSet: 16 << 20 }, postcopy: true });
  assert.ok(pc.converges && pc.postcopyMs! > 0 && pc.downtimeMs === 20);
});

test('the least bandwidth that converges is found, and a wider band comes from wider inputs', () => {
  const m: ForecastModel = { ...base, curve: { rate: 60_000, workingSet: Infinity }, curveLow: { rate: 50_000, workingSet: Infinity }, curveHigh: { rate: 70_000, workingSet: Infinity } };
  const need = requiredBandwidth(m)!;
  // about the dirty rate at the band's high end (a little less: the dirty set cannot outgrow RAM)
  assert.ok(need > 40_000 && need < 100_000, `needs ${need}`);
  assert.ok(simulate({ ...m, curve: m.curveHigh, bandwidth: need }).converges);
  assert.ok(!simulate({ ...m, curve: m.curveHigh, bandwidth: need * 0.8 }).converges);
  const o = outcome({ ...m, bandwidth: need * 1.2 });
  assert.ok(o.low.totalMs <= o.expected.totalMs && o.expected.totalMs <= o.high.totalMs);
});

test('the decision log words the figures it was given and keeps the last 1000', () => {
  const log = new DecisionLog();
  const d = {
    timeMs: 1234.4, pass: 3, dirtyBytes: 10 << 20, precopyBytes: 10 << 20, queuedBytes: 0, bandwidth: 40_000, plannedBandwidth: 36_000,
    expectedDowntimeMs: (10 << 20) / 36_000 + 30, limitMs: 300, reserveMs: 30, thresholdBytes: 36_000 * 270, decision: 'iterate' as const, why: 'too-much' as const,
  };
  log.record(d);
  const e = log.last!;
  assert.equal(e.time, 1234);
  assert.equal(e.bandwidth, 40_000_000);
  assert.equal(e['expected-downtime'], 321);
  assert.equal(e.reason, '10.0 MiB left needs 291 ms at 36.0 MB/s + 30 ms reserve = 321 ms > limit 300 ms');
  log.record({ ...d, dirtyBytes: 1 << 20, expectedDowntimeMs: 59, decision: 'switchover', why: 'fits' });
  assert.match(log.last!.reason, /= 59 ms <= limit 300 ms$/);
  log.record({ ...d, bandwidth: 0, expectedDowntimeMs: Infinity });
  assert.equal(log.last!['expected-downtime'], -1);
  assert.match(log.last!.reason, /bandwidth not measured yet/);
  for (let i = 0; i < MAX_DECISIONS + 5; i++) log.record(d);
  assert.equal(log.list().length, MAX_DECISIONS);
  assert.equal(log.count, MAX_DECISIONS + 8);
});
