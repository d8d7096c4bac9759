/**
 * Postcopy between two real `ferry vm` processes (docs/spec/stream-format.md §11,
 * docs/spec/qmp.md B.9, C, E.4, E.5): convergence for a guest precopy cannot catch,
 * a guest that runs on the destination before its RAM has arrived, the
 * statistics, release-ram, and what each side does when the other dies.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { runMigration, type MigrationSpec } from '../helpers/migration.js';
import { assertSweepPattern } from '../helpers/sweep.js';
import { cleanupAll, startVm, waitFor, waitMigration, type VmHandle } from '../helpers/vm.js';

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

const startPostcopy: MigrationSpec['during'] = ({ src }) => src.execute('migrate-start-postcopy');

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
    // -S: the destination stays paused, so its RAM is the source's at the switch;
    // the harness: completed on both sides, source postmigrate, destination paused, digests equal
    const { info, events } = await runMigration({
      guest: { mem: '64M', smp: 2, workload: 'stress,rate=64M,seed=11', fill: 'random,seed=2' },
      capabilities: ['postcopy-ram', 'events'],
      destination: { capabilities: ['postcopy-ram', 'events'] },
      // 64 MiB/s of dirtying against 32 MB/s of bandwidth: precopy never gets there
      source: { parameters: { 'max-bandwidth': 32e6 } },
      during: async ({ src }) => {
        const during = (await waitFor(async () => {
          const i = await src.execute<Record<string, any>>('query-migrate');
          return i.ram?.['dirty-sync-count'] >= 3 ? i : null;
        }, 30000, 'three passes'))!;
        assert.equal(during.status, 'active', 'still iterating after three passes');
        assert.ok(during.ram.remaining > 10 << 20, `much still dirty: ${during.ram.remaining}`);
        assert.deepEqual(await src.execute('migrate-start-postcopy'), {});
      },
      expect: { events: { source: ['setup', 'active', 'postcopy-active', 'completed'] } },
      after: async ({ d }) => {
        await d.execute('cont');
        assert.equal(await d.status(), 'running');
      },
    });
    assert.deepEqual(events.destination.filter((s) => s !== 'setup'), ['active', 'postcopy-active', 'completed']);
    assert.equal(info.ram.remaining, 0);
    assert.ok(info.downtime >= 0 && info.downtime < info['total-time']);
    assert.equal(info.ram['postcopy-requests'], 0, 'a paused destination asks for nothing');
  });
});

describe('postcopy: the guest runs on the destination before its RAM is there', () => {
  it('reads fault, pages are requested, and the guest ends exactly where a run without migration ends', async () => {
    const STEPS = 40000;
    // 5000 steps/s: still running at the switch, done on the destination
    const guest = { mem: '64M', smp: 2, workload: `stress,rate=40M,seed=3,read=on,steps=${STEPS}`, fill: 'text,seed=4' };
    let ref: VmHandle | undefined;
    // completed on both sides, the destination running (no -S)
    await runMigration({
      guest,
      destination: { ...guest, paused: false },
      capabilities: ['postcopy-ram'],
      source: { parameters: { 'max-bandwidth': 8e6 } },
      before: async ({ dir }) => {
        ref = await startVm({ dir, name: 'ref', args: ['-m', guest.mem, '-smp', String(guest.smp), '-workload', guest.workload, '-fill', guest.fill] });
      },
      during: async ({ src }) => {
        // early: before the first pass is over, most of RAM is still to come
        await new Promise((r) => setTimeout(r, 300));
        await src.execute('migrate-start-postcopy');
      },
      after: async ({ info, d }) => {
        assert.ok(info.ram['postcopy-requests'] > 0, `requests: ${info.ram['postcopy-requests']}`);
        const faults = await d.execute<Record<string, number>>('x-query-page-faults');
        assert.ok(faults.faults > 0 && faults.samples > 0, JSON.stringify(faults));
        assert.ok(faults['p50-us'] > 0 && faults['p99-us'] >= faults['p50-us']);
        // every page the source requested counted once per request
        assert.ok(info.ram['postcopy-requests'] <= faults.faults, JSON.stringify({ info, faults }));

        const got = await workloadDone(d, STEPS);
        const want = await workloadDone(ref!, STEPS);
        assert.deepEqual(got.map((v) => v.sum), want.map((v) => v.sum), 'what the guest read');
        assert.equal(await d.digest(), await ref!.digest(), 'what the guest wrote');
      },
    });
    await ref!.quit();
  });

  it('the sweep pattern verifies on the destination', async () => {
    // completed on both sides, the destination running
    await runMigration({
      guest: { mem: '32M', workload: 'sweep' },
      destination: { workload: 'sweep', paused: false },
      capabilities: ['postcopy-ram'],
      source: { parameters: { 'max-bandwidth': 4e6 } },
      during: async ({ src }) => {
        await new Promise((r) => setTimeout(r, 200));
        await src.execute('migrate-start-postcopy');
      },
      after: async ({ d, dir }) => {
        await d.execute('stop');
        const file = join(dir, 'dst.ram');
        await d.execute('pmemsave', { val: 0, size: 32 << 20, filename: file });
        const ram = readFileSync(file);
        assertSweepPattern(ram, 1 << 20, 32 << 20);
      },
    });
  });
});

describe('postcopy: release-ram', () => {
  it('the source gives the memory of sent pages back (RSS falls); the destination has it all', async () => {
    let digest = '';
    let before = 0;
    // completed on both sides; the source gave its pages back, so the
    // destination is compared with the source's digest from before
    await runMigration({
      guest: { mem: '256M', fill: 'random,seed=9' },
      // postcopy-ram goes to the destination too, release-ram does not
      capabilities: ['postcopy-ram', 'release-ram'],
      source: { parameters: { 'max-bandwidth': 20e6 } },
      before: async ({ src }) => {
        digest = await src.digest();
        before = rssBytes(src.proc.pid!);
        assert.ok(before > 200 << 20, `guest RAM is resident: ${before}`);
      },
      during: startPostcopy,
      expect: { digests: false },
      after: async ({ src, d }) => {
        const afterRss = rssBytes(src.proc.pid!);
        assert.ok(before - afterRss > 200 << 20, `RSS ${before} -> ${afterRss}`);
        assert.equal(await d.digest(), digest);
      },
    });
  });
});

describe('postcopy: failures', () => {
  /** A pair in the postcopy phase: a big random guest so the phase lasts. */
  async function inPostcopy(name: string) {
    const guest = { mem: '1G', workload: 'stress,rate=16M,seed=1,read=on', fill: 'random,seed=5' };
    const m = await runMigration({
      guest,
      destination: { ...guest, paused: false },
      transport: (dir) => ({ uri: `unix:${join(dir, `${name}.sock`)}` }),
      capabilities: ['postcopy-ram'],
      source: { parameters: { 'max-bandwidth': 10e6 } },
      during: async ({ src, d }) => {
        await src.execute('migrate-start-postcopy');
        await waitFor(async () => (await d.execute<any>('query-migrate')).status === 'postcopy-active', 20000, 'postcopy-active', 5);
      },
      // the test decides how it ends
      expect: { source: null },
      quit: false,
    });
    return { src: m.src, dst: m.d };
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
    const { info, dinfo } = await runMigration({
      guest: { mem: '64M', workload: 'stress,rate=8M', fill: 'random,seed=1' },
      destination: { paused: false, capabilities: [] },
      capabilities: ['postcopy-ram', 'events'],
      source: { parameters: { 'max-bandwidth': 8e6 } },
      during: startPostcopy,
      expect: {
        source: 'failed',
        events: { source: ['setup', 'active', 'postcopy-active', 'failed'] },
        // it said so before PONG 3, so its guest never ran: ours goes on
        sourceRunState: 'running',
        destination: 'failed',
        destinationRunState: 'inmigrate',
      },
    });
    assert.equal(info['error-desc'], 'Destination reported failure (SHUT 1)');
    assert.match(dinfo!['error-desc'], /CMD_POSTCOPY_(RAM_DISCARD|LISTEN) in wrong postcopy state \(0\)/);
  });
});

