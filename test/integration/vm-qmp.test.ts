/**
 * `ferry vm` end to end over QMP: run states and their events, memory
 * digests and determinism, pmemsave, large RAM, the serial heartbeat,
 * objects, fds, quit, and command-line errors.
 */
import { makeCa } from '../helpers/tls-certs.js';
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync, statSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { QmpCommandError } from '../../src/qmp/client.js';
import { cleanupAll, readText, runVmExpectingExit, startVm, tempDir, waitFor, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function qmpError(p: Promise<unknown>): Promise<{ cls: string; desc: string }> {
  try {
    await p;
  } catch (e) {
    if (e instanceof QmpCommandError) return { cls: e.errorClass, desc: e.desc };
    throw e;
  }
  throw new Error('command succeeded, expected an error');
}

function eventsNamed(vm: VmHandle, ...names: string[]): string[] {
  return vm.qmp.eventLog.filter((e) => names.includes(e.event)).map((e) => e.event);
}

/** Poll the digest until it stops changing (the workload's steps are done). */
async function settledDigest(vm: VmHandle, timeoutMs = 20000): Promise<string> {
  let last = await vm.digest();
  return waitFor<string | undefined>(
    async () => {
      await sleep(150);
      const d = await vm.digest();
      const same = d === last;
      last = d;
      return same ? d : undefined;
    },
    timeoutMs,
    'the digest to settle',
    0,
  ) as Promise<string>;
}

describe('run state over QMP', () => {
  it('-S starts in prelaunch; cont runs; stop pauses; STOP/RESUME events', async () => {
    const vm = await startVm({ args: ['-m', '16M', '-S'] });
    const st = await vm.execute<{ status: string; running: boolean; singlestep: boolean }>('query-status');
    assert.deepEqual(st, { status: 'prelaunch', running: false, singlestep: false });
    // stop while not running: no event, state unchanged
    await vm.execute('stop');
    assert.equal(await vm.status(), 'prelaunch');
    await vm.execute('cont');
    assert.deepEqual(await vm.execute('query-status'), { status: 'running', running: true, singlestep: false });
    await vm.execute('stop');
    assert.deepEqual(await vm.execute('query-status'), { status: 'paused', running: false, singlestep: false });
    await vm.execute('stop'); // idempotent, no second STOP
    await vm.execute('cont');
    await vm.execute('cont'); // idempotent, no second RESUME
    assert.equal(await vm.status(), 'running');
    await waitFor(() => eventsNamed(vm, 'STOP', 'RESUME').length >= 3, 3000, 'events');
    await sleep(50);
    assert.deepEqual(eventsNamed(vm, 'STOP', 'RESUME'), ['RESUME', 'STOP', 'RESUME']);
    await vm.quit();
    assert.equal(vm.exitCode, 0);
  });

  it('the memory digest changes only while running', async () => {
    const vm = await startVm({ args: ['-m', '16M', '-smp', '2', '-workload', 'stress,rate=8M,seed=1', '-fill', 'random,seed=1'] });
    await sleep(100);
    await vm.execute('stop');
    const d1 = await vm.digest();
    await sleep(300);
    const d2 = await vm.digest();
    assert.equal(d2, d1, 'digest stable while stopped');
    await vm.execute('cont');
    await waitFor(async () => (await vm.digest()) !== d1, 3000, 'the digest to change after cont');
    await vm.quit();
  });

  it('quit sends SHUTDOWN (guest false, host-qmp-quit) before its reply, as QEMU 7.2 does, and exits with 0', async () => {
    const vm = await startVm({ args: ['-m', '16M'] });
    const r = await vm.qmp.execute('quit');
    assert.deepEqual(r, {});
    // the event was read before the reply that resolved execute()
    assert.deepEqual(vm.qmp.eventLog.map((e) => [e.event, e.data]), [['SHUTDOWN', { guest: false, reason: 'host-qmp-quit' }]]);
    await vm.exited;
    assert.equal(vm.exitCode, 0);
  });

  it('SIGTERM sends SHUTDOWN (guest false, host-signal), as QEMU 7.2 does', async () => {
    const vm = await startVm({ args: ['-m', '16M'] });
    vm.kill('SIGTERM');
    await vm.exited;
    assert.deepEqual(vm.qmp.eventLog.map((e) => [e.event, e.data]), [['SHUTDOWN', { guest: false, reason: 'host-signal' }]]);
    assert.equal(vm.exitCode, 0);
  });
});

describe('determinism', () => {
  it('same workload seed and fill seed reach the same digest; another seed does not', async () => {
    const common = ['-m', '16M', '-fill', 'random,seed=2'];
    const [a, b, c] = await Promise.all([
      startVm({ args: [...common, '-workload', 'stress,seed=5,steps=3000'] }),
      startVm({ args: [...common, '-workload', 'stress,seed=5,steps=3000'] }),
      startVm({ args: [...common, '-workload', 'stress,seed=6,steps=3000'] }),
    ]);
    const [da, db, dc] = await Promise.all([settledDigest(a), settledDigest(b), settledDigest(c)]);
    assert.equal(da, db);
    assert.notEqual(da, dc);
    // and the fill alone is deterministic too: a different fill seed differs
    const d = await startVm({ args: ['-m', '16M', '-fill', 'random,seed=3', '-workload', 'stress,seed=5,steps=3000'] });
    assert.notEqual(await settledDigest(d), da);
    await Promise.all([a.quit(), b.quit(), c.quit(), d.quit()]);
  });
});

describe('memory commands', () => {
  it('pmemsave writes the guest bytes (checked against x-query-memory-digest)', async () => {
    const size = 16 << 20;
    const vm = await startVm({ args: ['-m', '16M', '-fill', 'random,seed=9', '-workload', 'stress,seed=1,rate=4M'] });
    await sleep(100);
    await vm.execute('stop');
    const dg = await vm.execute<{ digest: string; blocks: { name: string; size: number; digest: string }[] }>('x-query-memory-digest');
    assert.equal(dg.blocks.length, 1);
    const blk = dg.blocks[0]!;
    assert.equal(blk.size, size);
    const file = join(vm.dir, 'mem.bin');
    await vm.execute('pmemsave', { val: 0, size, filename: file });
    const bytes = readFileSync(file);
    assert.equal(bytes.length, size);
    // recompute the block digest the way the machine does: sha256 over the
    // header and the sha256 of each 64 MiB chunk (here: one chunk)
    const inner = createHash('sha256').update(bytes).digest();
    const mine = createHash('sha256').update(`ferry-ram-block\0${blk.name}\0${blk.size}\0`).update(inner).digest('hex');
    assert.equal(mine, blk.digest);
    const top = createHash('sha256').update(`${blk.name}\0${blk.size}\0${blk.digest}\0`).digest('hex');
    assert.equal(top, dg.digest);
    // a sub-range is the same bytes
    const part = join(vm.dir, 'part.bin');
    await vm.execute('pmemsave', { val: 4096 * 3 + 17, size: 10000, filename: part });
    assert.deepEqual(readFileSync(part), bytes.subarray(4096 * 3 + 17, 4096 * 3 + 17 + 10000));
    // out of range
    const e1 = await qmpError(vm.execute('pmemsave', { val: size - 10, size: 11, filename: join(vm.dir, 'x.bin') }));
    assert.equal(e1.cls, 'GenericError');
    const e2 = await qmpError(vm.execute('pmemsave', { val: size, size: 1, filename: join(vm.dir, 'y.bin') }));
    assert.equal(e2.cls, 'GenericError');
    const e3 = await qmpError(vm.execute('pmemsave', { val: 0, size: 1, filename: join(vm.dir, 'no-such-dir', 'z.bin') }));
    assert.equal(e3.cls, 'GenericError');
    // exactly at the end is fine
    await vm.execute('pmemsave', { val: size - 1, size: 1, filename: join(vm.dir, 'last.bin') });
    assert.equal(statSync(join(vm.dir, 'last.bin')).size, 1);
    await vm.quit();
  });
});

describe('serial heartbeat', () => {
  it('heartbeat lines appear in a -serial file and stop while paused', async () => {
    const dir = tempDir();
    const serial = join(dir, 'serial.txt');
    const vm = await startVm({ dir, args: ['-m', '16M', '-serial', `file:${serial}`] });
    const lines = () => readText(serial).split('\n').filter((l) => l.startsWith('heartbeat'));
    await waitFor(() => lines().length >= 1, 5000, 'a heartbeat line');
    assert.match(lines()[0]!, /^heartbeat \d+ vclock=/);
    await vm.execute('stop');
    await sleep(100);
    const n = lines().length;
    await sleep(1600);
    assert.equal(lines().length, n, 'no heartbeat while paused');
    await vm.execute('cont');
    await waitFor(() => lines().length > n, 5000, 'heartbeats after cont');
    const nums = lines().map((l) => Number(/^heartbeat (\d+)/.exec(l)![1]));
    for (let i = 1; i < nums.length; i++) assert.equal(nums[i], nums[i - 1]! + 1, 'consecutive heartbeat numbers');
    await vm.quit();
  });
});

describe('objects and fds', () => {
  it('object-add / object-del and their errors', async () => {
    const vm = await startVm({ args: ['-m', '16M'] });
    await vm.execute('object-add', { 'qom-type': 'tls-creds-anon', id: 'anon0', endpoint: 'client' });
    let e = await qmpError(vm.execute('object-add', { 'qom-type': 'tls-creds-anon', id: 'anon0', endpoint: 'client' }));
    assert.equal(e.cls, 'GenericError');
    assert.match(e.desc, /duplicate/);
    const missing = join(vm.dir, 'no-such-pki');
    e = await qmpError(vm.execute('object-add', { 'qom-type': 'tls-creds-x509', id: 'x509', endpoint: 'client', dir: missing }));
    assert.equal(e.cls, 'GenericError');
    assert.match(e.desc, /Unable to access credentials .*no-such-pki/);
    // a failed add leaves no object behind
    e = await qmpError(vm.execute('object-del', { id: 'x509' }));
    assert.equal(e.cls, 'GenericError');
    // with the files present it works
    const pki = join(vm.dir, 'pki');
    mkdirSync(pki);
    writeFileSync(join(pki, 'ca-cert.pem'), 'dummy');
    e = await qmpError(vm.execute('object-add', { 'qom-type': 'tls-creds-x509', id: 'x509', endpoint: 'client', dir: pki }));
    assert.deepEqual(e, { cls: 'GenericError', desc: `Unable to import CA certificate list ${join(pki, 'ca-cert.pem')}` });
    // a real CA (and no client certificate, which a client may lack)
    writeFileSync(join(pki, 'ca-cert.pem'), (await makeCa()).pem);
    await vm.execute('object-add', { 'qom-type': 'tls-creds-x509', id: 'x509', endpoint: 'client', dir: pki });
    await vm.execute('object-del', { id: 'x509' });
    await vm.execute('object-del', { id: 'anon0' });
    e = await qmpError(vm.execute('object-del', { id: 'anon0' }));
    assert.equal(e.cls, 'GenericError');
    assert.match(e.desc, /anon0/);
    e = await qmpError(vm.execute('object-del', { id: 'never-existed' }));
    assert.equal(e.cls, 'GenericError');
    // argument validation
    e = await qmpError(vm.execute('object-add', { 'qom-type': 'no-such-type', id: 'q' }));
    assert.equal(e.cls, 'GenericError');
    e = await qmpError(vm.execute('object-add', { id: 'q' }));
    assert.equal(e.desc, "Parameter 'qom-type' is missing");
    await vm.quit();
  });

  it('getfd without SCM_RIGHTS, closefd of an unknown name', async () => {
    const vm = await startVm({ args: ['-m', '16M'] });
    let e = await qmpError(vm.execute('getfd', { fdname: 'mig' }));
    assert.deepEqual(e, { cls: 'GenericError', desc: 'No file descriptor supplied via SCM_RIGHTS' });
    e = await qmpError(vm.execute('closefd', { fdname: 'mig' }));
    assert.equal(e.cls, 'GenericError');
    assert.match(e.desc, /mig/);
    e = await qmpError(vm.execute('getfd', {}));
    assert.equal(e.desc, "Parameter 'fdname' is missing");
    assert.equal(await vm.status(), 'running');
    await vm.quit();
  });
});

describe('command line', { concurrency: true }, () => {
  // [what, args, stderr pattern, todo]
  const bad: [string, string[], RegExp, string?][] = [
    ['unknown option', ['-bogus'], /bogus/],
    ['missing argument', ['-m'], /requires an argument/],
    ['bad size', ['-m', 'lots'], /.+/],
    ['zero size', ['-m', '0'], /.+/],
    ['bad smp', ['-smp', '0'], /cpus/],
    ['bad workload', ['-workload', 'dance'], /Unknown workload 'dance'/],
    ['bad workload option', ['-workload', 'stress,speed=3'], /Unknown workload stress option 'speed'/],
    ['bad fill', ['-fill', 'ones'], /Unknown fill 'ones'/],
    ['bad serial', ['-serial', 'tcp:1.2.3.4:5'], /-serial/],
    ['bad qmp', ['-qmp', 'pipe:foo'], /invalid monitor address 'pipe:foo'/],
    ['qmp socket dir missing', ['-qmp', 'unix:/nonexistent-ferry-dir/x.sock,server=on,wait=off'], /Failed to listen/],
    ['unknown memory backend', ['-machine', 'none,memory-backend=nope'], /nope/],
    ['positional argument', ['disk.img'], /disk\.img/],
    ['bad prealloc value', ['-object', 'memory-backend-ram,id=m,size=16M,prealloc=sometimes', '-machine', 'none,memory-backend=m'], /Parameter 'prealloc' expects 'on' or 'off'/],
  ];
  for (const [what, args, re, todo] of bad) {
    it(`exits with a clear error: ${what}`, { todo }, async () => {
      const r = await runVmExpectingExit(args, todo ? 3000 : 10000);
      assert.notEqual(r.code, 0, `exit code for ${args.join(' ')}`);
      assert.notEqual(r.code, null, 'exited by itself');
      assert.match(r.stderr, /^ferry vm: /m, r.stderr);
      assert.match(r.stderr, re, r.stderr);
      assert.ok(!/\n\s+at /.test(r.stderr), `no stack trace: ${r.stderr}`);
    });
  }
});

describe('preallocated RAM', () => {
  const rss = (pid: number): number => Number(/VmRSS:\s+(\d+) kB/.exec(readText(`/proc/${pid}/status`))![1]) * 1024;
  const MiB = 1024 * 1024;
  for (const [what, args] of [
    ['-mem-prealloc', ['-m', '256M', '-mem-prealloc']],
    ['memory-backend-ram prealloc=on', ['-object', 'memory-backend-ram,id=m,size=256M,prealloc=on', '-machine', 'none,memory-backend=m']],
  ] as const) {
    it(`${what}: all of RAM is resident once the monitor answers`, async () => {
      const vm = await startVm({ args: ['-S', ...args] });
      const n = rss(vm.proc.pid!);
      assert.ok(n >= 256 * MiB, `VmRSS ${(n / MiB).toFixed(0)} MiB`);
      await vm.quit();
    });
  }
  it('without it a paused VM leaves its RAM untouched', async () => {
    const vm = await startVm({ args: ['-S', '-m', '256M'] });
    const n = rss(vm.proc.pid!);
    assert.ok(n < 200 * MiB, `VmRSS ${(n / MiB).toFixed(0)} MiB`);
    await vm.quit();
  });
});
