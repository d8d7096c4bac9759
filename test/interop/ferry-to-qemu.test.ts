/**
 * Ferry → QEMU 7.2: a Ferry source with x-qemu-compat=on migrates a 16 MiB
 * `-machine none` guest into a real QEMU destination over tcp and unix.
 * Only RAM crosses (the workload's vCPU state stays behind): QEMU's pmemsave
 * must equal Ferry's pmemsave of the frozen (postmigrate) source.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runMigration } from '../helpers/migration.js';
import { cleanupAll } from '../helpers/vm.js';
import { FERRY_COMPAT_ARGS, MEM, QEMU_RAM_ARGS, QEMU_SKIP, cleanupQemu } from '../helpers/qemu.js';

after(async () => {
  await cleanupQemu();
  await cleanupAll();
});


interface Case {
  transport: 'tcp' | 'unix';
  guest: 'random' | 'stress';
  returnPath?: boolean;
}

async function ferryToQemu(c: Case): Promise<void> {
  // the harness: the source completed and postmigrate; QEMU completed and
  // running (the incoming side starts the guest once loading is done: no -S,
  // globalstate running); QEMU's pmemsave equals Ferry's of the frozen source
  await runMigration({
    tempPrefix: 'ferry-interop-',
    guest: c.guest === 'random' ? { fill: 'random,seed=4' } : { smp: 2, fill: 'random,seed=5', workload: 'stress,rate=4M,seed=9' },
    source: { machine: FERRY_COMPAT_ARGS },
    destination: { qemu: true, name: 'qemu', args: QEMU_RAM_ARGS },
    transport: c.transport,
    capabilities: c.returnPath ? ['return-path'] : [],
    timeoutMs: 30000,
    destinationTimeoutMs: 20000,
    expect: { sameRam: MEM },
    after: ({ d }) => assert.equal(d.stderr.trim(), '', 'QEMU printed nothing while loading'),
  });
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