describe('postcopy: misuse', () => {
  it('start-postcopy without the capability, before migrate, twice; postcopy-ram with compress', async () => {
    // completed on both sides, digests equal
    await runMigration({
      guest: { mem: '32M', workload: 'stress,rate=8M', fill: 'random,seed=1' },
      source: { parameters: { 'max-bandwidth': 4e6 } },
      before: async ({ src, d }) => {
        await assert.rejects(src.execute('migrate-start-postcopy'),
          gen('Enable postcopy with migrate_set_capability before the start of migration'));
        await caps(src, { 'postcopy-ram': true });
        await assert.rejects(src.execute('migrate-start-postcopy'), gen('Postcopy must be started after migration has been started'));
        await assert.rejects(caps(src, { compress: true }), gen('Postcopy is not currently compatible with compression'));
        await caps(d, { 'postcopy-ram': true });
      },
      during: async ({ src }) => {
        assert.deepEqual(await src.execute('migrate-start-postcopy'), {});
        assert.deepEqual(await src.execute('migrate-start-postcopy'), {});
        await assert.rejects(caps(src, { 'postcopy-ram': false }), gen("There's a migration process in progress"));
      },
      after: async ({ src }) => {
        // after the end: still {} (QEMU does not complain, to avoid races)
        assert.deepEqual(await src.execute('migrate-start-postcopy'), {});
      },
    });
  });

  it('postcopy-ram on the source alone still migrates by precopy when no switch is asked for', async () => {
    // completed on both sides, digests equal
    await runMigration({
      guest: { mem: '32M', fill: 'random,seed=1' },
      capabilities: ['postcopy-ram'],
      destination: { capabilities: [] },
      source: { parameters: {} },
    });
  });
});
