/**
 * Block replication with QEMU 7.2 as the other side, both ways, driven as
 * Xen's toolstack drives them (QEMU's replication and quorum drivers,
 * started with QEMU's own command lines from docs/block-replication.txt):
 * - a QEMU primary (its writes made with HMP qemu-io) mirrors into a Ferry
 *   secondary: the secondary disk follows, the replicated drive shows them
 *   after xen-colo-do-checkpoint;
 * - a Ferry primary (a disk workload) mirrors into a QEMU secondary: the
 *   secondary disk follows; after QEMU's failover it is back at the
 *   checkpoint (the files compared).
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { QEMU_SKIP, startQemu } from '../helpers/qemu.js';
import { cleanupAll, startVm, tempDir, waitFor, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const M = 1 << 20;
const SIZE = 8 * M;
const fileSha = (p: string) => createHash('sha256').update(readFileSync(p)).digest('hex');

function images(dir: string): void {
  const initial = Buffer.alloc(SIZE);
  for (let i = 0; i < SIZE; i += 512) initial.writeUInt32LE(i ^ 0x5a5a5a5a, i);
  writeFileSync(join(dir, 'p.raw'), initial);
  writeFileSync(join(dir, 's.raw'), initial);
  for (const f of ['a.qcow2', 'h.qcow2']) assert.equal(spawnSync('qemu-img', ['create', '-f', 'qcow2', join(dir, f), String(SIZE)]).status, 0);
}

const secondaryDrives = (dir: string, iface: string) => [
  '-drive', `if=none,driver=raw,file.filename=${join(dir, 's.raw')},id=colo1`,
  '-drive', `if=${iface},id=childs1,driver=replication,mode=secondary,top-id=childs1,file.file.filename=${join(dir, 'a.qcow2')},file.driver=qcow2,file.backing.file.filename=${join(dir, 'h.qcow2')},file.backing.driver=qcow2,file.backing.backing=colo1`,
];
const primaryDrive = (dir: string, sock: string, iface: string) => [
  '-drive',
  `if=${iface},id=colo1,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.file.filename=${join(dir, 'p.raw')},children.0.driver=raw,` +
    `children.1.driver=replication,children.1.mode=primary,children.1.file.driver=nbd,children.1.file.path=${sock},children.1.file.export=colo1`,
];

async function exportSecondary(vm: { execute<T>(c: string, a?: object): Promise<T> }, sock: string): Promise<void> {
  await vm.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await vm.execute('nbd-server-add', { device: 'colo1', writable: true });
  await vm.execute('xen-set-replication', { enable: true, primary: false });
}

describe('block replication with QEMU 7.2', { timeout: 120000, skip: QEMU_SKIP }, () => {
  it('a QEMU primary mirrors into a Ferry secondary', async () => {
    const dir = tempDir('ferry-repl-qemu-');
    images(dir);
    const sock = join(dir, 'nbd.sock');
    const sec: VmHandle = await startVm({ dir, name: 'sec', args: ['-S', '-m', '16M', ...secondaryDrives(dir, 'virtio')] });
    await exportSecondary(sec, sock);
    const before = await sec.execute<{ drives: { device: string; digest: string }[] }>('x-query-block-digest');
    const q = await startQemu({ dir, name: 'qpri', args: ['-machine', 'none', ...primaryDrive(dir, sock, 'none')] });
    await q.execute('xen-set-replication', { enable: true, primary: true });
    for (const cmd of ['write -P 0xab 4096 65536', 'write -P 0xcd 5000192 3072', 'write -z 7340032 8192']) {
      // (HMP qemu-io prints on QEMU's stdout; the digests below check the writes). Sector
      // aligned, as a guest's: QEMU's replication filter is sector based and cannot read the
      // padding of an unaligned write (its reads fail on the primary)
      await q.execute<string>('human-monitor-command', { 'command-line': `qemu-io colo1 "${cmd}"` });
    }
    assert.deepEqual(await q.execute('query-xen-replication-status'), { error: false });
    const d = await sec.execute<{ drives: { device: string; digest: string }[] }>('x-query-block-digest');
    assert.equal(d.drives[0]!.digest, fileSha(join(dir, 'p.raw')), "the secondary disk = QEMU's primary disk");
    assert.equal(d.drives[1]!.digest, before.drives[1]!.digest, 'the secondary guest sees nothing before the checkpoint');
    await sec.execute('xen-colo-do-checkpoint');
    const c = await sec.execute<{ drives: { device: string; digest: string }[] }>('x-query-block-digest');
    assert.equal(c.drives[1]!.digest, fileSha(join(dir, 'p.raw')));
    await q.execute('xen-set-replication', { enable: false, primary: true });
    await q.execute('quit').catch(() => undefined);
    await sec.quit();
  });

  it('a Ferry primary mirrors into a QEMU secondary, which fails over to the checkpoint', async () => {
    const dir = tempDir('ferry-repl-qemu-');
    images(dir);
    const sock = join(dir, 'nbd.sock');
    const q = await startQemu({ dir, name: 'qsec', args: ['-machine', 'none', ...secondaryDrives(dir, 'none')] });
    await exportSecondary(q, sock);
    const pri = await startVm({ dir, name: 'pri', args: ['-S', '-m', '16M', ...primaryDrive(dir, sock, 'virtio'), '-disk-workload', 'drive=colo1,rate=4M,seed=5'] });
    await pri.execute('xen-set-replication', { enable: true, primary: true });
    const steps = async () => (await pri.execute<{ steps: number }[]>('x-query-disk-workload'))[0]!.steps;
    await pri.execute('cont');
    await waitFor(async () => (await steps()) > 100, 20000, 'primary writes');
    await pri.execute('stop');
    assert.equal(fileSha(join(dir, 's.raw')), fileSha(join(dir, 'p.raw')), "QEMU's secondary disk = Ferry's primary disk");
    await q.execute('xen-colo-do-checkpoint');
    copyFileSync(join(dir, 'p.raw'), join(dir, 'checkpoint.raw'));
    const at = await steps();
    await pri.execute('cont');
    await waitFor(async () => (await steps()) > at + 100, 20000, 'primary writes after the checkpoint');
    await pri.execute('stop');
    assert.equal(fileSha(join(dir, 's.raw')), fileSha(join(dir, 'p.raw')));
    assert.notEqual(fileSha(join(dir, 'p.raw')), fileSha(join(dir, 'checkpoint.raw')));
    await q.execute('xen-set-replication', { enable: false, primary: false, failover: true });
    // QEMU commits in an internal job; its status says "I/O error occurred" until the commit is done
    await waitFor(async () => !(await q.execute<{ error: boolean }>('query-xen-replication-status')).error, 20000, "QEMU's commit job");
    await q.execute('quit').catch(() => undefined);
    await q.exited;
    assert.equal(fileSha(join(dir, 's.raw')), fileSha(join(dir, 'checkpoint.raw')), "QEMU's secondary disk is back at the checkpoint");
    // the secondary is gone: the primary says so, and its failover stop clears it
    await waitFor(async () => (await pri.execute<{ error: boolean }>('query-xen-replication-status')).error, 20000, 'the primary to see its peer gone');
    await pri.execute('xen-set-replication', { enable: false, primary: true, failover: true });
    assert.deepEqual(await pri.execute('query-xen-replication-status'), { error: false });
    await pri.quit();
  });
});
