/**
 * `ferry migrate SRC DST`: the virsh-migrate flow against two monitors
 * (Ferry → Ferry with a report and the digest check, QEMU 7.2 → QEMU 7.2),
 * the progress lines with the ETA, the result table; and its refusals.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { QEMU_RAM_ARGS, QEMU_SKIP, cleanupQemu, startQemu } from '../helpers/qemu.js';
import { cleanupAll, runFerry, startVm, tempDir } from '../helpers/vm.js';

after(async () => {
  await cleanupQemu();
  await cleanupAll();
});

const ferryMigrate = (args: string[], timeoutMs = 90000) => runFerry(['migrate', ...args], timeoutMs);

describe('ferry migrate', () => {
  it('Ferry → Ferry: capabilities and parameters on both, progress with the ETA, the result, verified, a report', { timeout: 120000 }, async () => {
    const dir = tempDir();
    const guest = ['-m', '64M', '-smp', '2', '-workload', 'stress,rate=8M,seed=6', '-fill', 'text,seed=6'];
    const [src, dst] = await Promise.all([
      startVm({ dir, name: 'src', args: guest }),
      startVm({ dir, name: 'dst', args: [...guest.slice(0, 4), '-S', '-incoming', 'defer'] }),
    ]);
    await src.api.calcDirtyRate({ 'calc-time': 300, 'calc-time-unit': 'millisecond' });
    await new Promise((r) => setTimeout(r, 400));
    const report = join(dir, 'out', 'run.html');
    const r = await ferryMigrate([
      src.sock, `unix:${dst.sock}`, '--uri', `unix:${dir}/m.sock`, '--caps', 'xbzrle',
      '--param', 'max-bandwidth=40000000', '--param', 'downtime-limit=200', '--verify', '--report', report, '--no-progress',
    ]);
    const all = `${r.out}\n${r.err}`;
    assert.equal(r.code, 0, all);
    assert.match(r.out, /source .*: Ferry 2\.10\.0 \(ferry-0\.1\.0\), running/, all);
    assert.match(r.out, /capabilities: xbzrle, events, return-path; parameters: max-bandwidth=40000000 downtime-limit=200/, all);
    assert.match(r.out, /destination: migrate-incoming unix:/, all);
    assert.match(r.out, /forecast: converges as set up/, all);
    assert.match(r.out, /\[\s*[\d.]+ s\] active .* ETA (\d|-)/, all);
    assert.match(r.out, /status\s*│\s*completed \(source postmigrate, destination migration completed\)/, all);
    assert.match(r.out, /memory digests equal\s*│\s*yes: source ([0-9a-f]{12})\s+destination \1/, all);
    assert.match(r.out, new RegExp(`report: ${report.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`), all);
    assert.ok(existsSync(report) && existsSync(report.replace(/html$/, 'json')));
    // the settings reached both sides
    for (const vm of [src, dst]) {
      assert.equal((await vm.api.queryMigrateParameters())['downtime-limit'], 200);
      assert.ok((await vm.api.queryMigrateCapabilities()).some((c) => c.capability === 'xbzrle' && c.state));
    }
    assert.match(readFileSync(report, 'utf8'), /VERIFIED: x-query-memory-digest/);
  });

  it('QEMU 7.2 → QEMU 7.2, the ETA estimated from the throughput', { skip: QEMU_SKIP, timeout: 120000 }, async () => {
    const dir = tempDir('ferry-migrate-qemu-');
    const [qs, qd] = await Promise.all([
      startQemu({ dir, name: 'qs', args: QEMU_RAM_ARGS }),
      startQemu({ dir, name: 'qd', args: [...QEMU_RAM_ARGS, '-incoming', 'defer'] }),
    ]);
    // QEMU's monitor serves one client: the harness lets go of it
    await qs.qmp.close();
    await qd.qmp.close();
    const r = await ferryMigrate([qs.sock, qd.sock, '--uri', `unix:${dir}/m.sock`, '--no-progress', '--param', 'max-bandwidth=8000000']);
    const all = `${r.out}\n${r.err}`;
    assert.equal(r.code, 0, all);
    assert.match(r.out, /source .*: QEMU 7\.2\.\d+/, all);
    assert.match(r.out, /status\s*│\s*completed/, all);
    assert.doesNotMatch(r.out, /forecast:/, all);
  });

  it('refuses bad usage (exit 2) and reports a refusal from a monitor (exit 1)', { timeout: 60000 }, async () => {
    const u = await ferryMigrate(['a.sock']);
    assert.equal(u.code, 2);
    assert.match(u.err, /expected two monitors/);
    const u2 = await ferryMigrate(['a.sock', 'b.sock']);
    assert.equal(u2.code, 2);
    assert.match(u2.err, /--uri is required/);
    const u3 = await ferryMigrate(['a.sock', 'b.sock', '--uri', 'unix:x', '--postcopy-after', '1']);
    assert.equal(u3.code, 2);
    assert.match(u3.err, /--postcopy-after needs --caps postcopy-ram/);
    const u4 = await ferryMigrate(['a.sock', 'b.sock', '--uri', 'unix:x', '--caps', 'x-colo']);
    assert.equal(u4.code, 2);
    assert.match(u4.err, /--caps x-colo: COLO does not complete/);
    const dir = tempDir();
    const [src, dst] = await Promise.all([
      startVm({ dir, name: 'src', args: ['-m', '16M'] }),
      startVm({ dir, name: 'dst', args: ['-m', '16M', '-incoming', 'defer'] }),
    ]);
    const r = await ferryMigrate([src.sock, dst.sock, '--uri', `unix:${dir}/m.sock`, '--caps', 'compress,postcopy-ram', '--no-progress']);
    assert.equal(r.code, 1);
    assert.match(r.err, /ferry migrate: migrate-set-capabilities: GenericError: Postcopy is not currently compatible with compression/);
    // nothing started
    assert.equal((await src.api.queryMigrate()).status, undefined);
    assert.equal((await dst.api.queryStatus()).status, 'inmigrate');
  });
});
