/**
 * COLO with disks between real `ferry vm` processes (docs/colo.md,
 * "Disks"): the primary's guest runs a disk workload on a replicated drive
 * (the quorum with an NBD replication child), the secondary's replicated
 * drive keeps the active and hidden overlays over its exported disk, and
 * the COLO session drives the replication: every checkpoint is a
 * replication checkpoint, a failover a replication failover.
 *
 * The disk workload is a pure function of its seed and step count (each
 * step reads one sector into its checksum and writes one block), so a
 * reference run in this process says what the disk and the checksum must be
 * at any step. A disk that holds writes from after the checkpoint the
 * guest resumed from (the primary's, or the standby's own) shows in the
 * checksum of the steps that read them, and in the digest.
 *
 * - checkpoints taken with the primary stopped: the secondary's disk
 *   (the guest's view and the secondary disk) equals the primary's, and
 *   both equal the reference run at the workload's step;
 * - the primary killed at random (seeded) moments: after the failover the
 *   secondary's disk and checksum equal the reference run at its step;
 * - the refusals: a disk workload on a drive that is not replicated, and a
 *   secondary without the export (the migration fails, the primary runs on).
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { capabilities, runMigration, type Migration } from '../helpers/migration.js';
import { cleanupAll, startVm, tempDir, waitFor, waitMigration, type QmpProcess } from '../helpers/vm.js';
import { DiskWorkload, resolveDiskWorkload } from '../../src/machine/disk-workload.js';
import type { Drive } from '../../src/machine/drives.js';
import { Xorshift128 } from '../../src/machine/workload.js';

after(cleanupAll);

const M = 1 << 20;
const SIZE = 4 * M;
/** The workload: a 256 KiB working set rewritten densely, one sector read per step. */
const WL = { start: 0, wss: 256 * 1024, write: 4096, seed: 11, read: true, rate: 4 * M };
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

function initialDisk(): Buffer {
  const b = Buffer.alloc(SIZE);
  for (let i = 0; i < SIZE; i += 4) b.writeUInt32LE((i * 2654435761) >>> 0, i);
  return b;
}

/** The disk and checksum the workload leaves after `steps` steps, from the initial disk (computed here). */
async function reference(steps: number): Promise<{ digest: string; sum: number }> {
  const mem = initialDisk();
  const drive = {
    name: 'ref',
    size: SIZE,
    readOnly: false,
    ioStatus: 'ok',
    read: async (o: number, buf: Uint8Array) => void buf.set(mem.subarray(o, o + buf.length)),
    write: async (o: number, data: Uint8Array) => void mem.set(data, o),
  } as unknown as Drive;
  const w = new DiskWorkload(resolveDiskWorkload({ drive: 'ref', ...WL }, drive, ['ref']), drive, { vclockNs: () => 0, failed: () => undefined });
  await w.runSteps(steps);
  return { digest: sha(mem), sum: w.sum };
}

async function digests(vm: QmpProcess): Promise<Record<string, string>> {
  const d = await vm.execute<{ drives: { device: string; digest: string }[] }>('x-query-block-digest');
  return Object.fromEntries(d.drives.map((x) => [x.device, x.digest]));
}

async function workload(vm: QmpProcess): Promise<{ device: string; steps: number; sum: number; error?: string }> {
  const w = (await vm.execute<any[]>('x-query-disk-workload'))[0];
  assert.equal(w.error, undefined, `disk workload error: ${w.error}`);
  return w;
}

async function colo(vm: QmpProcess): Promise<Record<string, any>> {
  return vm.execute('query-colo-status');
}

async function moreCheckpoints(vm: QmpProcess, n: number): Promise<void> {
  const from = (await colo(vm))['x-checkpoints'];
  await waitFor(async () => (await colo(vm))['x-checkpoints'] >= from + n, 20000, `${n} more checkpoints`);
}

function primaryDrive(dir: string, sock: string): string {
  return (
    `if=virtio,id=colo1,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.file.filename=${join(dir, 'p.raw')},children.0.driver=raw,` +
    `children.1.driver=replication,children.1.mode=primary,children.1.file.driver=nbd,children.1.file.path=${sock},children.1.file.export=colo1`
  );
}

