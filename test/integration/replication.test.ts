/**
 * Block replication with real `ferry vm` processes, the test playing Xen's
 * toolstack (xen-set-replication, xen-colo-do-checkpoint,
 * query-xen-replication-status): a primary whose guest writes the first
 * half of an 8 MiB disk and a secondary whose guest writes the second half,
 * the secondary disk exported over NBD on a unix socket.
 *
 * - start, write, checkpoint, write, fail over: block digests at each step;
 *   after the failover the secondary disk holds the primary's half as it
 *   was at the checkpoint (read from the files) and the secondary's guest
 *   view (its own writes kept);
 * - the secondary killed while the primary's guest writes: the primary
 *   reports the error and its guest writes on;
 * - the primary killed: the secondary sees its peer gone, fails over to a
 *   consistent disk and runs on.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cleanupAll, startVm, tempDir, waitFor, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const M = 1 << 20;
const SIZE = 8 * M;
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Digests {
  [device: string]: string;
}

async function digests(vm: VmHandle): Promise<Digests> {
  const d = await vm.execute<{ drives: { device: string; digest: string }[] }>('x-query-block-digest');
  return Object.fromEntries(d.drives.map((x) => [x.device, x.digest]));
}

async function steps(vm: VmHandle): Promise<number> {
  const w = await vm.execute<{ steps: number; error?: string }[]>('x-query-disk-workload');
  assert.equal(w[0]!.error, undefined, `disk workload error: ${w[0]!.error}`);
  return w[0]!.steps;
}

async function status(vm: VmHandle): Promise<{ error: boolean; desc?: string }> {
  return vm.execute('query-xen-replication-status');
}

/** A secondary and a primary with replicated drives, both paused (-S); the secondary exports its disk. */
async function startPair(dir: string): Promise<{ pri: VmHandle; sec: VmHandle; sock: string }> {
  const initial = Buffer.alloc(SIZE);
  for (let i = 0; i < SIZE; i += 4096) initial.writeUInt32LE(i, i);
  writeFileSync(join(dir, 'p.raw'), initial);
  writeFileSync(join(dir, 's.raw'), initial);
  for (const f of ['a.qcow2', 'h.qcow2']) assert.equal(spawnSync('qemu-img', ['create', '-f', 'qcow2', join(dir, f), String(SIZE)]).status, 0);
  const sock = join(dir, 'nbd.sock');
  const sec = await startVm({
    dir,
    name: 'sec',
    args: [
      '-S', '-m', '16M',
      '-drive', `if=none,driver=raw,file.filename=${join(dir, 's.raw')},id=colo1`,
      '-drive', `if=virtio,id=childs1,driver=replication,mode=secondary,top-id=childs1,file.file.filename=${join(dir, 'a.qcow2')},file.driver=qcow2,file.backing.file.filename=${join(dir, 'h.qcow2')},file.backing.driver=qcow2,file.backing.backing=colo1`,
      '-disk-workload', `drive=childs1,start=${4 * M},wss=${4 * M},rate=1M,seed=2`,
    ],
  });
  await sec.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await sec.execute('nbd-server-add', { device: 'colo1', writable: true });
  const pri = await startVm({
    dir,
    name: 'pri',
    args: [
      '-S', '-m', '16M',
      '-drive',
      `if=virtio,id=colo1,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.file.filename=${join(dir, 'p.raw')},children.0.driver=raw,` +
        `children.1.driver=replication,children.1.mode=primary,children.1.file.driver=nbd,children.1.file.path=${sock},children.1.file.export=colo1`,
      '-disk-workload', `drive=colo1,wss=${4 * M},rate=4M,seed=1`,
    ],
  });
  return { pri, sec, sock };
}

/** The toolstack's start: secondary first, then primary; both guests run. */
async function startReplication(pri: VmHandle, sec: VmHandle): Promise<void> {
  assert.deepEqual(await status(sec), { error: true, desc: 'Block replication is not running' });
  await sec.execute('xen-set-replication', { enable: true, primary: false });
  await pri.execute('xen-set-replication', { enable: true, primary: true });
  assert.deepEqual(await status(sec), { error: false });
  assert.deepEqual(await status(pri), { error: false });
  await sec.execute('cont');
  await pri.execute('cont');
}

