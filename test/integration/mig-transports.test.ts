/**
 * Migration over every transport between real `ferry vm` processes:
 * unix, tcp (IPv4, IPv6, listen forms tcp:0:PORT and tcp::PORT), exec (file
 * and pipe), fd (numeric descriptors inherited from the parent), and
 * `-incoming defer` + migrate-incoming.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import * as net from 'node:net';
import { join } from 'node:path';
import { QmpClient } from '../../src/qmp/client.js';
import { shq, waitIncoming } from '../helpers/streams.js';
import { FERRY_MAIN, cleanupAll, startVm, tempDir, waitFor, waitMigration, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const SRC = ['-m', '32M', '-fill', 'random,seed=5', '-workload', 'stress,rate=1M,seed=2'];
const DST = ['-m', '32M', '-S'];

/** Free tcp port on `host` (bound then released). */
async function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.once('error', rej);
    s.listen(0, host, () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => res(p));
    });
  });
}

async function ipv6Works(): Promise<boolean> {
  return new Promise((res) => {
    const s = net.createServer();
    s.once('error', () => res(false));
    s.listen(0, '::1', () => s.close(() => res(true)));
  });
}

/** Migrate src to dst over `uri`; check both sides and the digests. */
async function migrateAndCheck(src: VmHandle, dst: VmHandle, uri: string): Promise<void> {
  await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
  await src.execute('migrate', { uri });
  const info = await waitMigration(src);
  assert.equal(info.status, 'completed', JSON.stringify(info));
  assert.equal(await src.status(), 'postmigrate');
  const d = await waitIncoming(dst);
  assert.equal(d.status, 'completed', JSON.stringify(d));
  assert.equal(await dst.status(), 'paused');
  assert.equal(await dst.digest(), await src.digest());
}

async function pair(dstIncoming: string, dir = tempDir()): Promise<{ src: VmHandle; dst: VmHandle; dir: string }> {
  const dst = await startVm({ dir, name: 'dst', args: [...DST, '-incoming', dstIncoming] });
  const src = await startVm({ dir, name: 'src', args: SRC });
  return { src, dst, dir };
}

