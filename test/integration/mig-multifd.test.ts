import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createConnection, type Socket } from 'node:net';
import { HEADER_SIZE, encodeInit, putHeader } from '../../src/migration/multifd/wire.js';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { runMigration } from '../helpers/migration.js';
import { assertSweepPattern } from '../helpers/sweep.js';
import { freePort } from '../helpers/qemu.js';
import { cleanupAll, startVm, waitFor, waitMigration, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

describe('multifd between two ferry vm processes', () => {
  for (const transport of ['tcp', 'unix'] as const) {
    it(`migrates a dirtying guest over ${transport}: with 3 channels and equal digests`, async () => {
      const { info } = await runMigration({
        guest: { mem: '64M', smp: 2, workload: 'stress,rate=4M,seed=7', fill: 'random,seed=3' },
        destination: { workload: 'stress,rate=4M,seed=7', capabilities: ['multifd'], parameters: { 'multifd-channels': 3 } },
        source: { parameters: { 'multifd-channels': 3, 'max-bandwidth': 0 } },
        capabilities: ['multifd'],
        transport,
      });
      assert.ok(info.ram['multifd-bytes'] > 40 << 20, `multifd-bytes ${info.ram['multifd-bytes']}`);
      assert.ok(info.ram.transferred >= info.ram['multifd-bytes']);
    });
  }
});

describe('multifd and a guest that rewrites every page all the time', () => {
  it('no stale page anywhere: a page sent again lands after its older copy, whichever channels carried them', async () => {
    const { info } = await runMigration({
      guest: { mem: '32M', workload: 'sweep' },
      capabilities: ['multifd'],
      source: { parameters: { 'multifd-channels': 4, 'max-bandwidth': 0 } },
      destination: { capabilities: ['multifd'], parameters: { 'multifd-channels': 4 } },
      after: async ({ d, dir }) => {
        const file = join(dir, 'dst.ram');
        await d.execute('pmemsave', { val: 0, size: 32 << 20, filename: file });
        assertSweepPattern(readFileSync(file), 1 << 20, 32 << 20);
      },
    });
    assert.ok(info.ram['dirty-sync-count'] >= 2, 'the sweep dirtied pages during the migration');
  });
});

describe('multifd with postcopy', () => {
  it('precopy pages on the channels, then postcopy on the main stream: completed, equal digests', async () => {
    const { info, events } = await runMigration({
      guest: { mem: '64M', smp: 2, workload: 'stress,rate=64M,seed=5', fill: 'random,seed=6' },
      destination: { workload: 'stress,rate=64M,seed=5', capabilities: ['multifd', 'postcopy-ram', 'events'] },
      capabilities: ['multifd', 'postcopy-ram', 'events'],
      source: { parameters: { 'max-bandwidth': 64 << 20 } },
      during: async ({ src }) => {
        await waitFor(async () => ((await src.execute<any>('query-migrate')).ram?.['multifd-bytes'] > 8 << 20 ? true : null), 20000, 'multifd bytes flowing', 20);
        await src.execute('migrate-start-postcopy');
      },
    });
    assert.ok(events.source.includes('postcopy-active'), events.source.join(' '));
    assert.ok(info.ram['multifd-bytes'] > 8 << 20);
  });
});

// ---- failures -----------------------------------------------------------------

const M = ['-m', '32M', '-fill', 'random,seed=21'];

async function multifdOn(vm: VmHandle, channels: number): Promise<void> {
  await vm.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] });
  await vm.execute('migrate-set-parameters', { 'multifd-channels': channels });
}

/** A Ferry destination with multifd on `channels` channels, listening on tcp. */
async function destination(channels: number): Promise<{ vm: VmHandle; port: number }> {
  const vm = await startVm({ args: [...M.slice(0, 2), '-S', '-incoming', 'defer'] });
  await multifdOn(vm, channels);
  const port = await freePort();
  await vm.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
  return { vm, port };
}

function connect(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = createConnection({ host: '127.0.0.1', port }, () => resolve(s));
    s.on('error', reject);
  });
}

/** The start of a main stream: QEVM, version 3. */
const QEVM = Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]);

async function expectDestinationFailed(vm: VmHandle, desc: string): Promise<void> {
  const info = await waitMigration(vm, ['failed', 'completed']);
  assert.equal(info.status, 'failed');
  assert.equal(info['error-desc'], desc);
  assert.equal(await vm.status(), 'inmigrate', 'a failed load never runs the guest');
}