describe('block replication between two ferry vm processes (Xen toolstack)', { timeout: 180000 }, () => {
  it('start, write, checkpoint, write, fail over: digests at each step', async () => {
    const dir = tempDir('ferry-repl-');
    const { pri, sec } = await startPair(dir);
    const initial = (await digests(sec)).childs1!;
    await startReplication(pri, sec);
    await waitFor(async () => (await steps(pri)) > 100 && (await steps(sec)) > 20, 20000, 'both guests writing');

    // checkpoint 1: both stopped; the secondary disk already has every primary write
    await pri.execute('stop');
    await sec.execute('stop');
    const p1 = (await digests(pri)).colo1!;
    const s1 = await digests(sec);
    assert.equal(s1.colo1, p1, 'the secondary disk = the primary disk');
    assert.notEqual(s1.childs1, p1, "the secondary guest's view is not the primary's before the checkpoint");
    assert.notEqual(s1.childs1, initial, 'the secondary guest wrote');
    await sec.execute('xen-colo-do-checkpoint');
    await pri.execute('xen-colo-do-checkpoint');
    const c1 = await digests(sec);
    assert.equal(c1.childs1, p1, 'after the checkpoint the secondary guest sees the primary disk');
    copyFileSync(join(dir, 'p.raw'), join(dir, 'p-checkpoint.raw'));
    await sec.execute('cont');
    await pri.execute('cont');

    // both write on, then the primary "fails": the toolstack fails over the secondary
    const at = await steps(pri);
    await waitFor(async () => (await steps(pri)) > at + 100, 20000, 'the primary writing after the checkpoint');
    await pri.execute('stop');
    await sec.execute('stop');
    const p2 = (await digests(pri)).colo1!;
    const view = (await digests(sec)).childs1!;
    assert.notEqual(p2, p1);
    assert.equal((await digests(sec)).colo1, p2, 'mirrored up to the end');
    await sec.execute('xen-set-replication', { enable: false, primary: false, failover: true });
    assert.deepEqual(await status(sec), { error: false });
    const f = await digests(sec);
    assert.equal(f.colo1, view, "after the failover the secondary disk is the secondary guest's view");
    assert.equal(f.childs1, view);
    // from the files: the primary's half is exactly the checkpoint's, the secondary's half kept its writes
    const s = readFileSync(join(dir, 's.raw'));
    const ck = readFileSync(join(dir, 'p-checkpoint.raw'));
    assert.equal(sha(s.subarray(0, 4 * M)), sha(ck.subarray(0, 4 * M)), "the primary's writes after the checkpoint are undone");
    assert.notEqual(sha(s.subarray(4 * M)), sha(ck.subarray(4 * M)), "the secondary's writes since the checkpoint are kept");
    assert.equal(sha(s), view);

    // the promoted secondary runs on, on its disk
    await sec.execute('cont');
    const sAt = await steps(sec);
    await waitFor(async () => (await steps(sec)) > sAt + 5, 20000, 'the secondary writing after the failover');
    await sec.execute('stop');
    const g = await digests(sec);
    assert.equal(g.childs1, g.colo1);
    assert.notEqual(g.colo1, view);
    // the primary is told too: its mirror is off, it is healthy
    await pri.execute('xen-set-replication', { enable: false, primary: true, failover: true });
    assert.deepEqual(await status(pri), { error: false });
    // wrong-state calls
    await assert.rejects(pri.execute('xen-set-replication', { enable: true, primary: true, failover: false }), /Parameter 'failover' is only for stopping replication/);
    await pri.quit();
    await sec.quit();
  });

  it('the secondary killed during mirrored writes: the primary reports the error, its guest writes on', async () => {
    const dir = tempDir('ferry-repl-');
    const { pri, sec } = await startPair(dir);
    await startReplication(pri, sec);
    await waitFor(async () => (await steps(pri)) > 50, 20000, 'mirrored writes');
    sec.kill('SIGKILL');
    await sec.exited;
    const st = await waitFor(async () => {
      const s = await status(pri);
      return s.error ? s : null;
    }, 20000, 'the primary to see the failure');
    assert.deepEqual(st, { error: true, desc: 'I/O error occurred' });
    assert.match(pri.stderr, /block replication on drive colo1: (lost the connection to unix:.*nbd\.sock export 'colo1'|write of 4096 bytes at offset \d+ could not be mirrored)/);
    assert.equal(await pri.status(), 'running');
    const at = await steps(pri);
    await waitFor(async () => (await steps(pri)) > at + 50, 20000, "the primary's guest writing on");
    // the toolstack fails the primary over: healthy again, no longer mirroring
    await pri.execute('xen-set-replication', { enable: false, primary: true, failover: true });
    assert.deepEqual(await status(pri), { error: false });
    await pri.execute('stop');
    const d = (await digests(pri)).colo1!;
    assert.equal(sha(readFileSync(join(dir, 'p.raw'))), d);
    await pri.quit();
  });

  it('the primary killed: the secondary sees it gone and fails over to a consistent disk', async () => {
    const dir = tempDir('ferry-repl-');
    const { pri, sec } = await startPair(dir);
    await startReplication(pri, sec);
    await waitFor(async () => (await steps(pri)) > 50, 20000, 'mirrored writes');
    await pri.execute('stop');
    await sec.execute('stop');
    await sec.execute('xen-colo-do-checkpoint');
    copyFileSync(join(dir, 's.raw'), join(dir, 's-checkpoint.raw'));
    await pri.execute('cont');
    await sec.execute('cont');
    const at = await steps(pri);
    await waitFor(async () => (await steps(pri)) > at + 50, 20000, 'writes after the checkpoint');
    pri.kill('SIGKILL');
    const st = await waitFor(async () => {
      const s = await status(sec);
      return s.error ? s : null;
    }, 20000, 'the secondary to see its peer gone');
    assert.deepEqual(st, { error: true, desc: 'I/O error occurred' });
    assert.match(sec.stderr, /block replication on drive childs1: the primary's NBD connection was lost/);
    await sec.execute('stop');
    const view = (await digests(sec)).childs1!;
    await sec.execute('xen-set-replication', { enable: false, primary: false, failover: true });
    await sec.execute('nbd-server-stop');
    const f = await digests(sec);
    assert.equal(f.colo1, view);
    const s = readFileSync(join(dir, 's.raw'));
    assert.equal(sha(s.subarray(0, 4 * M)), sha(readFileSync(join(dir, 's-checkpoint.raw')).subarray(0, 4 * M)), 'the primary half is the checkpoint\'s');
    await sec.execute('cont');
    const sAt = await steps(sec);
    await waitFor(async () => (await steps(sec)) > sAt + 3, 20000, 'the secondary running on');
    assert.equal(await sec.status(), 'running');
    await sec.quit();
    await sleep(0);
  });
});
