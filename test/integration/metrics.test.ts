/**
 * `ferry vm -metrics tcp:HOST:PORT`: Prometheus scrapes of a VM while it
 * migrates (status, bytes, ETA) and after (the counters of ended
 * migrations), on a port the kernel picked; bad addresses are refused at
 * start.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import * as http from 'node:http';
import { cleanupAll, runVmExpectingExit, startVm, tempDir, waitFor } from '../helpers/vm.js';

after(cleanupAll);

function get(url: string): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    http
      .get(url, (res) => {
        let body = '';
        res.on('data', (b: Buffer) => (body += b.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type']), body }));
      })
      .on('error', reject);
  });
}

/** The value of one series (name and labels as in the text), or undefined. */
function value(text: string, series: string): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith(series + ' ')) return Number(line.slice(series.length + 1));
  }
  return undefined;
}

describe('-metrics', () => {
  it('serves the migration statistics during and after a migration', { timeout: 60000 }, async () => {
    const dir = tempDir();
    const guest = ['-m', '64M', '-workload', 'stress,rate=8M,seed=4', '-fill', 'text,seed=4'];
    const [src, dst] = await Promise.all([
      startVm({ dir, name: 'src', args: [...guest, '-name', 'guest1', '-metrics', 'tcp:127.0.0.1:0'] }),
      startVm({ dir, name: 'dst', args: [...guest.slice(0, 2), '-incoming', `unix:${dir}/m.sock`] }),
    ]);
    const url = (await waitFor(() => /metrics on (http:\/\/\S+)/.exec(src.stderr)?.[1], 10000, 'the metrics address'))!;
    assert.match(url, /^http:\/\/127\.0\.0\.1:\d+\/metrics$/);

    const idle = await get(url);
    assert.equal(idle.status, 200);
    assert.match(idle.type, /^text\/plain; version=0\.0\.4/);
    assert.equal(value(idle.body, 'ferry_migration_status{side="source",status="none",guest="guest1"}'), 1);
    assert.equal(value(idle.body, 'ferry_migrations_total{side="source",result="completed",guest="guest1"}'), 0);
    assert.match(idle.body, /# TYPE ferry_migration_ram_remaining_bytes gauge/);

    // dirty-bitmap: exact (page-sampling's default 512 pages per GiB see about 32 pages of 64 MiB, often none dirty in 0.2 s)
    await src.api.calcDirtyRate({ 'calc-time': 200, 'calc-time-unit': 'millisecond', mode: 'dirty-bitmap' });
    await waitFor(async () => (await src.api.queryDirtyRate()).status === 'measured', 5000, 'the measurement');
    const measured = (await src.api.queryDirtyRate())['dirty-rate']!;
    assert.ok(measured > 0, `dirty-rate ${measured} MiB/s`);
    await src.api.migrateSetParameters({ 'max-bandwidth': 30_000_000 });
    await src.api.migrate({ uri: `unix:${dir}/m.sock` });
    // a scrape while it runs
    const during = await waitFor(async () => {
      const r = await get(url);
      return value(r.body, 'ferry_migration_status{side="source",status="active",guest="guest1"}') === 1 &&
        (value(r.body, 'ferry_migration_ram_transferred_bytes{side="source",guest="guest1"}') ?? 0) > 0 &&
        value(r.body, 'ferry_migration_eta_seconds{guest="guest1"}') !== undefined
        ? r
        : null;
    }, 20000, 'an active scrape', 50);
    // the forecast's ETA: 64 MiB at 30 MB/s is a few seconds at most
    const eta = value(during!.body, 'ferry_migration_eta_seconds{guest="guest1"}')!;
    assert.ok(eta >= 0 && eta < 30, `eta ${eta} s`);
    const remaining = value(during!.body, 'ferry_migration_ram_remaining_bytes{side="source",guest="guest1"}')!;
    assert.ok(remaining > 0 && remaining <= 64 << 20, `remaining ${remaining}`);
    assert.equal(value(during!.body, 'ferry_migration_ram_total_bytes{side="source",guest="guest1"}'), 64 << 20);
    assert.equal(value(during!.body, 'ferry_dirty_rate_bytes_per_second{guest="guest1"}'), measured * (1 << 20));
    await waitFor(async () => (await src.api.queryMigrate()).status === 'completed', 30000, 'the migration', 50);
    const end = await get(url);
    assert.equal(value(end.body, 'ferry_migration_status{side="source",status="completed",guest="guest1"}'), 1);
    assert.equal(value(end.body, 'ferry_migrations_total{side="source",result="completed",guest="guest1"}'), 1);
    assert.ok((value(end.body, 'ferry_migration_downtime_seconds{side="source",guest="guest1"}') ?? -1) >= 0);
    assert.equal((await get(url.replace(/metrics$/, 'other'))).status, 404);
    await dst.quit();
    await src.quit();
  });

  it('refuses a bad address at start', async () => {
    const r = await runVmExpectingExit(['-m', '16M', '-metrics', 'udp:1.2.3.4:5']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /-metrics udp:1\.2\.3\.4:5: expected tcp:HOST:PORT/);
    const r2 = await runVmExpectingExit(['-m', '16M', '-metrics', 'tcp:127.0.0.1:99999']);
    assert.equal(r2.code, 1);
    assert.match(r2.stderr, /port 99999 is out of range/);
  });
});
