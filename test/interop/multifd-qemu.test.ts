/**
 * multifd with QEMU 7.2, both ways (docs/spec/multifd.md): the main stream
 * plus multifd-channels connections, QEMU's packet format on them. Both
 * destinations get the capability before the main connection arrives
 * (-incoming defer, then migrate-incoming), as QEMU requires.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runMigration } from '../helpers/migration.js';
import { cleanupAll, tempDir } from '../helpers/vm.js';
import { FERRY_COMPAT_ARGS, MEM, QEMU_RAM_ARGS, QEMU_SKIP, assertSameRam, cleanupQemu, freePort, pmem, qemuImageArgs } from '../helpers/qemu.js';

after(async () => {
  await cleanupQemu();
  await cleanupAll();
});

const FERRY_DST = ['-machine', 'none,memory-backend=m', '-object', 'memory-backend-ram,id=m,size=16M'];

describe('multifd: QEMU 7.2 → Ferry', { skip: QEMU_SKIP, timeout: 300000 }, () => {
  let dir = '';
  let image: Buffer = Buffer.alloc(0);
  let imagePath = '';
  before(() => {
    dir = tempDir('ferry-multifd-');
    image = randomBytes(MEM);
    // zero pages go on the main stream, the rest on the channels
    image.fill(0, 0x10000, 0x30000);
    imagePath = join(dir, 'guest.img');
    writeFileSync(imagePath, image);
  });
  for (const channels of [1, 4]) {
    it(`${channels} channel(s): the RAM arrives whole`, { timeout: 60000 }, async () => {
      const port = await freePort();
      const { dinfo } = await runMigration({
        dir,
        source: { qemu: true, name: `qemu-${port}`, args: qemuImageArgs(imagePath), parameters: { 'multifd-channels': channels } },
        destination: { name: `dst-${port}`, machine: FERRY_DST, paused: false, defer: true, capabilities: ['multifd'], parameters: { 'multifd-channels': channels } },
        capabilities: ['multifd'],
        transport: { uri: `tcp:127.0.0.1:${port}` },
        timeoutMs: 30000,
        expect: { sourceRunState: 'postmigrate', destinationRunState: 'running', settleMs: { sourceRunState: 5000, destinationRunState: 10000 } },
        after: async ({ d }) => assertSameRam(await pmem(d, dir), image, 'qemu → ferry (multifd)'),
      });
      assert.equal(dinfo?.status, 'completed');
    });
  }
});

describe('multifd: Ferry → QEMU 7.2', { skip: QEMU_SKIP, timeout: 300000 }, () => {
  for (const transport of ['tcp', 'unix'] as const) {
    it(`${transport}, a dirtying guest, 3 channels: QEMU's RAM equals the frozen source's`, { timeout: 60000 }, async () => {
      const { info } = await runMigration({
        tempPrefix: 'ferry-multifd-',
        guest: { smp: 2, fill: 'random,seed=5', workload: 'stress,rate=4M,seed=9' },
        source: { machine: FERRY_COMPAT_ARGS, parameters: { 'multifd-channels': 3 } },
        destination: { qemu: true, name: 'qemu', args: QEMU_RAM_ARGS, defer: true, capabilities: ['multifd'], parameters: { 'multifd-channels': 3 } },
        transport,
        capabilities: ['multifd'],
        timeoutMs: 30000,
        destinationTimeoutMs: 20000,
        expect: { sameRam: MEM },
        after: ({ d }) => assert.equal(d.stderr.trim(), '', 'QEMU printed nothing while loading'),
      });
      assert.ok(info.ram['multifd-bytes'] > MEM / 2, `multifd-bytes ${info.ram['multifd-bytes']}`);
    });
  }
});
