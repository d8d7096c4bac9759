/**
 * Postcopy between two real `ferry vm` processes (stream-format.md §11,
 * qmp.md B.9, C, E.4, E.5): convergence for a guest precopy cannot catch,
 * a guest that runs on the destination before its RAM has arrived, the
 * statistics, release-ram, and what each side does when the other dies.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { assertSweepPattern } from '../helpers/sweep.js';
import { cleanupAll, startVm, tempDir, waitFor, waitMigration, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const gen = (desc: string) => (e: any) => {
  assert.equal(e.errorClass, 'GenericError');
  assert.equal(e.desc, desc);
  return true;
};

async function caps(vm: VmHandle, list: Record<string, boolean>): Promise<void> {
  await vm.execute('migrate-set-capabilities', {
    capabilities: Object.entries(list).map(([capability, state]) => ({ capability, state })),
  });
}

function statuses(vm: VmHandle): string[] {
  return vm.qmp.eventLog.filter((e) => e.event === 'MIGRATION').map((e) => (e.data as any).status);
}

interface Vcpu {
  'cpu-index': number;
  steps: number;
  sum: number;
  blocked: boolean;
}

/** Wait until every vCPU reached its step limit; returns the workload state. */
async function workloadDone(vm: VmHandle, steps: number): Promise<Vcpu[]> {
  const w = await waitFor(async () => {
    const w = await vm.execute<Vcpu[]>('x-query-workload');
    return w.every((v) => v.steps === steps) ? w : null;
  }, 60000, `workload at ${steps} steps`, 100);
  return w!;
}

function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m![1]) * 1024;
}

describe('postcopy: a guest that precopy cannot catch', () => {
  it('stress never converges under precopy; postcopy completes with an identical digest', async () => {
    const dir = tempDir();
    const uri = `unix:${join(dir, 'pc.sock')}`;
    const wl = ['-workload', 'stress,rate=64M,seed=11', '-fill', 'random,seed=2'];
    const src = await startVm({ dir, name: 'src', args: ['-m', '64M', '-smp', '2', ...wl] });
    // -S: the destination stays paused, so its RAM is the source's at the switch
    const dst = await startVm({ dir, name: 'dst', args: ['-m', '64M', '-smp', '2', '-S', '-incoming', uri] });
    await caps(src, { 'postcopy-ram': true, events: true });
    await caps(dst, { 'postcopy-ram': true, events: true });
    // 64 MiB/s of dirtying against 32 MB/s of bandwidth: precopy never gets there
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 32e6 });
    await src.execute('migrate', { uri });
    const during = (await waitFor(async () => {
      const i = await src.execute<Record<string, any>>('query-migrate');
      return i.ram?.['dirty-sync-count'] >= 3 ? i : null;
    }, 30000, 'three passes'))!;
    assert.equal(during.status, 'active', 'still iterating after three passes');
    assert.ok(during.ram.remaining > 10 << 20, `much still dirty: ${during.ram.remaining}`);
    assert.deepEqual(await src.execute('migrate-start-postcopy'), {});
    const info = await waitMigration(src);
    assert.equal(info.status, 'completed', JSON.stringify(info));
    const dinfo = await waitMigration(dst);
    assert.equal(dinfo.status, 'completed', JSON.stringify(dinfo));
    assert.deepEqual(statuses(src), ['setup', 'active', 'postcopy-active', 'completed']);
    assert.deepEqual(statuses(dst).filter((s) => s !== 'setup'), ['active', 'postcopy-active', 'completed']);
    assert.equal(await src.status(), 'postmigrate');
    assert.equal(await dst.status(), 'paused');
    assert.equal(await dst.digest(), await src.digest());
    assert.equal(info.ram.remaining, 0);
    assert.ok(info.downtime >= 0 && info.downtime < info['total-time']);
    assert.equal(info.ram['postcopy-requests'], 0, 'a paused destination asks for nothing');
    await dst.execute('cont');
    assert.equal(await dst.status(), 'running');
    await src.quit();
    await dst.quit();
  });
});

