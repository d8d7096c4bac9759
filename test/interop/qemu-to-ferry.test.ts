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
import { runMigration } from '../helpers/migration.js';
import { cleanupAll, tempDir } from '../helpers/vm.js';
import { MEM, QEMU_SKIP, assertSameRam, cleanupQemu, freePort, pmem, qemuImageArgs } from '../helpers/qemu.js';

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
  await runMigration({
    dir,
    source: {
      qemu: true,
      name: `qemu-${port}`,
      args: [...qemuImageArgs(imagePath), ...(c.qemuPaused ? ['-S'] : [])],
      // QEMU's own migration parameters
      parameters: {},
    },
    // with events: -incoming defer, the capability, then migrate-incoming
    destination: { name: `dst-${port}`, machine: FERRY_DST, paused: c.ferryPaused, defer: c.events, capabilities: c.events ? ['events'] : [] },
    capabilities: c.events ? ['events'] : [],
    transport: { uri: `tcp:127.0.0.1:${port}` },
    before: async ({ src }) => assert.equal(await src.status(), c.qemuPaused ? 'prelaunch' : 'running'),
    timeoutMs: 30000,
    expect: {
      // QEMU 7.2 sets postmigrate a moment after query-migrate says completed
      sourceRunState: 'postmigrate',
      // globalstate: QEMU running → Ferry running unless Ferry has -S; QEMU prelaunch → Ferry prelaunch
      destinationRunState: c.qemuPaused ? 'prelaunch' : c.ferryPaused ? 'paused' : 'running',
      settleMs: { sourceRunState: 5000, destinationRunState: 10000, events: 5000 },
      events: c.events ? { source: ['setup', 'active', 'completed'], destination: ['setup', 'active', 'completed'] } : undefined,
    },
    after: async ({ src, d }) => {
      assertSameRam(await pmem(d, dir), image, 'qemu → ferry');
      assertSameRam(await pmem(src, dir, MEM), image, 'qemu source itself');
    },
  });
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
