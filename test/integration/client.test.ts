/**
 * The typed client (ferry/client, generated from qapi/ by tools/qapi-gen)
 * drives whole migrations: Ferry → Ferry, and QEMU 7.2 → QEMU 7.2, with
 * typed commands, typed events (waitEvent) and typed errors. The import
 * goes through the package's "exports" at run time.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { QmpConnection, isQmpError, type MigrationStatus, type QmpEventOf } from 'ferry/client';
import { QEMU_SKIP, QEMU_RAM_ARGS, cleanupQemu, startQemu } from '../helpers/qemu.js';
import { cleanupAll, startVm, tempDir } from '../helpers/vm.js';

after(async () => {
  await cleanupQemu();
  await cleanupAll();
});

/** Events + migrate-incoming + migrate with the typed client; resolves with both sides' MIGRATION statuses. */
async function migrate(src: QmpConnection, dst: QmpConnection, uri: string): Promise<{ src: MigrationStatus[]; dst: MigrationStatus[] }> {
  const seen = { src: [] as MigrationStatus[], dst: [] as MigrationStatus[] };
  src.on('MIGRATION', (e: QmpEventOf<'MIGRATION'>) => seen.src.push(e.data.status));
  dst.on('MIGRATION', (e) => seen.dst.push(e.data.status));
  for (const c of [src, dst]) await c.migrateSetCapabilities({ capabilities: [{ capability: 'events', state: true }] });
  const done = (c: QmpConnection) => c.waitEvent('MIGRATION', { predicate: (e) => ['completed', 'failed'].includes(e.data.status), timeoutMs: 60000 });
  const srcDone = done(src);
  const dstDone = done(dst);
  await dst.migrateIncoming({ uri });
  await src.migrate({ uri });
  const [a, b] = await Promise.all([srcDone, dstDone]);
  assert.equal(a.data.status, 'completed');
  assert.equal(b.data.status, 'completed');
  assert.ok(a.timestamp.seconds > 0);
  return seen;
}

describe('typed client: Ferry → Ferry', () => {
  it('migrates with typed commands and events; errors carry their class', async () => {
    const dir = tempDir();
    const guest = ['-m', '32M', '-workload', 'stress,rate=4M,seed=2', '-fill', 'text,seed=2'];
    const [s, d] = await Promise.all([
      startVm({ dir, name: 's', args: guest }),
      startVm({ dir, name: 'd', args: [...guest.slice(0, 4), '-S', '-incoming', 'defer'] }),
    ]);
    const src = await QmpConnection.connect(s.sock);
    const dst = await QmpConnection.connect(d.sock);
    try {
      assert.equal(src.greeting.QMP.version.package, 'ferry-0.1.0');
      assert.equal((await src.queryStatus()).status, 'running');
      const seen = await migrate(src, dst, `unix:${dir}/m.sock`);
      assert.deepEqual(seen.src, ['setup', 'active', 'completed']);
      assert.deepEqual(seen.dst, ['setup', 'active', 'completed']);
      const info = await src.queryMigrate();
      assert.equal(info.status, 'completed');
      assert.equal(info.ram!.total, 32 << 20);
      assert.equal((await dst.queryStatus()).status, 'paused');
      assert.equal((await src.xQueryMemoryDigest()).digest, (await dst.xQueryMemoryDigest()).digest);
      // typed errors
      await assert.rejects(src.migrateSetCapabilities({ capabilities: [{ capability: 'compress', state: true }, { capability: 'postcopy-ram', state: true }] }), (e: unknown) => {
        assert.ok(isQmpError(e, 'GenericError'));
        assert.equal(e.desc, 'Postcopy is not currently compatible with compression');
        return true;
      });
      await assert.rejects(src.executeRaw('no-such-command'), (e: unknown) => isQmpError(e, 'CommandNotFound'));
      await assert.rejects(src.waitEvent('STOP', { timeoutMs: 50 }), /timed out after 50 ms waiting for event STOP/);
    } finally {
      await src.close();
      await dst.close();
    }
  });
});

describe('typed client: QEMU 7.2 → QEMU 7.2', { skip: QEMU_SKIP }, () => {
  it('drives QEMU through a whole migration; Ferry\'s own commands are CommandNotFound there', { timeout: 120000 }, async () => {
    const dir = tempDir('ferry-client-qemu-');
    const [qs, qd] = await Promise.all([
      startQemu({ dir, name: 'qs', args: QEMU_RAM_ARGS }),
      startQemu({ dir, name: 'qd', args: [...QEMU_RAM_ARGS, '-incoming', 'defer'] }),
    ]);
    // QEMU's monitor takes one client at a time: the typed client on the harness's connection
    const src = qs.api;
    const dst = qd.api;
    {
      assert.equal(src.greeting.QMP.version.qemu.major, 7);
      await src.pmemsave({ val: 0, size: 4096, filename: join(dir, 'before.bin') });
      const seen = await migrate(src, dst, `unix:${dir}/m.sock`);
      assert.deepEqual(seen.src, ['setup', 'active', 'completed']);
      assert.ok(seen.dst.includes('completed'));
      const info = await src.queryMigrate();
      assert.equal(info.status, 'completed');
      assert.ok(info.ram!.total >= 16 << 20);
      await dst.pmemsave({ val: 0, size: 4096, filename: join(dir, 'after.bin') });
      assert.deepEqual(readFileSync(join(dir, 'after.bin')), readFileSync(join(dir, 'before.bin')));
      await assert.rejects(src.xQueryMigrateForecast(), (e: unknown) => isQmpError(e, 'CommandNotFound'));
    }
  });
});