const diskWorkloadArg = `drive=colo1,start=${WL.start},wss=${WL.wss},write=${WL.write},seed=${WL.seed},read=on,rate=${WL.rate}`;

/** A primary with a replicated drive and a disk workload, a secondary exporting its disk; migrated with x-colo, both in COLO. */
async function startPair(delay: number): Promise<{ m: Migration; src: QmpProcess; dst: QmpProcess; dir: string }> {
  const dir = tempDir('ferry-colo-disk-');
  const initial = initialDisk();
  writeFileSync(join(dir, 'p.raw'), initial);
  writeFileSync(join(dir, 's.raw'), initial);
  for (const f of ['a.qcow2', 'h.qcow2']) assert.equal(spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, f), String(SIZE)]).status, 0);
  const sock = join(dir, 'nbd.sock');
  const m = await runMigration({
    dir,
    guest: { mem: '16M' },
    source: {
      args: ['-drive', primaryDrive(dir, sock), '-disk-workload', diskWorkloadArg],
      parameters: { 'max-bandwidth': 0, 'x-checkpoint-delay': delay },
    },
    destination: {
      args: [
        '-drive', `if=none,driver=raw,file.filename=${join(dir, 's.raw')},id=colo1`,
        '-drive', `if=virtio,id=childs1,driver=replication,mode=secondary,top-id=childs1,file.file.filename=${join(dir, 'a.qcow2')},file.driver=qcow2,file.backing.file.filename=${join(dir, 'h.qcow2')},file.backing.driver=qcow2,file.backing.backing=colo1`,
      ],
      capabilities: ['x-colo', 'events'],
      paused: false,
    },
    capabilities: ['x-colo', 'events'],
    // the toolstack's part on the secondary: export its disk before the migration
    before: async (mm) => {
      await mm.d.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
      await mm.d.execute('nbd-server-add', { device: 'colo1', writable: true });
    },
    expect: { source: null },
    quit: false,
  });
  const src = m.src;
  const dst = m.d;
  await waitFor(async () => (await colo(dst))['x-checkpoints'] >= 1, 20000, 'the first checkpoint');
  return { m, src, dst, dir };
}

/** A seeded PRNG for the kill moments (the same moments on every run). */
function moments(seed: number): () => number {
  const r = Xorshift128.seeded(seed, 7);
  return () => r.next() / 2 ** 32;
}