describe('multifd failures', () => {
  it('a channel whose initial packet has the wrong magic fails the destination with QEMU 7.2\'s text', async () => {
    const { vm, port } = await destination(1);
    const main = await connect(port);
    main.write(QEVM);
    const ch = await connect(port);
    const init = encodeInit(0, new Uint8Array(16));
    init.writeUInt32BE(0xdeadbeef, 0);
    ch.write(init);
    await expectDestinationFailed(vm, 'failed to receive packet via multifd channel 0: multifd: received packet magic deadbeef expected 11223344');
    main.destroy();
    ch.destroy();
  });

  it('an initial packet of another version, another uuid, or a channel id out of range', async () => {
    const cases: Array<[(b: Buffer) => void, string]> = [
      [(b) => b.writeUInt32BE(2, 4), 'multifd: received packet version 2 expected 1'],
      [(b) => b.fill(0xab, 8, 24), "multifd: received uuid 'abababab-abab-abab-abab-abababababab' and expected uuid '00000000-0000-0000-0000-000000000000' for channel 0"],
      [(b) => b.writeUInt8(5, 24), 'multifd: received channel version 1 expected 1'],
    ];
    for (const [spoil, desc] of cases) {
      const { vm, port } = await destination(1);
      const main = await connect(port);
      main.write(QEVM);
      const ch = await connect(port);
      const init = encodeInit(0, new Uint8Array(16));
      spoil(init);
      ch.write(init);
      await expectDestinationFailed(vm, `failed to receive packet via multifd channel 0: ${desc}`);
      main.destroy();
      ch.destroy();
      await vm.quit();
    }
  });

  it('bad packets: too many pages, an unknown block, an offset past the block; the load fails and names it', async () => {
    const cases: Array<[(h: Buffer) => void, string]> = [
      [(h) => h.writeUInt32BE(129, 12), 'load of migration failed: multifd: received packet with 129 pages and expected maximum pages are 128'],
      [(h) => {
        h.writeUInt32BE(1, 16);
        h.fill(0, 64, 320);
        h.write('nosuch.ram', 64, 'latin1');
      }, 'load of migration failed: multifd: unknown ram block nosuch.ram'],
      [(h) => {
        h.writeUInt32BE(1, 16);
        h.write('pc.ram', 64, 'latin1');
        h.writeBigUInt64BE(BigInt(32 << 20), 320);
      }, `load of migration failed: multifd: offset too long ${32 << 20} (max ${(32 << 20).toString(16)})`],
    ];
    for (const [spoil, desc] of cases) {
      const { vm, port } = await destination(1);
      const main = await connect(port);
      main.write(QEVM);
      const ch = await connect(port);
      ch.write(encodeInit(0, new Uint8Array(16)));
      const h = Buffer.alloc(HEADER_SIZE);
      putHeader(h, 0, 0, 0, '');
      spoil(h);
      ch.write(h);
      await expectDestinationFailed(vm, desc);
      main.destroy();
      ch.destroy();
      await vm.quit();
    }
  });

  it('a destination without multifd: the source fails at once and runs on with its RAM; the destination never runs', async () => {
    const src = await startVm({ args: M });
    const digest = await src.digest();
    await multifdOn(src, 2);
    const dst = await startVm({ args: [...M.slice(0, 2), '-S', '-incoming', 'defer'] });
    const port = await freePort();
    await dst.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
    await src.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    const info = await waitMigration(src);
    assert.equal(info.status, 'failed');
    assert.match(info['error-desc'], /Connection refused|multifd channel|peer closed|reset/i, info['error-desc']);
    assert.equal(await src.status(), 'running');
    assert.equal(await src.digest(), digest);
    const dinfo = await waitMigration(dst, ['failed', 'completed']);
    assert.equal(dinfo.status, 'failed');
    assert.equal(await dst.status(), 'inmigrate');
  });

  it('migrate_cancel in the middle: cancelled, the source runs on with its RAM, the destination fails', async () => {
    const src = await startVm({ args: ['-m', '256M', '-fill', 'random,seed=22'] });
    const digest = await src.digest();
    await multifdOn(src, 2);
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 32 << 20 });
    const { vm: dst, port } = await destination(2);
    await src.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    await waitFor(async () => ((await src.execute<any>('query-migrate')).ram?.['multifd-bytes'] > 4 << 20 ? true : null), 20000, 'multifd bytes flowing', 20);
    await src.execute('migrate_cancel');
    const info = await waitMigration(src, ['cancelled', 'failed', 'completed']);
    assert.equal(info.status, 'cancelled');
    assert.equal(await src.status(), 'running');
    assert.equal(await src.digest(), digest);
    const dinfo = await waitMigration(dst, ['failed', 'completed']);
    assert.equal(dinfo.status, 'failed');
    assert.equal(await dst.status(), 'inmigrate');
  });

  it('refuses what it cannot do: exec:, TLS, and multifd-channels out of range', async () => {
    const vm = await startVm({ args: ['-m', '16M'] });
    await multifdOn(vm, 2);
    await vm.execute('migrate', { uri: 'exec:cat > /dev/null' });
    const info = await waitMigration(vm);
    assert.equal(info.status, 'failed');
    assert.equal(info['error-desc'], 'multifd is not supported by current protocol');
    assert.equal(await vm.status(), 'running');
    // TLS: refused before anything connects (Ferry's channels have no TLS yet)
    await vm.execute('object-add', { 'qom-type': 'tls-creds-anon', id: 'tls0', endpoint: 'client' });
    await vm.execute('migrate-set-parameters', { 'tls-creds': 'tls0' });
    await vm.execute('migrate', { uri: `tcp:127.0.0.1:${await freePort()}` });
    const tls = await waitMigration(vm);
    assert.equal(tls.status, 'failed');
    assert.equal(tls['error-desc'], 'multifd: Ferry does not run multifd channels under TLS yet; turn off multifd or tls-creds');
    assert.equal(await vm.status(), 'running');
    // COLO: refused too (its checkpoints do not go over the channels)
    await vm.execute('migrate-set-parameters', { 'tls-creds': '' });
    await vm.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-colo', state: true }] });
    await vm.execute('migrate', { uri: `tcp:127.0.0.1:${await freePort()}` });
    const colo = await waitMigration(vm);
    assert.equal(colo.status, 'failed');
    assert.equal(colo['error-desc'], 'multifd: Ferry does not run COLO checkpoints over multifd channels; turn off multifd or x-colo');
    assert.equal(await vm.status(), 'running');
    await assert.rejects(vm.execute('migrate-set-parameters', { 'multifd-channels': 0 }), (e: any) =>
      e.errorClass === 'GenericError' && e.desc === "Parameter 'multifd_channels' expects a value between 1 and 255");
    await assert.rejects(vm.execute('migrate-set-parameters', { 'multifd-channels': 256 }), (e: any) =>
      e.errorClass === 'GenericError' && e.desc === "Parameter 'multifd-channels' expects uint8_t");
    assert.equal((await vm.execute<any>('query-migrate-parameters'))['multifd-channels'], 2);
  });
});

