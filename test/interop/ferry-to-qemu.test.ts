/**
 * Ferry → QEMU 7.2: a Ferry source with x-qemu-compat=on migrates a 16 MiB
 * `-machine none` guest into a real QEMU destination over tcp and unix.
 * Only RAM crosses (the workload's vCPU state stays behind): QEMU's pmemsave
 * must equal Ferry's pmemsave of the frozen (postmigrate) source.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { cleanupAll, startVm, tempDir, waitMigration } from '../helpers/vm.js';
import {
  QEMU_RAM_ARGS, QEMU_SKIP, assertSameRam, cleanupQemu, freePort, pmem, startQemu, waitQemuMigration,
} from '../helpers/qemu.js';

after(async () => {
  await cleanupQemu();
  await cleanupAll();
});

const FERRY_COMPAT = ['-machine', 'none,memory-backend=m,x-qemu-compat=on', '-object', 'memory-backend-ram,id=m,size=16M'];

interface Case {
  transport: 'tcp' | 'unix';
  guest: 'random' | 'stress';
  returnPath?: boolean;
}

async function ferryToQemu(c: Case): Promise<void> {
  const dir = tempDir('ferry-interop-');
  const uri = c.transport === 'tcp' ? `tcp:127.0.0.1:${await freePort()}` : `unix:${join(dir, 'mig.sock')}`;
  const qemu = await startQemu({ dir, args: [...QEMU_RAM_ARGS, '-incoming', uri] });
  const guest =
    c.guest === 'random'
      ? ['-fill', 'random,seed=4']
      : ['-smp', '2', '-fill', 'random,seed=5', '-workload', 'stress,rate=4M,seed=9'];
  const src = await startVm({ dir, name: 'src', args: [...FERRY_COMPAT, ...guest] });
  if (c.returnPath) {
    await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'return-path', state: true }] });
  }
  await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
  await src.execute('migrate', { uri });
  const info = await waitMigration(src, undefined, 30000);
  assert.equal(info.status, 'completed', `ferry source: ${JSON.stringify(info)}\nqemu stderr: ${qemu.stderr}\nferry stderr: ${src.stderr}`);
  assert.equal(await src.status(), 'postmigrate');

  const qinfo = await waitQemuMigration(qemu, undefined, 20000);
  assert.equal(qinfo.status, 'completed', `qemu: ${JSON.stringify(qinfo)} stderr: ${qemu.stderr}`);
  // the incoming side starts the guest once loading is done (no -S, globalstate running)
  const qstatus = await qemu.status();
  assert.equal(qstatus, 'running', qemu.stderr);

  const want = await pmem(src, dir);
  const got = await qemu.ram();
  assertSameRam(got, want, `ferry(${c.guest}) → qemu over ${c.transport}`);
  assert.equal(qemu.stderr.trim(), '', 'QEMU printed nothing while loading');
  await src.quit();
  await qemu.quit();
}

describe('Ferry → QEMU 7.2 (x-qemu-compat=on)', { skip: QEMU_SKIP, timeout: 300000 }, () => {
  it('tcp, random fill', { timeout: 60000 }, () => ferryToQemu({ transport: 'tcp', guest: 'random' }));
  it('unix, random fill', { timeout: 60000 }, () => ferryToQemu({ transport: 'unix', guest: 'random' }));
  it('tcp, stress workload', { timeout: 60000 }, () => ferryToQemu({ transport: 'tcp', guest: 'stress' }));
  it('unix, stress workload', { timeout: 60000 }, () => ferryToQemu({ transport: 'unix', guest: 'stress' }));
  it('tcp, random fill, return-path on the source (QEMU answers on the return path)', { timeout: 60000 }, () =>
    ferryToQemu({ transport: 'tcp', guest: 'random', returnPath: true }));
  it('unix, stress workload, return-path on the source', { timeout: 60000 }, () =>
    ferryToQemu({ transport: 'unix', guest: 'stress', returnPath: true }));
});
