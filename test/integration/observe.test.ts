/**
 * Watching, predicting and explaining a real migration between two
 * `ferry vm` processes, through the typed client (ferry/client):
 * calc-dirty-rate / query-dirty-rate, x-query-migrate-forecast before and
 * during the run, x-query-migrate-decisions against the rule the session
 * applies, and the trace of both sides (x-trace-migration,
 * x-query-migration-trace). The bad inputs get QEMU's texts.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { isQmpError, type MigrationForecast, type MigrationTrace, type SwitchoverDecision } from 'ferry/client';
import { cleanupAll, startVm, tempDir, waitFor, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const generic = (desc: string | RegExp) => (e: unknown) => {
  if (!isQmpError(e, 'GenericError')) assert.fail(`not a GenericError: ${String(e)}`);
  if (typeof desc === 'string') assert.equal(e.desc, desc);
  else assert.match(e.desc, desc);
  return true;
};

const GUEST = ['-m', '64M', '-smp', '2', '-workload', 'stress,rate=24M,wss=24M,seed=3', '-fill', 'text,seed=3'];

describe('dirty rate, forecast, decisions and trace of one precopy migration', () => {
  let src: VmHandle;
  let dst: VmHandle;
  let before_: MigrationForecast;
  let during: MigrationForecast | undefined;
  let decisions: SwitchoverDecision[];
  let trace: MigrationTrace;
  let dtrace: MigrationTrace;
  let total = 0;

  before(async () => {
    const dir = tempDir();
    [src, dst] = await Promise.all([
      startVm({ dir, name: 'src', args: GUEST }),
      startVm({ dir, name: 'dst', args: [...GUEST.slice(0, 6), '-incoming', 'defer'] }),
    ]);
    const s = src.api;
    await s.calcDirtyRate({ 'calc-time': 400, 'calc-time-unit': 'millisecond', 'sample-pages': 16384 });
    assert.equal((await s.queryDirtyRate()).status, 'measuring');
    await waitFor(async () => (await s.queryDirtyRate()).status === 'measured', 5000, 'the measurement', 20);
    await s.migrateSetParameters({ 'max-bandwidth': 40_000_000, 'downtime-limit': 100 });
    before_ = await s.xQueryMigrateForecast();
    await s.xTraceMigration({ enable: true, interval: 50 });
    await dst.api.xTraceMigration({ enable: true, interval: 50 });
    const uri = `unix:${dir}/mig.sock`;
    await dst.api.migrateIncoming({ uri });
    await s.migrate({ uri });
    await waitFor(async () => {
      const i = await s.queryMigrate();
      if (i.status === 'active' && (i['total-time'] ?? 0) > 600 && !during) during = await s.xQueryMigrateForecast();
      if (i.status === 'completed' || i.status === 'failed') {
        total = i['total-time'] ?? 0;
        return true;
      }
      return false;
    }, 60000, 'the migration', 50);
    assert.equal((await s.queryMigrate()).status, 'completed');
    await waitFor(async () => (await dst.api.queryMigrate()).status === 'completed', 10000, 'the destination');
    decisions = await s.xQueryMigrateDecisions();
    trace = await s.xQueryMigrationTrace();
    dtrace = await dst.api.xQueryMigrationTrace();
  });

  it('query-dirty-rate answers in QEMU\'s shape, the rate near the workload\'s', async () => {
    const r = await src.api.queryDirtyRate({ 'calc-time-unit': 'millisecond' });
    assert.equal(r.status, 'measured');
    assert.equal(r.mode, 'page-sampling');
    assert.equal(r['sample-pages'], 16384);
    assert.equal(r['calc-time-unit'], 'millisecond');
    assert.ok(r['calc-time'] >= 400 && r['calc-time'] < 2000, `calc-time ${r['calc-time']}`);
    assert.ok(Number.isInteger(r['start-time']) && r['start-time'] > 0);
    // 24 MiB/s of writes into a 24 MiB working set: the distinct pages in 0.4 s are fewer, never more
    const rate = r['dirty-rate']!;
    assert.ok(rate > 5 && rate <= 40, `dirty-rate ${rate} MiB/s`);
    const s = await src.api.queryDirtyRate();
    assert.equal(s['calc-time-unit'], 'second');
    assert.equal(s['calc-time'], Math.floor(r['calc-time'] / 1000));
  });

  it('the forecast before the run converges and names its inputs; the ETA during the run is inside what was left', () => {
    assert.equal(before_.status, 'none');
    assert.equal(before_['bandwidth-source'], 'max-bandwidth');
    assert.equal(before_.bandwidth, 40_000_000);
    assert.equal(before_['dirty-rate-source'], 'calc-dirty-rate');
    assert.equal(before_.converges, true, before_.summary);
    const tt = before_['total-time']!;
    assert.ok(tt.low <= tt.expected && tt.expected <= tt.high!, JSON.stringify(tt));
    // 64 MiB at 40 MB/s is 1.7 s at the least
    assert.ok(tt.expected > 1500 && tt.expected < 20000, JSON.stringify(tt));
    assert.deepEqual(before_.options.map((o) => o.method), ['as-set-up', 'wider-link', 'auto-converge', 'xbzrle', 'postcopy']);
    assert.match(before_.summary, /^converges as set up in about/);
    assert.ok(during, 'a forecast was taken while the migration ran');
    assert.ok(during!.elapsed! >= 600);
    assert.ok(during!.eta, JSON.stringify(during));
    assert.ok(during!.eta!.expected < total, `ETA ${during!.eta!.expected} ms, the whole migration took ${total} ms`);
  });

  it('each decision follows the switchover rule: iterate while the rest is over the threshold, switch when under', () => {
    assert.ok(decisions.length >= 1);
    const last = decisions[decisions.length - 1]!;
    assert.equal(last.decision, 'switchover', JSON.stringify(last));
    for (const d of decisions) {
      const left = d['dirty-bytes'] + d['queued-bytes'];
      assert.equal(d['downtime-limit'], 100);
      if (d.decision === 'switchover') {
        assert.ok(d['dirty-bytes'] === 0 || left < d.threshold, JSON.stringify(d));
        assert.ok(d['expected-downtime'] <= d['downtime-limit'], JSON.stringify(d));
        assert.match(d.reason, /<= limit 100 ms|nothing left/);
      } else {
        assert.equal(d.decision, 'iterate');
        assert.ok(left >= d.threshold, JSON.stringify(d));
        assert.ok(d['expected-downtime'] === -1 || d['expected-downtime'] > d['downtime-limit'] || left >= d.threshold, JSON.stringify(d));
        assert.match(d.reason, /> limit 100 ms|not measured/);
      }
    }
    // passes only go up, time too
    for (let i = 1; i < decisions.length; i++) {
      assert.ok(decisions[i]!.pass >= decisions[i - 1]!.pass);
      assert.ok(decisions[i]!.time >= decisions[i - 1]!.time);
    }
  });

  it('the source trace holds query-migrate over time, the passes, the stop and the decisions', () => {
    assert.equal(trace.side, 'source');
    assert.equal(trace.complete, true);
    assert.equal(trace['ram-size'], 64 << 20);
    assert.ok(trace.samples.length >= 10, `${trace.samples.length} samples`);
    assert.equal(trace.samples[trace.samples.length - 1]!.info.status, 'completed');
    const statuses = trace.events.filter((e) => e.kind === 'status').map((e) => e.status);
    assert.deepEqual(statuses, ['setup', 'active', 'completed']);
    assert.ok(trace.events.some((e) => e.kind === 'pass'));
    assert.ok(trace.events.some((e) => e.kind === 'stop'));
    assert.deepEqual(trace.decisions, decisions);
    assert.ok(trace.forecast, 'the forecast at the start is in the trace');
    assert.ok(trace.samples.some((s) => s.eta !== undefined), 'samples carry the ETA');
    for (let i = 1; i < trace.samples.length; i++) assert.ok(trace.samples[i]!.time >= trace.samples[i - 1]!.time);
  });

  it('the destination trace ends completed, with the guest resumed', () => {
    assert.equal(dtrace.side, 'destination');
    assert.equal(dtrace.complete, true);
    const statuses = dtrace.events.filter((e) => e.kind === 'status').map((e) => e.status);
    assert.equal(statuses[statuses.length - 1], 'completed');
  });

  it('bad requests get QEMU\'s texts and change nothing', async () => {
    const s = src.api;
    await assert.rejects(s.calcDirtyRate({ 'calc-time': 70 }), generic('Calculation time is out of range [50ms, 60000ms].'));
    await assert.rejects(s.calcDirtyRate({ 'calc-time': 10, 'calc-time-unit': 'millisecond' }), generic('Calculation time is out of range [50ms, 60000ms].'));
    await assert.rejects(s.calcDirtyRate({ 'calc-time': 1, 'sample-pages': 100 }), generic('sample-pages is out of range[128, 16384].'));
    await assert.rejects(s.calcDirtyRate({ 'calc-time': 1, 'sample-pages': 512, mode: 'dirty-bitmap' }), generic('sample-pages is used only in page-sampling mode'));
    await assert.rejects(s.calcDirtyRate({ 'calc-time': 1, mode: 'dirty-ring' }), generic('mode dirty-ring is not enabled, use other method instead.'));
    await assert.rejects(s.xTraceMigration({ enable: true, interval: 5 }), generic(/interval/));
    await assert.rejects(s.xQueryMigrateForecast({ bandwidth: 0 }), generic(/bandwidth/));
    // the last measurement is still there
    assert.equal((await s.queryDirtyRate()).status, 'measured');
    // a VM that never measured or traced says so
    const fresh = await startVm({ args: ['-m', '16M'] });
    await assert.rejects(fresh.api.xQueryMigrateForecast(), generic('No dirty rate was measured yet: run calc-dirty-rate first'));
    await assert.rejects(fresh.api.xQueryMigrationTrace(), generic(/No migration was traced/));
    assert.deepEqual(await fresh.api.xQueryMigrateDecisions(), []);
    assert.equal((await fresh.api.queryDirtyRate()).status, 'unstarted');
    await fresh.quit();
  });
});

describe('dirty-bitmap mode', () => {
  it('counts the guest\'s dirty log exactly, and a migrate during it ends it before the migration takes the log', async () => {
    const dir = tempDir();
    const vm = await startVm({ dir, args: ['-m', '32M', '-workload', 'stress,rate=8M,wss=4M,seed=5'] });
    const a = vm.api;
    await a.calcDirtyRate({ 'calc-time': 300, 'calc-time-unit': 'millisecond', mode: 'dirty-bitmap' });
    await waitFor(async () => (await a.queryDirtyRate()).status === 'measured', 5000, 'the measurement', 20);
    const r = await a.queryDirtyRate({ 'calc-time-unit': 'millisecond' });
    assert.equal(r.mode, 'dirty-bitmap');
    assert.equal(r['sample-pages'], 0);
    // at most the 4 MiB working set in 0.3 s: at most 4 MiB / 0.3 s ≈ 13 MiB/s
    assert.ok(r['dirty-rate']! > 0 && r['dirty-rate']! <= 14, `dirty-rate ${r['dirty-rate']}`);
    // a long measurement, then migrate: it ends at once (measured), with the period it had
    await a.calcDirtyRate({ 'calc-time': 30, mode: 'dirty-bitmap' });
    await new Promise((res) => setTimeout(res, 200));
    await a.migrate({ uri: `exec:cat > ${dir}/stream.bin` });
    const m = await a.queryDirtyRate({ 'calc-time-unit': 'millisecond' });
    assert.equal(m.status, 'measured');
    assert.ok(m['calc-time'] < 5000, `calc-time ${m['calc-time']}`);
    await waitFor(async () => ['completed', 'failed'].includes((await a.queryMigrate()).status ?? ''), 30000, 'the migration');
    await vm.quit();
  });
});