describe('multifd: a peer killed mid-migration', () => {
  const guest = { mem: '64M', fill: 'random,seed=23', workload: 'stress,rate=1M,seed=9' };
  const killWhenFlowing = (which: 'src' | 'dst') => async (m: { src: VmHandle; d: VmHandle }) => {
    // loading on the destination (past the channels' initial packets), pages going over the channels
    await waitFor(async () => ((await m.d.execute<any>('query-migrate')).status === 'active' ? true : null), 15000, 'destination loading', 20);
    const queued = (await m.src.execute<any>('query-migrate')).ram?.['multifd-bytes'] ?? 0;
    await waitFor(async () => ((await m.src.execute<any>('query-migrate')).ram?.['multifd-bytes'] > queued + (4 << 20) ? true : null), 15000, 'multifd bytes flowing', 20);
    const victim = which === 'src' ? m.src : m.d;
    victim.kill('SIGKILL');
    await victim.exited;
  };

  it('destination killed: the source fails, runs on, and its RAM migrates whole afterwards', async () => {
    const first = await runMigration({
      guest,
      capabilities: ['multifd'],
      source: { parameters: { 'max-bandwidth': 8 << 20 } },
      destination: { capabilities: ['multifd'] },
      during: killWhenFlowing('dst'),
      timeoutMs: 15000,
      expect: { source: 'failed' },
      quit: false,
    });
    const { src, info } = first;
    assert.match(info['error-desc'], /\S/);
    assert.equal(await src.status(), 'running');
    await src.execute('stop');
    const d0 = await src.digest();
    await runMigration({
      source: { vm: src, parameters: { 'max-bandwidth': 0 } },
      destination: { mem: '64M', name: 'dst2', capabilities: ['multifd'] },
      after: async ({ d }) => assert.equal(await d.digest(), d0),
    });
    await first.quit();
  });

  it('source killed: the destination fails, never runs, and answers QMP', async () => {
    const { dinfo } = await runMigration({
      guest,
      capabilities: ['multifd'],
      destination: { paused: false, capabilities: ['multifd'] },
      source: { parameters: { 'max-bandwidth': 8 << 20 } },
      during: killWhenFlowing('src'),
      destinationTimeoutMs: 15000,
      expect: { source: null, destination: 'failed' },
      after: async ({ d }) => {
        assert.deepEqual(await d.execute('query-status'), { status: 'inmigrate', running: false, singlestep: false });
        assert.equal(d.exitCode, null);
      },
    });
    assert.match(dinfo!['error-desc'], /^load of migration failed: /);
  });
});
