/**
 * QEMU 7.2 → Ferry over tcp: QEMU's `-machine none` guest (RAM from a random
 * file, memory-backend-file share=off) migrates into a Ferry destination.
 * RAM must be identical, Ferry's run state follows QEMU's globalstate, and
 * with the `events` capability both sides report the same MIGRATION sequence.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cleanupAll, startVm, tempDir, waitFor, waitMigration } from '../helpers/vm.js';
import { MEM, QEMU_SKIP, assertSameRam, cleanupQemu, freePort, pmem, qemuStateAfterCompletion, startQemu, waitQemuMigration } from '../helpers/qemu.js';

after(async () => {
  await cleanupQemu();
  await cleanupAll();
});

const FERRY_DST = ['-machine', 'none,memory-backend=m', '-object', 'memory-backend-ram,id=m,size=16M'];

let dir = '';
let image: Buffer = Buffer.alloc(0);
let imagePath = '';

interface Case {
  qemuPaused: boolean;
  ferryPaused: boolean;
  events?: boolean;
}

async function qemuToFerry(c: Case): Promise<void> {
  const port = await freePort();
  const uri = `tcp:127.0.0.1:${port}`;
  const qemu = await startQemu({
    dir,
    name: `qemu-${port}`,
    args: ['-machine', 'none,memory-backend=m', '-object', `memory-backend-file,id=m,size=16M,mem-path=${imagePath},share=off`, ...(c.qemuPaused ? ['-S'] : [])],
  });
  assert.equal(await qemu.status(), c.qemuPaused ? 'prelaunch' : 'running');
  const dst = await startVm({
    dir,
    name: `dst-${port}`,
    args: [...FERRY_DST, ...(c.ferryPaused ? ['-S'] : []), '-incoming', c.events ? 'defer' : uri],
  });
  if (c.events) {
    await dst.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await dst.execute('migrate-incoming', { uri });
    await qemu.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
  }
  await qemu.execute('migrate', { uri });
  const qinfo = await waitQemuMigration(qemu, undefined, 30000);
  assert.equal(qinfo.status, 'completed', `qemu: ${JSON.stringify(qinfo)}\n${qemu.stderr}\nferry: ${dst.stderr}`);
  assert.equal(await qemuStateAfterCompletion(qemu), 'postmigrate');
  const dinfo = await waitMigration(dst, undefined, 30000);
  assert.equal(dinfo.status, 'completed', `ferry: ${JSON.stringify(dinfo)}\n${dst.stderr}`);

  // globalstate: QEMU running → Ferry running unless Ferry has -S; QEMU prelaunch → Ferry prelaunch
  const want = c.qemuPaused ? 'prelaunch' : c.ferryPaused ? 'paused' : 'running';
  await waitFor(async () => (await dst.status()) === want, 10000, `ferry run state ${want}`).catch(async () => {
    assert.equal(await dst.status(), want);
  });

  assertSameRam(await pmem(dst, dir), image, 'qemu → ferry');
  assertSameRam(await qemu.ram(MEM, join(dir, `q-${port}.ram`)), image, 'qemu source itself');

  if (c.events) {
    const seq = (log: { event: string; data?: unknown }[]) =>
      log.filter((e) => e.event === 'MIGRATION').map((e) => (e.data as { status: string }).status);
    await waitFor(() => seq(qemu.qmp.eventLog).at(-1) === 'completed', 5000, 'QEMU MIGRATION completed event');
    await waitFor(() => seq(dst.qmp.eventLog).at(-1) === 'completed', 5000, 'Ferry MIGRATION completed event');
    assert.deepEqual(seq(qemu.qmp.eventLog), ['setup', 'active', 'completed'], 'QEMU source events');
    assert.deepEqual(seq(dst.qmp.eventLog), ['setup', 'active', 'completed'], 'Ferry destination events');
  }
  await qemu.quit();
  await dst.quit();
}

describe('QEMU 7.2 → Ferry over tcp', { skip: QEMU_SKIP, timeout: 300000 }, () => {
  before(() => {
    dir = tempDir('ferry-interop-');
    image = randomBytes(MEM);
    // a few zero pages and a text page, so both ZERO and normal records appear
    image.fill(0, 0x10000, 0x30000);
    image.write('ferry interop test page', 0x40000);
    imagePath = join(dir, 'guest.img');
    writeFileSync(imagePath, image);
  });
  it('QEMU running → Ferry (no -S) ends running', { timeout: 60000 }, () => qemuToFerry({ qemuPaused: false, ferryPaused: false }));
  it('QEMU -S (prelaunch) → Ferry -S ends prelaunch', { timeout: 60000 }, () => qemuToFerry({ qemuPaused: true, ferryPaused: true }));
  it('QEMU -S (prelaunch) → Ferry without -S still ends prelaunch', { timeout: 60000 }, () =>
    qemuToFerry({ qemuPaused: true, ferryPaused: false }));
  it('events capability on both sides: same MIGRATION sequence', { timeout: 60000 }, () =>
    qemuToFerry({ qemuPaused: false, ferryPaused: false, events: true }));
});