describe('COLO with disks (block replication driven by COLO)', { timeout: 120000 }, () => {
  it('every checkpoint is a replication checkpoint: the secondary disk equals the primary disk and the reference run', async () => {
    const { m, src, dst } = await startPair(150);
    assert.equal((await workload(dst)).device, 'childs1', "the primary's colo1 is the secondary's guest device childs1");
    let last = -1;
    for (let round = 0; round < 3; round++) {
      await src.execute('stop');
      // two checkpoints: one in flight at the stop may have been taken before it
      await moreCheckpoints(dst, 2);
      await waitFor(async () => (await dst.status()) === 'paused', 5000, 'the secondary mirrors the pause');
      const pw = await workload(src);
      const sw = await workload(dst);
      assert.ok(pw.steps > last, `the workload went on (${pw.steps} after ${last})`);
      last = pw.steps;
      assert.deepEqual({ steps: sw.steps, sum: sw.sum }, { steps: pw.steps, sum: pw.sum }, 'the secondary holds the primary workload at the checkpoint');
      const p = await digests(src);
      const s = await digests(dst);
      const ref = await reference(pw.steps);
      assert.equal(p.colo1, ref.digest, `round ${round}: the primary disk is the reference run at step ${pw.steps}`);
      assert.equal(pw.sum, ref.sum, 'the checksum is the reference run');
      assert.equal(s.childs1, p.colo1, `round ${round}: the secondary guest's disk equals the primary's at the checkpoint`);
      assert.equal(s.colo1, p.colo1, `round ${round}: the secondary disk equals the primary's`);
      await src.execute('cont');
      await waitFor(async () => (await workload(src)).steps > last + 50, 10000, 'the primary writes on');
    }
    assert.deepEqual(await src.execute('query-xen-replication-status'), { error: false });
    assert.deepEqual(await dst.execute('query-xen-replication-status'), { error: false });
    await m.quit();
  });

  it('the primary killed at random (seeded) moments: the secondary fails over to the disk of its checkpoint', async () => {
    const rnd = moments(13);
    for (let i = 0; i < 3; i++) {
      const { m, src, dst } = await startPair(100 + Math.floor(rnd() * 150));
      await new Promise((r) => setTimeout(r, 100 + rnd() * 500));
      src.kill();
      await waitFor(async () => /COLO message/.test((await colo(dst))['x-error'] ?? ''), 10000, 'the secondary reports the broken link');
      await dst.execute('x-colo-lost-heartbeat');
      await waitMigration(dst, ['completed'], 10000);
      // it runs on from the checkpoint; stop it anywhere and compare with the reference run
      await new Promise((r) => setTimeout(r, rnd() * 200));
      await dst.execute('stop');
      const w = await workload(dst);
      const ref = await reference(w.steps);
      const d = await digests(dst);
      assert.equal(w.sum, ref.sum, `iteration ${i}: the checksum at step ${w.steps} is the reference run's (no read saw a write from after the checkpoint)`);
      assert.equal(d.childs1, ref.digest, `iteration ${i}: the disk at step ${w.steps} is the reference run's`);
      assert.equal(d.colo1, ref.digest, `iteration ${i}: committed into the secondary disk`);
      assert.deepEqual(await dst.execute('query-xen-replication-status'), { error: false });
      // and it writes on, to the secondary disk itself
      await dst.execute('cont');
      await waitFor(async () => (await workload(dst)).steps > w.steps + 20, 10000, 'the workload goes on after the failover');
      await m.quit();
    }
  });

  it('refusals: a disk workload on a drive that is not replicated; a secondary that does not export its disk', async () => {
    const dir = tempDir('ferry-colo-disk-');
    writeFileSync(join(dir, 'plain.raw'), Buffer.alloc(M));
    const vm = await startVm({ dir, name: 'plain', args: ['-m', '16M', '-drive', `if=virtio,id=d0,format=raw,file=${join(dir, 'plain.raw')}`, '-disk-workload', 'drive=d0,rate=1M'] });
    await vm.execute('migrate-set-capabilities', capabilities(['x-colo']));
    await assert.rejects(vm.execute('migrate', { uri: `unix:${join(dir, 'none.sock')}` }), (e: any) => {
      assert.equal(e.errorClass, 'GenericError');
      assert.match(e.desc, /^COLO cannot replicate the disk workload's drive 'd0': it is not a replicated drive/);
      return true;
    });
    assert.equal((await vm.execute<any>('query-migrate')).status, undefined);
    await vm.quit();

    // a primary whose secondary has no NBD export: the migration fails with the connect error, the guest writes on
    writeFileSync(join(dir, 'p.raw'), initialDisk());
    const sec = await startVm({ dir, name: 'sec', args: ['-m', '16M', '-incoming', `unix:${join(dir, 'mig.sock')}`] });
    const pri = await startVm({ dir, name: 'pri', args: ['-m', '16M', '-drive', primaryDrive(dir, join(dir, 'nbd.sock')), '-disk-workload', diskWorkloadArg] });
    await pri.execute('migrate-set-capabilities', capabilities(['x-colo']));
    await pri.execute('migrate', { uri: `unix:${join(dir, 'mig.sock')}` });
    const info = await waitMigration(pri, ['failed', 'completed', 'colo'], 10000);
    assert.equal(info.status, 'failed');
    assert.match(info['error-desc'], /^Failed to connect to '.*nbd\.sock': No such file or directory$/);
    assert.equal(await pri.status(), 'running');
    const before = (await workload(pri)).steps;
    await waitFor(async () => (await workload(pri)).steps > before + 20, 10000, 'the primary writes on');
    await Promise.all([pri.quit(), sec.quit()]);
  });
});