describe('migration transports', () => {
  it('unix:', async () => {
    const dir = tempDir();
    const path = join(dir, 'm.sock');
    const { src, dst } = await pair(`unix:${path}`, dir);
    await migrateAndCheck(src, dst, `unix:${path}`);
    await src.quit();
    await dst.quit();
  });

  it('tcp:127.0.0.1:PORT', async () => {
    const port = await freePort();
    const { src, dst } = await pair(`tcp:127.0.0.1:${port}`);
    await migrateAndCheck(src, dst, `tcp:127.0.0.1:${port}`);
    await src.quit();
    await dst.quit();
  });

  it('tcp:[::1]:PORT', async (t) => {
    if (!(await ipv6Works())) return t.skip('no IPv6 loopback');
    const port = await freePort('::1');
    const { src, dst } = await pair(`tcp:[::1]:${port}`);
    await migrateAndCheck(src, dst, `tcp:[::1]:${port}`);
    await src.quit();
    await dst.quit();
  });

  it('incoming tcp:0:PORT and tcp::PORT listen on all addresses', async () => {
    for (const form of ['tcp:0:', 'tcp::']) {
      const port = await freePort();
      const { src, dst } = await pair(`${form}${port}`);
      await migrateAndCheck(src, dst, `tcp:127.0.0.1:${port}`);
      await src.quit();
      await dst.quit();
    }
  });

  it('exec:cat > FILE, then -incoming "exec:cat FILE"', async () => {
    const dir = tempDir();
    const file = join(dir, 'state.mig');
    const src = await startVm({ dir, name: 'src', args: SRC });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await src.execute('migrate', { uri: `exec:cat > ${shq(file)}` });
    const info = await waitMigration(src);
    assert.equal(info.status, 'completed', JSON.stringify(info));
    assert.ok(readFileSync(file).length > 0);
    const dst = await startVm({ dir, name: 'dst', args: [...DST, '-incoming', `exec:cat ${shq(file)}`] });
    const d = await waitIncoming(dst);
    assert.equal(d.status, 'completed', JSON.stringify(d));
    assert.equal(await dst.status(), 'paused');
    assert.equal(await dst.digest(), await src.digest());
    await src.quit();
    await dst.quit();
  });

  it('exec: pipe straight into a unix listener (socat, else node as the pipe)', async () => {
    const dir = tempDir();
    const path = join(dir, 'm.sock');
    const { src, dst } = await pair(`unix:${path}`, dir);
    const hasSocat = spawnSync('sh', ['-c', 'command -v socat']).status === 0;
    // without socat, a node one-liner plays `socat - UNIX-CONNECT:path`
    const pipe = hasSocat
      ? `socat - UNIX-CONNECT:${path}`
      : `${shq(process.execPath)} -e ${shq(`const s=require('net').connect(process.argv[1]);process.stdin.pipe(s);s.on('data',()=>{});`)} ${shq(path)}`;
    await migrateAndCheck(src, dst, `exec:${pipe}`);
    await src.quit();
    await dst.quit();
  });

  it('fd:N with a socket the process inherited (both sides)', async () => {
    const dir = tempDir();
    // a socketpair-like connection: a local unix server; one end for each VM
    const path = join(dir, 'pair.sock');
    const server = net.createServer();
    await new Promise<void>((r) => server.listen(path, r));
    const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
    const a = net.connect(path);
    await new Promise<void>((r) => a.once('connect', () => r()));
    const b = await accepted;
    const spawnWithFd = async (name: string, sock: net.Socket, args: string[]): Promise<{ proc: ReturnType<typeof spawn>; qmp: QmpClient }> => {
      const qsock = join(dir, `${name}.qmp`);
      const proc = spawn(process.execPath, [FERRY_MAIN, 'vm', '-qmp', `unix:${qsock},server=on,wait=off`, ...args], {
        stdio: ['ignore', 'pipe', 'pipe', sock],
      });
      let err = '';
      proc.stderr!.on('data', (d: Buffer) => (err += d));
      const qmp = await waitFor(async () => {
        if (proc.exitCode !== null) throw new Error(`${name} exited: ${err}`);
        if (!existsSync(qsock)) return undefined;
        try {
          return await QmpClient.connect(qsock, { negotiate: true });
        } catch {
          return undefined;
        }
      }, 20000, `${name} QMP`);
      return { proc, qmp: qmp! };
    };
    const d = await spawnWithFd('dst', b, [...DST, '-incoming', 'fd:3']);
    const s = await spawnWithFd('src', a, SRC);
    // the children own the descriptors now
    a.destroy();
    b.destroy();
    server.close();
    try {
      await s.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
      assert.deepEqual(await s.qmp.execute('migrate', { uri: 'fd:3' }), {});
      const info = (await waitFor(async () => {
        const i = await s.qmp.execute<Record<string, any>>('query-migrate');
        return ['completed', 'failed', 'cancelled'].includes(i.status) ? i : null;
      }, 60000, 'fd migration'))!;
      assert.equal(info.status, 'completed', JSON.stringify(info));
      const di = (await waitFor(async () => {
        const i = await d.qmp.execute<Record<string, any>>('query-migrate');
        return ['completed', 'failed'].includes(i.status) ? i : null;
      }, 30000, 'fd incoming'))!;
      assert.equal(di.status, 'completed', JSON.stringify(di));
      const sd = await s.qmp.execute<{ digest: string }>('x-query-memory-digest');
      const dd = await d.qmp.execute<{ digest: string }>('x-query-memory-digest');
      assert.equal(dd.digest, sd.digest);
      assert.equal((await d.qmp.execute<{ status: string }>('query-status')).status, 'paused');
    } finally {
      for (const x of [s, d]) {
        x.qmp.destroy();
        x.proc.kill('SIGKILL');
      }
    }
  });

  it('fd: with an unknown name or a closed number fails', async () => {
    const src = await startVm({ args: SRC });
    // QEMU fails `migrate` itself here (monitor_get_fd is synchronous); Ferry
    // returns {} and fails asynchronously: accept both, check the text
    let desc: string | undefined;
    try {
      await src.execute('migrate', { uri: 'fd:nosuch' });
    } catch (e) {
      desc = (e as { desc: string }).desc;
    }
    const info = await waitMigration(src);
    assert.equal(info.status, 'failed');
    assert.equal(desc ?? info['error-desc'], "File descriptor named 'nosuch' has not been found");
    await src.quit();
  });

  it('-incoming defer + migrate-incoming, and its errors', async () => {
    const dir = tempDir();
    const path = join(dir, 'm.sock');
    const dst = await startVm({ dir, name: 'dst', args: [...DST, '-incoming', 'defer'] });
    const src = await startVm({ dir, name: 'src', args: SRC });
    assert.equal(await dst.status(), 'inmigrate');
    assert.deepEqual(await dst.execute('query-migrate'), {});
    // capabilities can be set before listening
    await dst.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await assert.rejects(dst.execute('migrate-incoming', { uri: 'bogus:x' }), {
      errorClass: 'GenericError',
      desc: 'unknown migration protocol: bogus:x',
    } as object);
    assert.deepEqual(await dst.execute('migrate-incoming', { uri: `unix:${path}` }), {});
    await waitFor(() => existsSync(path), 5000, 'listener socket');
    await assert.rejects(dst.execute('migrate-incoming', { uri: `unix:${path}` }), {
      errorClass: 'GenericError',
      desc: 'The incoming migration has already been started',
    } as object);
    // a VM not started with -incoming defer
    await assert.rejects(src.execute('migrate-incoming', { uri: `unix:${path}x` }), {
      errorClass: 'GenericError',
      desc: "For use with '-incoming defer'",
    } as object);
    await migrateAndCheck(src, dst, `unix:${path}`);
    const ev = dst.qmp.eventLog.filter((e) => e.event === 'MIGRATION').map((e) => (e.data as any).status);
    assert.deepEqual(ev, ['setup', 'active', 'completed']);
    await src.quit();
    await dst.quit();
  });
});
