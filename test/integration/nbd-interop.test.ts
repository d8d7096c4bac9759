/**
 * NBD with QEMU 7.2's tools, both ways: a `ferry vm` exports a drive with
 * nbd-server-start / nbd-server-add and qemu-img, qemu-io and qemu-nbd -L
 * use it (their writes land in the drive: x-query-block-digest and the
 * image file agree); Ferry's client uses an export served by qemu-nbd (its
 * writes are what qemu-img reads back). Malformed requests sent to the VM's
 * export get their NBD errors and the VM keeps running and serving.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import * as net from 'node:net';
import { join } from 'node:path';
import { NbdClient, NbdError } from '../../src/nbd/index.js';
import * as P from '../../src/nbd/protocol.js';
import { cleanupAll, startVm, tempDir, waitFor, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const M = 1 << 20;

function tool(cmd: string, ...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 30000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

describe('NBD: qemu-img and qemu-io against a ferry vm export', { timeout: 120000 }, () => {
  let dir: string;
  let vm: VmHandle;
  let sock: string;
  const uri = (name: string) => `nbd+unix:///${name}?socket=${sock}`;

  before(async () => {
    dir = tempDir('ferry-nbd-');
    sock = join(dir, 'nbd.sock');
    assert.equal(tool('qemu-img', 'create', '-f', 'raw', join(dir, 'd.raw'), '4M').status, 0);
    assert.equal(tool('qemu-img', 'create', '-f', 'qcow2', join(dir, 'q.qcow2'), '8M').status, 0);
    vm = await startVm({
      dir,
      args: ['-m', '16M', '-drive', `file=${join(dir, 'd.raw')},format=raw,if=none,id=disk0`, '-drive', `file=${join(dir, 'q.qcow2')},format=qcow2,if=virtio`],
    });
    await vm.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await vm.execute('nbd-server-add', { device: 'disk0', writable: true, description: 'ferry disk' });
    await vm.execute('nbd-server-add', { device: 'virtio0', name: 'ro-view' });
  });

  it('qemu-img info sees the export\'s size', () => {
    const r = tool('qemu-img', 'info', '--output=json', uri('disk0'));
    assert.equal(r.status, 0, r.stderr);
    const info = JSON.parse(r.stdout);
    assert.equal(info['virtual-size'], 4 * M);
    assert.equal(info.format, 'raw');
    const q = JSON.parse(tool('qemu-img', 'info', '--output=json', uri('ro-view')).stdout);
    assert.equal(q['virtual-size'], 8 * M);
  });

  it('qemu-nbd -L lists both exports with their flags', () => {
    const r = tool('qemu-nbd', '-L', '-k', sock);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /exports available: 2/);
    assert.match(r.stdout, /export: 'disk0'\n\s+description: ferry disk\n\s+size:\s+4194304\n\s+flags: 0x5ed \( flush fua trim zeroes df multi cache \)/);
    assert.match(r.stdout, /export: 'ro-view'\n\s+size:\s+8388608\n\s+flags: 0x58f \( readonly flush fua df multi cache \)/);
    assert.match(r.stdout, /base:allocation/);
  });

  it('qemu-io writes, reads back, zeroes and discards; the drive holds what it wrote', async () => {
    const r = tool('qemu-io', '-f', 'raw', '-c', 'write -P 0xab 4096 65536', '-c', 'read -P 0xab 4096 65536', '-c', 'write -z 8192 4096', '-c', 'read -P 0 8192 4096', '-c', 'discard 1048576 4096', '-c', 'flush', uri('disk0'));
    assert.equal(r.status, 0, r.stderr);
    assert.doesNotMatch(r.stdout, /Pattern verification failed|error/i, r.stdout);
    const expected = Buffer.alloc(4 * M);
    expected.fill(0xab, 4096, 4096 + 65536);
    expected.fill(0, 8192, 8192 + 4096);
    const d = await vm.execute<{ drives: { device: string; digest: string }[] }>('x-query-block-digest');
    assert.equal(d.drives.find((x) => x.device === 'disk0')!.digest, sha(expected));
    assert.equal(sha(readFileSync(join(dir, 'd.raw'))), sha(expected));
  });

  it('qemu-io cannot write to the read-only export', () => {
    const r = tool('qemu-io', '-f', 'raw', '-c', 'write -P 1 0 512', uri('ro-view'));
    assert.match(r.stdout + r.stderr, /Operation not permitted|read-only|Permission denied/i);
  });

  it('answers malformed requests to the VM\'s export with NBD errors, and the VM runs on', async () => {
    const before = (await vm.execute<{ digest: string }>('x-query-block-digest')).digest;
    const client = await NbdClient.connect({ kind: 'unix', path: sock }, 'disk0');
    await assert.rejects(client.read(4 * M, Buffer.alloc(512)), (e: unknown) => e instanceof NbdError && e.errno === P.NBD_EINVAL && /operation past EOF/.test(e.message));
    await assert.rejects(client.write(4 * M - 100, Buffer.alloc(512, 1)), (e: unknown) => e instanceof NbdError && e.errno === P.NBD_ENOSPC);
    await client.close();
    // a raw socket: bad magic
    const raw = net.createConnection({ path: sock });
    const got: Buffer[] = [];
    raw.on('data', (d) => got.push(d));
    const closed = new Promise((r) => raw.once('close', r));
    await new Promise((r) => raw.once('connect', r));
    const go = Buffer.alloc(4 + 5 + 2);
    go.writeUInt32BE(5, 0);
    go.write('disk0', 4);
    raw.write(Buffer.concat([Buffer.from([0, 0, 0, 3]), P.encodeOption(P.NBD_OPT_GO, go)]));
    await waitFor(() => Buffer.concat(got).length >= 18 + 3 * 20 + 14 + 12, 10000, 'GO replies');
    const bad = P.encodeRequest({ flags: 0, type: P.NBD_CMD_WRITE, handle: 42n, offset: 0n, length: 512 });
    bad.writeUInt32BE(0xdeadbeef, 0);
    const n = Buffer.concat(got).length;
    raw.write(Buffer.concat([bad, Buffer.alloc(512, 0xee)]));
    await closed;
    const reply = Buffer.concat(got).subarray(n);
    assert.equal(reply.length, 16);
    assert.equal(reply.readUInt32BE(0), P.NBD_SIMPLE_REPLY_MAGIC);
    assert.equal(reply.readUInt32BE(4), P.NBD_EINVAL);
    assert.equal(reply.readBigUInt64BE(8), 42n);
    assert.equal(await vm.status(), 'running');
    assert.equal((await vm.execute<{ digest: string }>('x-query-block-digest')).digest, before);
    assert.equal(tool('qemu-io', '-f', 'raw', '-c', 'read -P 0xab 4096 4096', uri('disk0')).status, 0);
  });

  it('nbd-server-remove and nbd-server-stop end the exports', async () => {
    await vm.execute('nbd-server-remove', { name: 'ro-view' });
    assert.notEqual(tool('qemu-img', 'info', uri('ro-view')).status, 0);
    await vm.execute('nbd-server-stop');
    assert.equal(existsSync(sock), false);
    await assert.rejects(vm.execute('nbd-server-stop'), /NBD server not running/);
  });
});

describe('NBD: Ferry\'s client against qemu-nbd', { timeout: 60000 }, () => {
  let dir: string;
  let sock: string;
  let nbd: ChildProcess;

  before(async () => {
    dir = tempDir('ferry-qemu-nbd-');
    sock = join(dir, 'q.sock');
    assert.equal(tool('qemu-img', 'create', '-f', 'qcow2', join(dir, 'q.qcow2'), '4M').status, 0);
    nbd = spawn('qemu-nbd', ['-t', '-f', 'qcow2', '-x', 'exp', '-D', 'from qemu-nbd', `--socket=${sock}`, join(dir, 'q.qcow2')], { stdio: 'ignore' });
    await waitFor(() => existsSync(sock), 10000, 'qemu-nbd socket');
  });
  after(() => {
    nbd.kill('SIGKILL');
  });

  it('negotiates, writes, reads, zeroes and flushes; qemu-img reads back what it wrote', async () => {
    assert.deepEqual(await NbdClient.list({ kind: 'unix', path: sock }), [{ name: 'exp', description: 'from qemu-nbd' }]);
    const c = await NbdClient.connect({ kind: 'unix', path: sock }, 'exp');
    assert.equal(c.size, 4 * M);
    assert.equal(c.structured, true);
    assert.equal(c.description, 'from qemu-nbd');
    const data = Buffer.alloc(3 * 65536 + 17);
    for (let i = 0; i < data.length; i++) data[i] = (i * 31) & 0xff;
    await Promise.all([c.write(12345, data), c.writeZeroes(M, 4096), c.write(2 * M, Buffer.alloc(4096, 0x77), true)]);
    await c.flush();
    const back = Buffer.alloc(data.length);
    await c.read(12345, back);
    assert.deepEqual(back, data);
    await assert.rejects(c.read(4 * M, Buffer.alloc(1)), (e: unknown) => e instanceof NbdError && /operation past EOF/.test(e.message));
    await c.close();
    const r = tool('qemu-io', '-f', 'raw', '-c', 'read -P 0x77 2097152 4096', `nbd+unix:///exp?socket=${sock}`);
    assert.equal(r.status, 0, r.stderr);
    assert.doesNotMatch(r.stdout, /verification failed/);
    // what the image file holds, read by qemu-img once qemu-nbd has let go of it
    nbd.kill('SIGTERM');
    await new Promise((res) => nbd.once('exit', res));
    const out = join(dir, 'out.raw');
    const cv = tool('qemu-img', 'convert', '-f', 'qcow2', '-O', 'raw', join(dir, 'q.qcow2'), out);
    assert.equal(cv.status, 0, cv.stderr);
    const file = readFileSync(out);
    assert.deepEqual(file.subarray(12345, 12345 + data.length), data);
    assert.ok(file.subarray(2 * M, 2 * M + 4096).every((x) => x === 0x77));
  });
});
