/**
 * Misuse of the migration commands: states, texts and error classes
 * (docs/spec/qmp.md B.2–B.12, Part F).
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import * as net from 'node:net';
import { join } from 'node:path';
import { runMigration } from '../helpers/migration.js';
import { cleanupAll, startVm, tempDir, waitMigration, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const gen = (desc: string) => ({ errorClass: 'GenericError', desc }) as object;
let vm: VmHandle;
let dir: string;

before(async () => {
  dir = tempDir();
  vm = await startVm({ dir, args: ['-m', '32M'] });
});

async function closedPort(): Promise<number> {
  return new Promise((res) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => res(p));
    });
  });
}

describe('migration command misuse', () => {
  it('defaults: parameters, capabilities, cache size', async () => {
    assert.deepEqual(await vm.execute('query-migrate-parameters'), {
      'compress-level': 1, 'compress-threads': 8, 'decompress-threads': 2,
      'cpu-throttle-initial': 20, 'cpu-throttle-increment': 10,
      'tls-creds': '', 'tls-hostname': '', 'max-bandwidth': 33554432,
      'downtime-limit': 300, 'x-checkpoint-delay': 200, 'block-incremental': false, 'multifd-channels': 2,
    });
    const caps = await vm.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities');
    assert.ok(caps.every((c) => c.state === false));
    assert.equal(await vm.execute('query-migrate-cache-size'), 67108864);
  });

  it('parameter range errors change nothing', async () => {
    const before = await vm.execute('query-migrate-parameters');
    const cases: [string, number, RegExp][] = [
      ['compress-level', 10, /^Parameter 'compress_level' expects .*0 (and|to) 9$/],
      ['compress-level', -1, /^Parameter 'compress_level' expects .*0 (and|to) 9$/],
      ['compress-threads', 0, /^Parameter 'compress_threads' expects .*1 (and|to) 255$/],
      ['compress-threads', 256, /^Parameter 'compress_threads' expects .*1 (and|to) 255$/],
      ['decompress-threads', 0, /^Parameter 'decompress_threads' expects .*1 (and|to) 255$/],
      ['cpu-throttle-initial', 0, /^Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99$/],
      ['cpu-throttle-initial', 100, /^Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99$/],
      ['cpu-throttle-increment', 100, /^Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99$/],
      ['max-bandwidth', -1, /^Parameter 'max_bandwidth' expects an integer in the range of 0 to 18446744073709551615 bytes\/second$/],
      ['downtime-limit', 2000001, /^Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 milliseconds$/],
      ['downtime-limit', -1, /^Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 milliseconds$/],
      ['x-checkpoint-delay', -1, /^Parameter 'x_checkpoint_delay' expects /],
    ];
    for (const [k, v, re] of cases) {
      await assert.rejects(vm.execute('migrate-set-parameters', { 'compress-level': 5, [k]: v }), (e: any) => {
        assert.equal(e.errorClass, 'GenericError');
        assert.match(e.desc, re, `${k}=${v}`);
        return true;
      });
    }
    assert.deepEqual(await vm.execute('query-migrate-parameters'), before);
    // edges are accepted
    await vm.execute('migrate-set-parameters', { 'compress-level': 0, 'compress-threads': 255, 'downtime-limit': 2000000, 'cpu-throttle-initial': 99, 'tls-creds': null });
    const p = await vm.execute<any>('query-migrate-parameters');
    assert.equal(p['compress-level'], 0);
    assert.equal(p['downtime-limit'], 2000000);
    assert.equal(p['tls-creds'], '');
    await vm.execute('migrate-set-parameters', before as object);
  });

  it('deprecated migrate_set_speed / migrate_set_downtime', async () => {
    assert.deepEqual(await vm.execute('migrate_set_speed', { value: 1048576 }), {});
    assert.equal((await vm.execute<any>('query-migrate-parameters'))['max-bandwidth'], 1048576);
    await assert.rejects(vm.execute('migrate_set_speed', { value: -5 }), gen("Parameter 'max_bandwidth' expects an integer in the range of 0 to 18446744073709551615 bytes/second"));
    assert.deepEqual(await vm.execute('migrate_set_downtime', { value: 0.5 }), {});
    assert.equal((await vm.execute<any>('query-migrate-parameters'))['downtime-limit'], 500);
    await vm.execute('migrate_set_downtime', { value: 0.0015 });
    assert.equal((await vm.execute<any>('query-migrate-parameters'))['downtime-limit'], 1);
    await vm.execute('migrate_set_downtime', { value: 2000 });
    assert.equal((await vm.execute<any>('query-migrate-parameters'))['downtime-limit'], 2000000);
    for (const bad of [2000.5, -0.1]) {
      await assert.rejects(vm.execute('migrate_set_downtime', { value: bad }), gen("Parameter 'downtime_limit' expects an integer in the range of 0 to 2000 seconds"));
    }
    assert.equal((await vm.execute<any>('query-migrate-parameters'))['downtime-limit'], 2000000);
    await vm.execute('migrate-set-parameters', { 'max-bandwidth': 33554432, 'downtime-limit': 300 });
  });

  it('migrate-set-cache-size rounds down to a power of two; range errors', async () => {
    await vm.execute('migrate-set-cache-size', { value: 5 << 20 });
    assert.equal(await vm.execute('query-migrate-cache-size'), 4 << 20);
    await vm.execute('migrate-set-cache-size', { value: 4097 });
    assert.equal(await vm.execute('query-migrate-cache-size'), 4096);
    await assert.rejects(vm.execute('migrate-set-cache-size', { value: 4095 }), gen("Parameter 'cache size' expects is smaller than page size"));
    await assert.rejects(vm.execute('migrate-set-cache-size', { value: (32 << 20) + 1 }), gen("Parameter 'cache size' expects exceeds guest ram size "));
    await vm.execute('migrate-set-cache-size', { value: 32 << 20 });
    assert.equal(await vm.execute('query-migrate-cache-size'), 32 << 20);
  });

  it('capabilities not built are refused and stay off', async () => {
    for (const c of ['rdma-pin-all']) {
      await assert.rejects(vm.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }, { capability: c, state: true }] }), (e: any) => {
        assert.equal(e.errorClass, 'GenericError');
        assert.match(e.desc, new RegExp(`'${c}'`));
        return true;
      });
    }
    await assert.rejects(vm.execute('migrate-set-capabilities', { capabilities: [{ capability: 'nosuch', state: true }] }), (e: any) => {
      // docs/spec/qmp.md B.2 quotes 7.2 as "Parameter 'capability' ..."; Ferry names the full path
      assert.match(e.desc, /^Parameter '(capabilities\[0\]\.)?capability' does not accept value 'nosuch'$/);
      return true;
    });
    const caps = await vm.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities');
    assert.ok(caps.every((c) => c.state === false), JSON.stringify(caps));
  });

  it('migrate: unknown scheme, no listener', async () => {
    await assert.rejects(vm.execute('migrate', { uri: 'foo:bar' }), gen("Parameter 'uri' expects a valid migration protocol"));
    assert.deepEqual(await vm.execute('query-migrate'), { status: 'failed' });
    const port = await closedPort();
    assert.deepEqual(await vm.execute('migrate', { uri: `tcp:127.0.0.1:${port}` }), {});
    let info = await waitMigration(vm);
    assert.deepEqual(info, { status: 'failed', 'error-desc': `Failed to connect to '127.0.0.1:${port}': Connection refused` });
    const missing = join(dir, 'nope.sock');
    assert.deepEqual(await vm.execute('migrate', { uri: `unix:${missing}` }), {});
    info = await waitMigration(vm);
    assert.deepEqual(info, { status: 'failed', 'error-desc': `Failed to connect to '${missing}': No such file or directory` });
    assert.equal(await vm.status(), 'running');
  });

  it('double migrate and set-capabilities during a migration', async () => {
    // completed, digests equal
    await runMigration({
      guest: { mem: '64M', fill: 'random,seed=1' },
      source: { parameters: { 'max-bandwidth': 4 << 20 } },
      during: async ({ src, uri }) => {
        await assert.rejects(src.execute('migrate', { uri }), gen("There's a migration process in progress"));
        await assert.rejects(src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] }), gen("There's a migration process in progress"));
        // parameters may change during a migration
        await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
      },
      after: async ({ dir }) => {
        // migrate from a VM waiting for an incoming migration
        const dst2 = await startVm({ dir, name: 'dst2', args: ['-m', '64M', '-incoming', 'defer'] });
        await assert.rejects(dst2.execute('migrate', { uri: 'unix:/nonexistent' }), gen('Guest is waiting for an incoming migration'));
        assert.deepEqual(await dst2.execute('query-migrate'), {});
        await dst2.quit();
      },
    });
  });
});