describe('postcopy: the guest runs on the destination before its RAM is there', () => {
  it('reads fault, pages are requested, and the guest ends exactly where a run without migration ends', async () => {
    const dir = tempDir();
    const uri = `unix:${join(dir, 'run.sock')}`;
    const STEPS = 40000;
    // 5000 steps/s: still running at the switch, done on the destination
    const args = ['-m', '64M', '-smp', '2', '-workload', `stress,rate=40M,seed=3,read=on,steps=${STEPS}`, '-fill', 'text,seed=4'];
    const src = await startVm({ dir, name: 'src', args });
    const dst = await startVm({ dir, name: 'dst', args: [...args, '-incoming', uri] });
    const ref = await startVm({ dir, name: 'ref', args });
    await caps(src, { 'postcopy-ram': true });
    await caps(dst, { 'postcopy-ram': true });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 8e6 });
    await src.execute('migrate', { uri });
    // early: before the first pass is over, most of RAM is still to come
    await new Promise((r) => setTimeout(r, 300));
    await src.execute('migrate-start-postcopy');
    const info = await waitMigration(src);
    assert.equal(info.status, 'completed', JSON.stringify(info));
    assert.equal((await waitMigration(dst)).status, 'completed');
    assert.equal(await dst.status(), 'running');
    assert.ok(info.ram['postcopy-requests'] > 0, `requests: ${info.ram['postcopy-requests']}`);
    const faults = await dst.execute<Record<string, number>>('x-query-page-faults');
    assert.ok(faults.faults > 0 && faults.samples > 0, JSON.stringify(faults));
    assert.ok(faults['p50-us'] > 0 && faults['p99-us'] >= faults['p50-us']);
    // every page the source requested counted once per request
    assert.ok(info.ram['postcopy-requests'] <= faults.faults, JSON.stringify({ info, faults }));

    const got = await workloadDone(dst, STEPS);
    const want = await workloadDone(ref, STEPS);
    assert.deepEqual(got.map((v) => v.sum), want.map((v) => v.sum), 'what the guest read');
    assert.equal(await dst.digest(), await ref.digest(), 'what the guest wrote');
    await src.quit();
    await dst.quit();
    await ref.quit();
  });

  it('the sweep pattern verifies on the destination', async () => {
    const dir = tempDir();
    const uri = `unix:${join(dir, 'sweep.sock')}`;
    const src = await startVm({ dir, name: 'src', args: ['-m', '32M', '-workload', 'sweep'] });
    const dst = await startVm({ dir, name: 'dst', args: ['-m', '32M', '-workload', 'sweep', '-incoming', uri] });
    await caps(src, { 'postcopy-ram': true });
    await caps(dst, { 'postcopy-ram': true });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 4e6 });
    await src.execute('migrate', { uri });
    await new Promise((r) => setTimeout(r, 200));
    await src.execute('migrate-start-postcopy');
    assert.equal((await waitMigration(src)).status, 'completed');
    assert.equal((await waitMigration(dst)).status, 'completed');
    await dst.execute('stop');
    const file = join(dir, 'dst.ram');
    await dst.execute('pmemsave', { val: 0, size: 32 << 20, filename: file });
    const ram = readFileSync(file);
    assertSweepPattern(ram, 1 << 20, 32 << 20);
    await src.quit();
    await dst.quit();
  });
});

describe('postcopy: release-ram', () => {
  it('the source gives the memory of sent pages back (RSS falls); the destination has it all', async () => {
    const dir = tempDir();
    const uri = `unix:${join(dir, 'rel.sock')}`;
    const src = await startVm({ dir, name: 'src', args: ['-m', '256M', '-fill', 'random,seed=9'] });
    const dst = await startVm({ dir, name: 'dst', args: ['-m', '256M', '-S', '-incoming', uri] });
    const digest = await src.digest();
    await caps(src, { 'postcopy-ram': true, 'release-ram': true });
    await caps(dst, { 'postcopy-ram': true });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 20e6 });
    const before = rssBytes(src.proc.pid!);
    assert.ok(before > 200 << 20, `guest RAM is resident: ${before}`);
    await src.execute('migrate', { uri });
    await src.execute('migrate-start-postcopy');
    assert.equal((await waitMigration(src)).status, 'completed');
    assert.equal((await waitMigration(dst)).status, 'completed');
    const afterRss = rssBytes(src.proc.pid!);
    assert.ok(before - afterRss > 200 << 20, `RSS ${before} -> ${afterRss}`);
    assert.equal(await dst.digest(), digest);
    await src.quit();
    await dst.quit();
  });
});

describe('postcopy: failures', () => {
  /** A pair in the postcopy phase: a big random guest so the phase lasts. */
  async function inPostcopy(name: string) {
    const dir = tempDir();
    const uri = `unix:${join(dir, `${name}.sock`)}`;
    const args = ['-m', '1G', '-workload', 'stress,rate=16M,seed=1,read=on', '-fill', 'random,seed=5'];
    const src = await startVm({ dir, name: 'src', args });
    const dst = await startVm({ dir, name: 'dst', args: [...args, '-incoming', uri] });
    await caps(src, { 'postcopy-ram': true });
    await caps(dst, { 'postcopy-ram': true });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 10e6 });
    await src.execute('migrate', { uri });
    await src.execute('migrate-start-postcopy');
    await waitFor(async () => (await dst.execute<any>('query-migrate')).status === 'postcopy-active', 20000, 'postcopy-active', 5);
    return { src, dst };
  }

  it('source killed during postcopy: the destination fails and never runs on with holes', async () => {
    const { src, dst } = await inPostcopy('ks');
    src.proc.kill('SIGKILL');
    const d = await waitMigration(dst);
    assert.equal(d.status, 'failed');
    assert.match(d['error-desc'], /^load of migration failed: /);
    assert.equal(await dst.status(), 'internal-error');
    await assert.rejects(dst.execute('cont'), gen('Resetting the Virtual Machine is required'));
    await assert.rejects(dst.execute('x-query-memory-digest'), (e: any) => e.errorClass === 'GenericError');
    await dst.quit();
  });

  it('destination killed during postcopy: the source fails and does not resume a stale copy', async () => {
    const { src, dst } = await inPostcopy('kd');
    dst.proc.kill('SIGKILL');
    const s = await waitMigration(src);
    assert.equal(s.status, 'failed');
    assert.ok(s['error-desc'], JSON.stringify(s));
    assert.equal(await src.status(), 'postmigrate');
    const q = await src.execute<Record<string, unknown>>('query-status');
    assert.equal(q.running, false);
    await src.quit();
  });

  it('migrate_cancel during postcopy: cancelled, and neither side runs a split guest', async () => {
    const { src, dst } = await inPostcopy('cancel');
    assert.deepEqual(await src.execute('migrate_cancel'), {});
    const s = await waitMigration(src);
    assert.equal(s.status, 'cancelled');
    assert.equal(await src.status(), 'postmigrate');
    const d = await waitMigration(dst);
    assert.equal(d.status, 'failed');
    assert.equal(await dst.status(), 'internal-error');
    await src.quit();
    await dst.quit();
  });

  it('a destination without postcopy-ram fails the switch before its guest ran: the source resumes', async () => {
    const dir = tempDir();
    const uri = `unix:${join(dir, 'nocap.sock')}`;
    const src = await startVm({ dir, name: 'src', args: ['-m', '64M', '-workload', 'stress,rate=8M', '-fill', 'random,seed=1'] });
    const dst = await startVm({ dir, name: 'dst', args: ['-m', '64M', '-incoming', uri] });
    await caps(src, { 'postcopy-ram': true, events: true });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 8e6 });
    await src.execute('migrate', { uri });
    await src.execute('migrate-start-postcopy');
    const s = await waitMigration(src);
    assert.equal(s.status, 'failed');
    assert.equal(s['error-desc'], 'Destination reported failure (SHUT 1)');
    assert.deepEqual(statuses(src), ['setup', 'active', 'postcopy-active', 'failed']);
    // it said so before PONG 3, so its guest never ran: ours goes on
    assert.equal(await src.status(), 'running');
    const d = await waitMigration(dst);
    assert.equal(d.status, 'failed');
    assert.match(d['error-desc'], /CMD_POSTCOPY_(RAM_DISCARD|LISTEN) in wrong postcopy state \(0\)/);
    assert.equal(await dst.status(), 'inmigrate');
    await src.quit();
    await dst.quit();
  });
});

describe('postcopy: misuse', () => {
  it('start-postcopy without the capability, before migrate, twice; postcopy-ram with compress', async () => {
    const dir = tempDir();
    const uri = `unix:${join(dir, 'mu.sock')}`;
    const src = await startVm({ dir, name: 'src', args: ['-m', '32M', '-workload', 'stress,rate=8M', '-fill', 'random,seed=1'] });
    const dst = await startVm({ dir, name: 'dst', args: ['-m', '32M', '-S', '-incoming', uri] });
    await assert.rejects(src.execute('migrate-start-postcopy'),
      gen('Enable postcopy with migrate_set_capability before the start of migration'));
    await caps(src, { 'postcopy-ram': true });
    await assert.rejects(src.execute('migrate-start-postcopy'), gen('Postcopy must be started after migration has been started'));
    await assert.rejects(caps(src, { compress: true }), gen('Postcopy is not currently compatible with compression'));
    await caps(dst, { 'postcopy-ram': true });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 4e6 });
    await src.execute('migrate', { uri });
    assert.deepEqual(await src.execute('migrate-start-postcopy'), {});
    assert.deepEqual(await src.execute('migrate-start-postcopy'), {});
    await assert.rejects(caps(src, { 'postcopy-ram': false }), gen("There's a migration process in progress"));
    const info = await waitMigration(src);
    assert.equal(info.status, 'completed');
    assert.equal((await waitMigration(dst)).status, 'completed');
    assert.equal(await dst.digest(), await src.digest());
    // after the end: still {} (QEMU does not complain, to avoid races)
    assert.deepEqual(await src.execute('migrate-start-postcopy'), {});
    await src.quit();
    await dst.quit();
  });

  it('postcopy-ram on the source alone still migrates by precopy when no switch is asked for', async () => {
    const dir = tempDir();
    const uri = `unix:${join(dir, 'pre.sock')}`;
    const src = await startVm({ dir, name: 'src', args: ['-m', '32M', '-fill', 'random,seed=1'] });
    const dst = await startVm({ dir, name: 'dst', args: ['-m', '32M', '-S', '-incoming', uri] });
    await caps(src, { 'postcopy-ram': true });
    await src.execute('migrate', { uri });
    assert.equal((await waitMigration(src)).status, 'completed');
    assert.equal((await waitMigration(dst)).status, 'completed');
    assert.equal(await dst.digest(), await src.digest());
    await src.quit();
    await dst.quit();
  });
});
